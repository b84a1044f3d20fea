package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/berth-dev/berth/storage"
)

// A flight is one download of one blob into the local cache. Every client
// asking for the blob meanwhile reads the temp file as it grows, so nobody
// waits for the whole blob and the upstream is asked once. The last byte is
// held back until the digest is verified: a client never receives the
// complete body of corrupt content, only a cut-short response.
type flight struct {
	key   storage.Key
	size  int64  // from the source; -1 when it did not say
	label string // where the bytes come from, for metrics

	rf *os.File // read side of the temp file; ReadAt is safe from many goroutines

	mu      sync.Mutex
	cond    *sync.Cond
	written int64
	done    bool
	err     error
	readers int
	release func() // unpins the committed blob once the last reader is done
	started chan struct{}
}

var errFlightAborted = errors.New("download failed")

// source is where a flight reads a blob from; label feeds metrics.
type source struct {
	body  io.ReadCloser
	size  int64
	label string        // "upstream", "s3" or "peer"
	lease storage.Lease // held while fetching from the upstream for the fleet
}

// idleTimeout ends a download whose source sends nothing for this long.
const idleTimeout = 60 * time.Second

// run copies src into w, publishing progress to readers, then commits.
func (f *flight) run(w *storage.BlobWriter, src source, onBytes func(n int)) error {
	defer src.body.Close()
	buf := make([]byte, 256<<10)
	timer := time.AfterFunc(idleTimeout, func() { src.body.Close() })
	defer timer.Stop()
	var err error
	for {
		n, rerr := src.body.Read(buf)
		timer.Reset(idleTimeout)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				err = werr
				break
			}
			onBytes(n)
			f.publish(int64(n))
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			err = rerr
			break
		}
		if f.size >= 0 && w.Written() > f.size {
			err = errors.New("source sent more bytes than it announced")
			break
		}
	}
	if err == nil && f.size >= 0 && w.Written() != f.size {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		w.Abort()
		return err
	}
	return w.Commit()
}

func (f *flight) publish(n int64) {
	f.mu.Lock()
	f.written += n
	f.mu.Unlock()
	f.cond.Broadcast()
}

func (f *flight) finish(err error, release func()) {
	f.mu.Lock()
	f.done, f.err = true, err
	f.release = release
	noReaders := f.readers == 0
	f.mu.Unlock()
	f.cond.Broadcast()
	if noReaders {
		f.close()
	}
}

func (f *flight) close() {
	f.rf.Close()
	if f.release != nil {
		f.release()
	}
}

// newReader joins the flight. The reader must be closed.
func (f *flight) newReader(ctx context.Context) *flightReader {
	f.mu.Lock()
	f.readers++
	f.mu.Unlock()
	r := &flightReader{f: f}
	// Wake a reader blocked in Read when its client goes away.
	r.stop = context.AfterFunc(ctx, func() {
		f.mu.Lock()
		r.canceled = true
		f.mu.Unlock()
		f.cond.Broadcast()
	})
	return r
}

// flightReader is an io.ReadSeeker over a blob still downloading, so
// http.ServeContent can answer Range and conditional requests from it.
type flightReader struct {
	f        *flight
	off      int64
	canceled bool
	stop     func() bool
	closed   bool
	err      error    // what ended reading early, if anything
	file     *os.File // own open file for sendfile, see sendTo
}

// available blocks until bytes past r.off may be read and returns where
// they end; io.EOF at the end of a verified blob.
func (r *flightReader) available() (int64, error) {
	f := r.f
	f.mu.Lock()
	defer f.mu.Unlock()
	for {
		if f.err != nil {
			return 0, errFlightAborted
		}
		if r.canceled {
			return 0, context.Canceled
		}
		avail := f.written
		if !f.done {
			avail-- // hold back the last byte until the digest is verified
		}
		if r.off < avail {
			return avail, nil
		}
		if f.done {
			return 0, io.EOF
		}
		f.cond.Wait()
	}
}

func (r *flightReader) fail(err error) error {
	if err != nil && err != io.EOF && r.err == nil {
		r.err = err
	}
	return err
}

func (r *flightReader) Read(p []byte) (int, error) {
	avail, err := r.available()
	if err != nil {
		return 0, r.fail(err)
	}
	n := min(int64(len(p)), avail-r.off)
	m, err := r.f.rf.ReadAt(p[:n], r.off)
	r.off += int64(m)
	if err == io.EOF && m > 0 {
		err = nil
	}
	return m, r.fail(err)
}

// sendTo writes up to limit bytes to w as they become available. Each
// stretch goes out as an *os.File section so the connection can use
// sendfile, as for cached blobs: many clients streaming one download then
// cost little more CPU than serving it hot.
func (r *flightReader) sendTo(w io.Writer, limit int64) (int64, error) {
	if r.file == nil {
		// An open file of its own, for an offset of its own: sendfile reads
		// from the file's position. /proc finds the temp file even after
		// it was renamed into the cache or unlinked.
		f, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", r.f.rf.Fd()))
		if err != nil {
			return io.Copy(w, struct{ io.Reader }{io.LimitReader(r, limit)})
		}
		r.file = f
	}
	var sent int64
	for sent < limit {
		avail, err := r.available()
		if err == io.EOF {
			return sent, nil
		}
		if err != nil {
			return sent, r.fail(err)
		}
		if _, err := r.file.Seek(r.off, io.SeekStart); err != nil {
			return sent, r.fail(err)
		}
		n, err := io.Copy(w, &io.LimitedReader{R: r.file, N: min(avail-r.off, limit-sent)})
		r.off += n
		sent += n
		if err != nil {
			return sent, r.fail(err)
		}
	}
	return sent, nil
}

func (r *flightReader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += r.off
	case io.SeekEnd:
		if r.f.size < 0 {
			return 0, errors.New("size unknown")
		}
		offset += r.f.size
	}
	if offset < 0 {
		return 0, errors.New("negative offset")
	}
	r.off = offset
	return offset, nil
}

// Close leaves the flight; the last reader out of a finished flight closes it.
func (r *flightReader) Close() error {
	if r.closed {
		return nil
	}
	r.closed = true
	r.stop()
	if r.file != nil {
		r.file.Close()
	}
	f := r.f
	f.mu.Lock()
	f.readers--
	last := f.readers == 0 && f.done
	f.mu.Unlock()
	if last {
		f.close()
	}
	return nil
}

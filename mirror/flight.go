package mirror

import (
	"context"
	"errors"
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
	label string        // "upstream" or "s3"
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
}

func (r *flightReader) Read(p []byte) (int, error) {
	f := r.f
	f.mu.Lock()
	for {
		if f.err != nil {
			f.mu.Unlock()
			return 0, errFlightAborted
		}
		if r.canceled {
			f.mu.Unlock()
			return 0, context.Canceled
		}
		avail := f.written
		if !f.done {
			avail-- // hold back the last byte until the digest is verified
		}
		if r.off < avail {
			n := int64(len(p))
			if n > avail-r.off {
				n = avail - r.off
			}
			f.mu.Unlock()
			m, err := f.rf.ReadAt(p[:n], r.off)
			r.off += int64(m)
			if err == io.EOF && m > 0 {
				err = nil
			}
			return m, err
		}
		if f.done {
			f.mu.Unlock()
			return 0, io.EOF
		}
		f.cond.Wait()
	}
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

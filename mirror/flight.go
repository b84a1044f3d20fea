package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/storage"
)

// A flight is one download of one blob into the local cache. Every client
// asking for the blob meanwhile reads the temp file as it grows, so nobody
// waits for the whole blob and the upstream is asked once. The last byte is
// held back until the digest is verified: a client never receives the
// complete body of corrupt content, only a cut-short response.
//
// When the disk has no room for the blob the flight relays instead: the
// bytes pass through a window of memory that moves only as fast as its
// slowest reader, so the clients that asked together still share one
// download and memory stays bounded; nothing is cached.
type flight struct {
	key   storage.Key
	size  int64  // from the source; -1 when it did not say
	label string // where the bytes come from, for metrics

	rf *os.File // read side of the temp file; ReadAt is safe from many goroutines

	// Relay mode, set before started closes. Byte p of the blob is at
	// ring[p%len(ring)] while p >= base.
	relay     bool
	ring      []byte
	stopRelay func() // closes the relay's source once no client is left

	mu      sync.Mutex
	cond    *sync.Cond
	written int64
	base    int64 // relay: the lowest offset the ring still holds
	done    bool
	err     error
	members map[*flightReader]struct{} // the open readers; a relay's window waits for them
	release func()                     // unpins the committed blob once the last reader is done
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
// A variable for tests.
var idleTimeout = 60 * time.Second

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

// relayWindow is the memory a relay holds: the most any reader of it may
// lag behind the download.
const relayWindow = 4 << 20

// relayStall is how long a relay waits for a reader that reads nothing
// before it drops that reader, so one stuck client cannot stall the others.
// A variable for tests.
var relayStall = 30 * time.Second

var (
	errRelayStalled   = errors.New("fell behind a download the disk had no room for")
	errRelayAbandoned = errors.New("every client of an uncached download went away")
)

// startRelay turns the flight into a relay; call it before started closes.
func (f *flight) startRelay() {
	ring := make([]byte, relayWindow)
	f.mu.Lock() // a reader may be closing already
	f.relay, f.ring = true, ring
	f.mu.Unlock()
}

// runRelay reads src through the ring, verifying the digest as a BlobWriter
// would. It ends early once every reader has gone: with nothing cached there
// is nobody left to download for.
func (f *flight) runRelay(src source, onBytes func(n int)) error {
	var abandoned atomic.Bool
	f.mu.Lock()
	f.stopRelay = sync.OnceFunc(func() { abandoned.Store(true); src.body.Close() })
	f.mu.Unlock()
	defer src.body.Close()
	// The idle clock runs only while berth waits for the source, not while
	// it waits for its readers.
	timer := time.AfterFunc(idleTimeout, func() { src.body.Close() })
	defer timer.Stop()
	h := f.key.Digest.Algorithm().Hash()
	ring := int64(len(f.ring))
	for {
		want := min(256<<10, ring-f.written%ring)
		timer.Stop()
		if err := f.makeRoom(want); err != nil {
			return err
		}
		at := f.written % ring
		timer.Reset(idleTimeout)
		n, rerr := src.body.Read(f.ring[at : at+want])
		if n > 0 {
			h.Write(f.ring[at : at+int64(n)])
			onBytes(n)
			f.publish(int64(n))
			if f.size >= 0 && f.written > f.size {
				return errors.New("source sent more bytes than it announced")
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if abandoned.Load() {
				return errRelayAbandoned
			}
			return rerr
		}
	}
	if f.size >= 0 && f.written != f.size {
		return io.ErrUnexpectedEOF
	}
	if got := digest.NewDigest(f.key.Digest.Algorithm(), h); got != f.key.Digest {
		return fmt.Errorf("%w: want %s, got %s", storage.ErrDigestMismatch, f.key.Digest, got)
	}
	return nil
}

// makeRoom waits until the next want bytes can go into the ring without
// overwriting anything a reader has yet to read, then gives that stretch
// up. A reader in the way that has not moved for relayStall is dropped.
func (f *flight) makeRoom(want int64) error {
	ring := int64(len(f.ring))
	f.mu.Lock()
	defer f.mu.Unlock()
	var wake *time.Timer
	defer func() {
		if wake != nil {
			wake.Stop()
		}
	}()
	for {
		need := f.written + want - ring // the lowest offset that stays
		now := time.Now()
		var next time.Time // when the next reader in the way would be dropped
		live, inWay, dropped := 0, 0, false
		for r := range f.members {
			if r.canceled || r.evicted {
				continue
			}
			live++
			if r.pos >= need {
				continue
			}
			inWay++
			if at := r.moved.Add(relayStall); !now.Before(at) {
				r.evicted, dropped = true, true
			} else if next.IsZero() || at.Before(next) {
				next = at
			}
		}
		switch {
		case live == 0:
			return errRelayAbandoned
		case inWay == 0:
			f.base = max(f.base, need)
			return nil
		case dropped:
			f.cond.Broadcast() // the dropped readers' handlers end
			continue
		}
		if wake != nil {
			wake.Stop()
		}
		wake = time.AfterFunc(time.Until(next), f.cond.Broadcast)
		f.cond.Wait()
	}
}

// abandonLocked returns what stops a relay whose every client has gone,
// whose download is therefore pointless; nil while anyone still reads.
// f.mu is held; call the result without it.
func (f *flight) abandonLocked() func() {
	if f.stopRelay == nil || f.done {
		return nil
	}
	for r := range f.members {
		if !r.canceled && !r.evicted {
			return nil
		}
	}
	return f.stopRelay
}

func (f *flight) publish(n int64) {
	f.mu.Lock()
	if f.relay {
		// A reader that had read everything there was has been waiting,
		// not stalling: its relayStall counts from now.
		now := time.Now()
		for r := range f.members {
			if r.pos >= f.written-1 {
				r.moved = now
			}
		}
	}
	f.written += n
	f.mu.Unlock()
	f.cond.Broadcast()
}

func (f *flight) finish(err error, release func()) {
	f.mu.Lock()
	f.done, f.err = true, err
	f.release = release
	noReaders := len(f.members) == 0
	f.mu.Unlock()
	f.cond.Broadcast()
	if noReaders {
		f.close()
	}
}

func (f *flight) close() {
	if f.rf != nil {
		f.rf.Close()
	}
	if f.release != nil {
		f.release()
	}
}

// newReader joins the flight. The reader must be closed. It returns nil
// for a relay that has moved past the blob's start.
func (f *flight) newReader(ctx context.Context) *flightReader {
	r := &flightReader{f: f, moved: time.Now()}
	f.mu.Lock()
	if f.base > 0 {
		f.mu.Unlock()
		return nil
	}
	if f.members == nil {
		f.members = map[*flightReader]struct{}{}
	}
	f.members[r] = struct{}{}
	f.mu.Unlock()
	// Wake a reader blocked in Read when its client goes away.
	r.stop = context.AfterFunc(ctx, func() {
		f.mu.Lock()
		r.canceled = true
		stop := f.abandonLocked()
		f.mu.Unlock()
		f.cond.Broadcast()
		if stop != nil {
			stop()
		}
	})
	return r
}

// flightReader is an io.ReadSeeker over a blob still downloading, so
// http.ServeContent can answer Range and conditional requests from it.
type flightReader struct {
	f        *flight
	off      int64
	pos      int64     // relay: where this reader last read; the window waits for it
	moved    time.Time // relay: when pos last changed
	evicted  bool      // relay: dropped for holding the window back too long
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
		if r.evicted {
			return 0, errRelayStalled
		}
		if f.relay {
			if r.off < f.base {
				return 0, errRelayStalled
			}
			if r.pos != r.off {
				r.pos, r.moved = r.off, time.Now()
				f.cond.Broadcast() // the window may move now
			}
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
	if r.f.relay {
		// The window keeps [r.pos, r.pos+len(ring)) intact, and r.pos is r.off.
		ring := r.f.ring
		at := r.off % int64(len(ring))
		m := copy(p[:n], ring[at:])
		m += copy(p[m:n], ring)
		r.off += int64(m)
		return m, nil
	}
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
	if r.f.relay {
		return io.Copy(w, struct{ io.Reader }{io.LimitReader(r, limit)})
	}
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
	delete(f.members, r)
	last := len(f.members) == 0 && f.done
	relay := f.relay
	stop := f.abandonLocked()
	f.mu.Unlock()
	if relay {
		f.cond.Broadcast() // the window may have waited for this reader
	}
	if stop != nil {
		stop()
	}
	if last {
		f.close()
	}
	return nil
}

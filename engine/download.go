package engine

import (
	"bytes"
	"context"
	"encoding"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/storage"
)

// A download is one fetch of one blob into the local cache. Every caller
// asking for the blob meanwhile reads the temp file as it grows, so nobody
// waits for the whole blob and the source is asked once. The last byte is
// held back until the digest is verified: a reader never receives the
// complete body of corrupt content, only an error.
//
// When the disk has no room for the blob, or fills up in the middle of it,
// the download relays: the bytes not on disk pass through a window of
// memory that moves only as fast as its slowest reader, so the callers
// that asked together still share one fetch and memory stays bounded.
// Nothing is cached then. Only the download's own goroutine writes; every
// change of its state is a method here.
type download struct {
	key     storage.Key
	stall   time.Duration // a relay drops a reader that held the window this long
	started chan struct{} // closed once size, label and rf are set, or the start failed

	size  int64  // from the source; -1 when it did not say
	label string // where the bytes come from: upstream, s3 or peer
	rf    *os.File

	mu       sync.Mutex
	cond     *sync.Cond
	written  int64
	relaying bool
	ring     []byte // byte p of the blob is at ring[p%len(ring)] while p >= base
	fileEnd  int64  // relaying: bytes below this are in the file
	base     int64  // relaying: the lowest offset the ring still holds
	done     bool
	finished chan struct{}
	err      error
	members  map[*reader]struct{} // open readers; a relay's window waits for them
	release  func()               // unpins the committed blob once the last reader is done
	stopSrc  func()               // relaying: closes the source once no reader is left
}

var errDownloadFailed = errors.New("download failed")

// RelayWindow is the memory a relay holds: the most any reader of it may
// lag behind the download.
const RelayWindow = 4 << 20

var (
	errRelayStalled   = errors.New("fell behind a download the disk had no room for")
	errRelayAbandoned = errors.New("every reader of an uncached download went away")
	errRelayMissed    = errors.New("blob is relayed uncached and its start has gone by")
)

func newDownload(key storage.Key, stall time.Duration) *download {
	d := &download{key: key, stall: stall, size: -1, started: make(chan struct{}), finished: make(chan struct{})}
	d.cond = sync.NewCond(&d.mu)
	return d
}

// begin publishes what the source said and the temp file readers read.
func (d *download) begin(size int64, label string, rf *os.File) {
	d.size, d.label, d.rf = size, label, rf
	close(d.started)
}

// beginRelay starts a download that keeps nothing on disk.
func (d *download) beginRelay(size int64, label string) {
	d.mu.Lock() // a reader may be closing already
	d.relaying, d.ring = true, make([]byte, RelayWindow)
	d.mu.Unlock()
	d.begin(size, label, nil)
}

// fail ends a download that never started.
func (d *download) fail(err error) {
	d.finish(err, nil)
	close(d.started)
}

// resumeFunc reopens a download's source at offset after the current one
// failed for reason (stall, error, short); it gives up after a bounded
// number of tries.
type resumeFunc func(offset int64, reason string) (source, error)

// fill copies the source into w (nil for a relay) until it ends, publishing
// progress. When the source stalls (sends nothing for idle(source)), breaks
// or ends early, resume reopens
// it from the byte reached, and the readers see a pause, not an error.
// When the disk fills it switches to relaying what is left and calls
// onRelay. It returns the hash of a relay (which has no BlobWriter to
// verify it) and the error that ended the copy.
func (d *download) fill(src source, w *storage.BlobWriter, idle func(source) time.Duration, onBytes func(int), onRelay func(), resume resumeFunc) (_ hash.Hash, err error) {
	defer func() {
		if err != nil && w != nil {
			w.Abort() // nothing partial stays in tmp/
		}
	}()
	// cur is the source being read; the idle timer and an abandoned relay
	// close it from other goroutines.
	var curMu sync.Mutex
	cur := src
	closeCur := func() {
		curMu.Lock()
		cur.body.Close()
		curMu.Unlock()
	}
	defer closeCur()
	var abandoned, stalled atomic.Bool
	d.mu.Lock()
	d.stopSrc = sync.OnceFunc(func() { abandoned.Store(true); closeCur() })
	d.mu.Unlock()
	var h hash.Hash
	if w == nil {
		h = d.key.Digest.Algorithm().Hash()
	}
	// The idle clock runs only while berth waits for the source, not while
	// a relay waits for its readers.
	timer := time.AfterFunc(idle(cur), func() { stalled.Store(true); closeCur() })
	defer timer.Stop()
	buf := make([]byte, 256<<10)
	var carry []byte // read into buf when the disk filled; goes to the ring
	var pending error
	for {
		var p []byte
		if w == nil {
			ring := int64(len(d.ring))
			want := min(256<<10, ring-d.written%ring)
			timer.Stop()
			if err := d.makeRoom(want); err != nil {
				return nil, err
			}
			timer.Reset(idle(cur))
			at := d.written % ring
			p = d.ring[at : at+want]
		} else {
			p = buf
		}
		var n int
		var rerr error
		if len(carry) > 0 {
			n = copy(p, carry)
			carry = carry[n:]
			if len(carry) == 0 {
				rerr, pending = pending, nil
			}
		} else {
			n, rerr = cur.body.Read(p)
			timer.Reset(idle(cur))
		}
		if n > 0 && w != nil {
			m, werr := w.Write(p[:n])
			if werr != nil && !errors.Is(werr, storage.ErrNoSpace) {
				return nil, werr
			}
			if werr != nil {
				// The disk filled: what is on disk stays readable, the
				// rest is relayed.
				h = w.Hash()
				carry = append([]byte(nil), p[m:n]...)
				pending, rerr = rerr, nil
				w.Abort()
				w = nil
				onBytes(m)
				d.publish(int64(m))
				d.switchToRelay()
				onRelay()
				n = 0
			}
		} else if n > 0 {
			h.Write(p[:n])
		}
		if n > 0 {
			onBytes(n)
			d.publish(int64(n))
			if d.size >= 0 && d.written > d.size {
				return nil, errors.New("source sent more bytes than it announced")
			}
		}
		if len(carry) > 0 {
			continue
		}
		reason := "error"
		if rerr == io.EOF {
			if d.size < 0 || d.written == d.size {
				break
			}
			rerr, reason = io.ErrUnexpectedEOF, "short"
		}
		if rerr == nil {
			continue
		}
		if abandoned.Load() {
			return nil, errRelayAbandoned
		}
		if resume == nil {
			return nil, rerr
		}
		if stalled.Swap(false) {
			reason = "stall"
		}
		// Keep what arrived and carry on from there.
		timer.Stop()
		hs := h
		if w != nil {
			hs = w.Hash()
		}
		next, err := d.reopen(resume, reason, hs, func(s source) {
			curMu.Lock()
			cur.body.Close()
			cur = s
			curMu.Unlock()
			timer.Reset(idle(cur))
		})
		if err != nil {
			return nil, fmt.Errorf("%w (the source failed: %v)", err, rerr)
		}
		if abandoned.Load() {
			next.body.Close()
			return nil, errRelayAbandoned
		}
	}
	if w != nil {
		return nil, w.Commit()
	}
	if got := digest.NewDigest(d.key.Digest.Algorithm(), h); got != d.key.Digest {
		return nil, fmt.Errorf("%w: want %s, got %s", storage.ErrDigestMismatch, d.key.Digest, got)
	}
	return h, nil
}

// reopen gets a source for the rest of the blob from resume. A source
// that answered from the start (it ignored the range) must first send the
// very bytes already received: their hash state must equal h's, or the
// source is set aside. use makes the source current before its first
// read, so the idle timer covers that read too.
func (d *download) reopen(resume resumeFunc, reason string, h hash.Hash, use func(source)) (source, error) {
	for {
		next, err := resume(d.written, reason)
		if err != nil {
			return source{}, err
		}
		if d.size >= 0 && next.size >= 0 && next.size != d.size {
			next.body.Close()
			reason = "size"
			continue
		}
		use(next)
		if next.skip == 0 {
			return next, nil
		}
		if err := samePrefix(h, next.body, next.skip, d.key.Digest.Algorithm()); err != nil {
			next.body.Close()
			reason = "mismatch"
			continue
		}
		return next, nil
	}
}

// samePrefix reads n bytes from r and checks they hash to the state h is
// in: the bytes a download already holds, without reading them back.
func samePrefix(h hash.Hash, r io.Reader, n int64, alg digest.Algorithm) error {
	m, ok := h.(encoding.BinaryMarshaler)
	if !ok {
		return errors.New("cannot compare a resumed source without a ranged answer")
	}
	want, err := m.MarshalBinary()
	if err != nil {
		return err
	}
	g := alg.Hash()
	if _, err := io.CopyN(g, r, n); err != nil {
		return err
	}
	got, err := g.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return err
	}
	if !bytes.Equal(want, got) {
		return errors.New("the source's bytes before the resume point differ from those received")
	}
	return nil
}

// switchToRelay keeps the bytes written so far readable from the temp
// file and relays the rest.
func (d *download) switchToRelay() {
	d.mu.Lock()
	d.relaying, d.ring = true, make([]byte, RelayWindow)
	d.fileEnd, d.base = d.written, d.written
	d.mu.Unlock()
}

// makeRoom waits until the next want bytes can go into the ring without
// overwriting anything a reader has yet to read, then gives that stretch
// up. A reader in the way that has not moved for the stall time is dropped.
func (d *download) makeRoom(want int64) error {
	ring := int64(len(d.ring))
	d.mu.Lock()
	defer d.mu.Unlock()
	var wake *time.Timer
	defer func() {
		if wake != nil {
			wake.Stop()
		}
	}()
	for {
		need := d.written + want - ring // the lowest offset that stays
		now := time.Now()
		var next time.Time // when the next reader in the way would be dropped
		live, inWay, dropped := 0, 0, false
		for r := range d.members {
			if r.copying && r.pos < need {
				// Copying out of that stretch right now, even if its
				// caller has just gone: it must not change under the
				// copy, which ends shortly (and wakes us).
				if !r.canceled && !r.evicted {
					live++
				}
				inWay++
				continue
			}
			if r.canceled || r.evicted {
				continue
			}
			live++
			if r.pos >= need {
				continue
			}
			inWay++
			if at := r.moved.Add(d.stall); !now.Before(at) {
				r.evicted, dropped = true, true
			} else if next.IsZero() || at.Before(next) {
				next = at
			}
		}
		switch {
		case live == 0:
			return errRelayAbandoned
		case inWay == 0:
			d.base = max(d.base, need)
			return nil
		case dropped:
			d.cond.Broadcast() // the dropped readers' callers end
			continue
		}
		if wake != nil {
			wake.Stop()
		}
		if !next.IsZero() {
			wake = time.AfterFunc(time.Until(next), d.cond.Broadcast)
		}
		d.cond.Wait()
	}
}

// abandonLocked returns what stops a relay whose every reader has gone,
// whose download is therefore pointless; nil while anyone still reads.
// d.mu is held; call the result without it.
func (d *download) abandonLocked() func() {
	if !d.relaying || d.stopSrc == nil || d.done {
		return nil
	}
	for r := range d.members {
		if !r.canceled && !r.evicted {
			return nil
		}
	}
	return d.stopSrc
}

func (d *download) publish(n int64) {
	if n == 0 {
		return
	}
	d.mu.Lock()
	if d.relaying {
		// A reader that had read everything there was has been waiting,
		// not stalling: its stall time counts from now.
		now := time.Now()
		for r := range d.members {
			if r.pos >= d.written-1 {
				r.moved = now
			}
		}
	}
	d.written += n
	d.mu.Unlock()
	d.cond.Broadcast()
}

// finish ends the download; release unpins the committed blob once its
// last reader is done.
func (d *download) finish(err error, release func()) {
	d.mu.Lock()
	d.done, d.err = true, err
	d.release = release
	noReaders := len(d.members) == 0
	d.mu.Unlock()
	close(d.finished)
	d.cond.Broadcast()
	if noReaders {
		d.close()
	}
}

func (d *download) close() {
	if d.rf != nil {
		d.rf.Close()
	}
	if d.release != nil {
		d.release()
	}
}

// newReader joins the download. The reader must be closed. It returns nil
// for a relay whose window has moved past what the file holds.
func (d *download) newReader(ctx context.Context) *reader {
	r := &reader{d: d, moved: time.Now()}
	d.mu.Lock()
	if d.relaying && d.base > d.fileEnd {
		d.mu.Unlock()
		return nil
	}
	if d.members == nil {
		d.members = map[*reader]struct{}{}
	}
	d.members[r] = struct{}{}
	d.mu.Unlock()
	// Wake a reader blocked in Read when its caller goes away.
	r.stop = context.AfterFunc(ctx, func() {
		d.mu.Lock()
		r.canceled = true
		stop := d.abandonLocked()
		d.mu.Unlock()
		d.cond.Broadcast()
		if stop != nil {
			stop()
		}
	})
	return r
}

// reader is an io.ReadSeeker over a blob still downloading, so an HTTP
// layer can answer Range and conditional requests from it.
type reader struct {
	d        *download
	off      int64
	pos      int64     // where this reader last read; a relay's window waits for it
	moved    time.Time // when pos last changed
	evicted  bool      // relaying: dropped for holding the window back too long
	canceled bool
	copying  bool // between available and the end of readSpan's copy out of the ring
	stop     func() bool
	closed   bool
	err      error    // what ended reading early, if anything
	file     *os.File // own open file for sendfile, see sendTo
}

// span is where the bytes past a reader's offset are: [off, end) may be
// read, from the file below fileEnd and from the ring above it.
type span struct {
	end, fileEnd int64
}

// available blocks until bytes past r.off may be read; io.EOF at the end
// of a verified blob.
func (r *reader) available() (span, error) {
	d := r.d
	d.mu.Lock()
	defer d.mu.Unlock()
	r.copying = false
	for {
		if d.err != nil {
			return span{}, errDownloadFailed
		}
		if r.canceled {
			return span{}, context.Canceled
		}
		if r.evicted {
			return span{}, errRelayStalled
		}
		fileEnd := d.written
		if d.relaying {
			fileEnd = d.fileEnd
			if r.off >= fileEnd && r.off < d.base {
				return span{}, errRelayStalled
			}
		}
		// Tracked before a relay starts too, so a disk filling mid-download
		// finds every reader's place.
		if r.pos != r.off {
			r.pos, r.moved = r.off, time.Now()
			if d.relaying {
				d.cond.Broadcast() // the window may move now
			}
		}
		end := d.written
		if !d.done {
			end-- // hold back the last byte until the digest is verified
		}
		if r.off < end {
			r.copying = d.relaying && r.off >= fileEnd
			return span{end: end, fileEnd: fileEnd}, nil
		}
		if d.done {
			return span{}, io.EOF
		}
		d.cond.Wait()
	}
}

func (r *reader) failed(err error) error {
	if err != nil && err != io.EOF && r.err == nil {
		r.err = err
	}
	return err
}

func (r *reader) Read(p []byte) (int, error) {
	s, err := r.available()
	if err != nil {
		return 0, r.failed(err)
	}
	return r.readSpan(p, s)
}

// readSpan reads into p from the span available returned.
func (r *reader) readSpan(p []byte, s span) (int, error) {
	if r.off < s.fileEnd {
		n := min(int64(len(p)), s.end-r.off, s.fileEnd-r.off)
		m, err := r.d.rf.ReadAt(p[:n], r.off)
		r.off += int64(m)
		if err == io.EOF && m > 0 {
			err = nil
		}
		return m, r.failed(err)
	}
	// The window keeps [r.pos, r.pos+len(ring)) intact while r.copying,
	// even once the reader's caller has gone, and r.pos is r.off.
	n := min(int64(len(p)), s.end-r.off)
	d := r.d
	ring := d.ring
	at := r.off % int64(len(ring))
	m := copy(p[:n], ring[at:])
	m += copy(p[m:n], ring)
	r.off += int64(m)
	d.mu.Lock()
	r.copying = false
	d.mu.Unlock()
	d.cond.Broadcast() // the window may wait for this copy
	return m, nil
}

// sendTo writes up to limit bytes to w as they become available. What is
// in the file goes out as an *os.File section so the connection can use
// sendfile, as for cached blobs: many clients streaming one download then
// cost little more CPU than serving it hot.
func (r *reader) sendTo(w io.Writer, limit int64) (int64, error) {
	if r.file == nil && r.d.rf != nil {
		// An open file of its own, for an offset of its own: sendfile reads
		// from the file's position. /proc finds the temp file even after
		// it was renamed into the cache or unlinked.
		if f, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", r.d.rf.Fd())); err == nil {
			r.file = f
		}
	}
	var sent int64
	for sent < limit {
		s, err := r.available()
		if err == io.EOF {
			return sent, nil
		}
		if err != nil {
			return sent, r.failed(err)
		}
		var n int64
		if r.off < s.fileEnd && r.file != nil {
			if _, err := r.file.Seek(r.off, io.SeekStart); err != nil {
				return sent, r.failed(err)
			}
			n, err = io.Copy(w, &io.LimitedReader{R: r.file, N: min(s.end, s.fileEnd, r.off+limit-sent) - r.off})
			r.off += n
		} else {
			n, err = io.Copy(w, struct{ io.Reader }{io.LimitReader(r, min(s.end-r.off, limit-sent))})
		}
		sent += n
		if err != nil {
			return sent, r.failed(err)
		}
		if n == 0 {
			return sent, r.failed(io.ErrUnexpectedEOF)
		}
	}
	return sent, nil
}

func (r *reader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += r.off
	case io.SeekEnd:
		if r.d.size < 0 {
			return 0, errors.New("size unknown")
		}
		offset += r.d.size
	}
	if offset < 0 {
		return 0, errors.New("negative offset")
	}
	r.off = offset
	return offset, nil
}

// Close leaves the download; the last reader out of a finished download
// closes it.
func (r *reader) Close() error {
	if r.closed {
		return nil
	}
	r.closed = true
	r.stop()
	if r.file != nil {
		r.file.Close()
	}
	d := r.d
	d.mu.Lock()
	delete(d.members, r)
	last := len(d.members) == 0 && d.done
	relaying := d.relaying
	stop := d.abandonLocked()
	d.mu.Unlock()
	if relaying {
		d.cond.Broadcast() // the window may have waited for this reader
	}
	if stop != nil {
		stop()
	}
	if last {
		d.close()
	}
	return nil
}

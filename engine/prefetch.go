package engine

import (
	"context"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/storage"
)

// Prefetch puts blob d of repo into the local cache, through the same
// shared download a client would join (so the fleet still fetches it once),
// sending its bytes nowhere. It returns once the blob is on disk. With a
// non-zero pinUntil the blob is kept from eviction until then (a later
// Prefetch may extend it). A disk with no room for the blob is KindNoSpace.
func (e *Engine) Prefetch(ctx context.Context, repo Repo, d digest.Digest, pinUntil time.Time) error {
	return e.PrefetchWith(ctx, repo, d, PrefetchOptions{PinUntil: pinUntil})
}

// PrefetchOptions tune one PrefetchWith.
type PrefetchOptions struct {
	// PinUntil keeps the blob from eviction until then; zero: no pin.
	PinUntil time.Time
	// FromHolder says another host is probably fetching the blob right
	// now (a pre-warm's nodes while its first node fills the bucket): a
	// download this call starts reads the blob's lease first and streams
	// from its holder, one bucket request where a miss, a failed lease
	// write and that read are three. Without a live holder it goes on as
	// usual.
	FromHolder bool
	// Holder is a berth BlobHolder named for another blob of the same
	// work (a pre-warm job whose blobs one node fetches): with FromHolder
	// the blob is asked of it first, with no bucket request at all; one
	// that has neither the blob nor its download sends this call the
	// FromHolder way.
	Holder string
	// Started, if set, is called once, when the blob's download has its
	// source (bytes flow) or the blob is found on disk.
	Started func()
}

// PrefetchWith is Prefetch with options.
func (e *Engine) PrefetchWith(ctx context.Context, repo Repo, d digest.Digest, o PrefetchOptions) error {
	key := storage.Key{Upstream: repo.Upstream, Digest: d}
	var once sync.Once
	started := func() {
		if o.Started != nil {
			once.Do(o.Started)
		}
	}
	for range 3 {
		if _, ok := e.local.HasBlob(key); ok {
			if e.pins.pin(key, o.PinUntil) {
				started()
				return nil
			}
			continue // evicted between the check and the pin
		}
		up, err := e.upstreamOf(repo)
		if err != nil {
			return err
		}
		hint := holderHint{lookup: o.FromHolder}
		if o.FromHolder {
			hint.holder = o.Holder
		}
		dl, _, err := e.join(ctx, key, up, repo.Name, false, hint)
		if err == errCachedMeanwhile {
			continue
		}
		if err != nil {
			return err
		}
		select {
		case <-dl.started:
			started()
		case <-ctx.Done():
			return ctx.Err()
		}
		select {
		case <-dl.finished:
		case <-ctx.Done():
			return ctx.Err()
		}
		dl.mu.Lock()
		err, relaying := dl.err, dl.relaying
		dl.mu.Unlock()
		if relaying {
			return &Error{Kind: KindNoSpace, Msg: "no room on this host's disk for blob " + d.String()}
		}
		if err != nil {
			return err
		}
	}
	return &Error{Kind: KindInternal, Msg: "blob " + d.String() + " kept vanishing from the cache"}
}

// BlobHolder names the berth (its advertised URL) that holds blob d's
// fleet lease, fetching it now, with one bucket read; "" when none does,
// the holder advertises no URL, or this host has no bucket.
func (e *Engine) BlobHolder(ctx context.Context, repo Repo, d digest.Digest) string {
	b := e.fleet.use()
	if b == nil {
		return ""
	}
	return e.leaseHolderURL(ctx, b, storage.Key{Upstream: repo.Upstream, Digest: d})
}

// pinSet holds the pins Prefetch made, each until its time.
type pinSet struct {
	local *storage.Local
	mu    sync.Mutex
	pins  map[storage.Key]*pin
}

type pin struct {
	until   time.Time
	release func()
	timer   *time.Timer
}

func newPinSet(l *storage.Local) *pinSet {
	return &pinSet{local: l, pins: map[storage.Key]*pin{}}
}

// pin keeps key until until (zero: not at all); false when the blob is
// no longer cached.
func (s *pinSet) pin(key storage.Key, until time.Time) bool {
	if until.IsZero() {
		_, ok := s.local.HasBlob(key)
		return ok
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if p, ok := s.pins[key]; ok {
		if until.After(p.until) {
			p.until = until
			p.timer.Reset(time.Until(until))
		}
		return true
	}
	release, ok := s.local.Pin(key)
	if !ok {
		return false
	}
	p := &pin{until: until, release: release}
	p.timer = time.AfterFunc(time.Until(until), func() { s.unpin(key, p) })
	s.pins[key] = p
	return true
}

func (s *pinSet) unpin(key storage.Key, p *pin) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pins[key] != p || time.Now().Before(p.until) {
		return // extended: its timer was reset
	}
	delete(s.pins, key)
	p.release()
}

// Pinned lists the blobs Prefetch pinned and until when.
func (e *Engine) Pinned() map[storage.Key]time.Time {
	e.pins.mu.Lock()
	defer e.pins.mu.Unlock()
	out := make(map[storage.Key]time.Time, len(e.pins.pins))
	for k, p := range e.pins.pins {
		out[k] = p.until
	}
	return out
}

func (s *pinSet) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, p := range s.pins {
		p.timer.Stop()
		p.release()
		delete(s.pins, k)
	}
}

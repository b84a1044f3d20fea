package engine

import (
	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/storage"
)

// Unpin releases, before its time, a pin Prefetch made on blob d of repo;
// it does nothing when the blob is not pinned. Pre-warm calls it when a
// job that pinned some of an image's blobs fails on others, so that
// nothing is left half-pinned. The pin set itself is in memory; pre-warm
// keeps the pins durable and re-applies them with Prefetch at start.
func (e *Engine) Unpin(repo Repo, d digest.Digest) {
	key := storage.Key{Upstream: repo.Upstream, Digest: d}
	e.pins.mu.Lock()
	defer e.pins.mu.Unlock()
	p, ok := e.pins.pins[key]
	if !ok {
		return
	}
	p.timer.Stop()
	delete(e.pins.pins, key)
	p.release()
}

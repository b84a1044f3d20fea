package engine

import (
	"time"

	"github.com/opencontainers/go-digest"
)

// EventKind says what happened in the cache.
type EventKind string

const (
	// ManifestStored: a manifest was stored on this host's disk (fetched
	// from the upstream or read from the bucket).
	ManifestStored EventKind = "manifest_stored"
	// TagChanged: a revalidation found a tag pointing at another digest,
	// or a tag seen for the first time (Old empty).
	TagChanged EventKind = "tag_changed"
	// BlobCached: a blob was verified and committed to this host's disk.
	BlobCached EventKind = "blob_cached"
	// BlobEvicted: a blob left this host's disk to keep within the budget.
	// Repo.Name is empty: the cache is keyed by upstream and digest only.
	BlobEvicted EventKind = "blob_evicted"
)

// Event is one change in the cache. Fields that do not apply to a kind
// are empty.
type Event struct {
	Kind      EventKind
	Repo      Repo
	Tag       string
	Digest    digest.Digest // the manifest, the blob, or a tag's new digest
	Old       digest.Digest // TagChanged: the digest the tag had
	MediaType string
	Size      int64
	Time      time.Time
	// FromBucket, on ManifestStored: the manifest was read from the bucket,
	// so another host fetched it from the upstream (and inspects it for the
	// fleet); false: this host fetched it.
	FromBucket bool
}

// Subscribe returns the engine's events from now on. The engine never
// waits for a subscriber: when its buffer is full, events are dropped and
// counted (berth_events_dropped_total). cancel ends the subscription and
// closes the channel.
func (e *Engine) Subscribe(buffer int) (events <-chan Event, cancel func()) {
	ch := make(chan Event, max(buffer, 1))
	e.subMu.Lock()
	e.subs[ch] = struct{}{}
	e.subMu.Unlock()
	return ch, func() {
		e.subMu.Lock()
		defer e.subMu.Unlock()
		if _, ok := e.subs[ch]; ok {
			delete(e.subs, ch)
			close(ch)
		}
	}
}

func (e *Engine) publish(ev Event) {
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	e.subMu.Lock()
	defer e.subMu.Unlock()
	for ch := range e.subs {
		select {
		case ch <- ev:
		default:
			e.metrics.eventsDropped.Inc()
		}
	}
}

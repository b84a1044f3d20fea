package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/storage"
)

// maxManifestSize bounds what berth reads as a manifest (the spec's 4 MiB).
const maxManifestSize = 4 << 20

// upstreamFetchTimeout bounds a manifest fetch that nobody waits on any more.
const upstreamFetchTimeout = 60 * time.Second

// Manifest is a manifest as the engine serves it.
type Manifest struct {
	Digest    digest.Digest
	MediaType string
	Content   []byte
	// Stale, when set, says why the last known digest of a tag is served
	// without the upstream confirming it (stale-if-error).
	Stale string
}

// call is one piece of background work shared by every caller asking for
// the same key.
type call struct {
	done    chan struct{}
	started time.Time
	val     any
	err     error
}

// background runs fn once for every caller asking with the same key, on a
// context of its own bounded by upstreamFetchTimeout: a caller that stops
// waiting does not cancel it, and Close waits for it.
func (e *Engine) background(key string, fn func(ctx context.Context) (any, error)) *call {
	e.bgMu.Lock()
	if c, ok := e.bg[key]; ok {
		e.bgMu.Unlock()
		return c
	}
	c := &call{done: make(chan struct{}), started: time.Now()}
	e.bg[key] = c
	e.bgMu.Unlock()
	e.goBackground(func() {
		ctx, cancel := context.WithTimeout(e.life, upstreamFetchTimeout)
		c.val, c.err = fn(ctx)
		cancel()
		e.bgMu.Lock()
		delete(e.bg, key)
		e.bgMu.Unlock()
		close(c.done)
	})
	return c
}

// Manifest returns the manifest ref (a tag or a digest) of repo. accept
// is the caller's list of media types (HTTP Accept values; empty admits
// any). A tag is trusted for tag_ttl, then revalidated; when the upstream
// cannot answer within stale_timeout (or fails), the last known digest is
// served with Stale set.
func (e *Engine) Manifest(ctx context.Context, repo Repo, ref string, accept []string) (Manifest, error) {
	if !strings.Contains(ref, ":") {
		return e.manifestByTag(ctx, repo, ref, accept)
	}
	d, err := digest.Parse(ref)
	if err != nil {
		return Manifest{}, &Error{Kind: KindInvalidReference, Msg: err.Error()}
	}
	return e.manifestByDigest(ctx, repo, d)
}

func (e *Engine) manifestByTag(ctx context.Context, repo Repo, tag string, accept []string) (Manifest, error) {
	cfg, _ := e.config()
	rec, err := e.local.GetTag(repo.Upstream, repo.Name, tag)
	have := err == nil
	if have && time.Since(rec.Checked) < cfg.TagTTL.D() {
		if m, ok, err := e.tagManifest(ctx, repo, tag, rec.Digest, accept); ok {
			e.metrics.lookups.WithLabelValues("manifest", "hit").Inc()
			return m, err
		}
		have = false
	}
	if have {
		if _, err := e.local.GetManifest(storage.Key{Upstream: repo.Upstream, Digest: rec.Digest}); err != nil {
			have = false
		}
	}
	// The refresh runs on its own context: if this caller stops waiting (the
	// stale timeout) the answer still lands in the cache for the next one.
	c := e.background("tag\x00"+repo.Upstream+"\x00"+repo.Name+"\x00"+tag, func(ctx context.Context) (any, error) {
		return e.refreshTag(ctx, repo, tag, rec, have)
	})
	var stale <-chan time.Time
	if have {
		wait := cfg.StaleTimeout.D()
		if time.Since(c.started) > wait {
			// Someone already waited out the stale timeout on this
			// revalidation: the upstream is stuck, don't make every caller wait.
			wait = 0
		}
		timer := time.NewTimer(wait)
		defer timer.Stop()
		stale = timer.C
	}
	select {
	case <-c.done:
		if c.err == nil {
			e.metrics.lookups.WithLabelValues("manifest", "miss").Inc()
			m, ok, err := e.tagManifest(ctx, repo, tag, c.val.(storage.TagRecord).Digest, accept)
			if !ok {
				return Manifest{}, &Error{Kind: KindInternal, Msg: "manifest could not be stored"}
			}
			return m, err
		}
		ue, ok := asUpstreamError(c.err)
		if have && (!ok || ue.Unavailable()) {
			return e.staleManifest(ctx, repo, tag, rec, accept, c.err.Error())
		}
		return Manifest{}, c.err
	case <-stale:
		return e.staleManifest(ctx, repo, tag, rec, accept, "upstream did not answer within "+cfg.StaleTimeout.String())
	case <-ctx.Done():
		return Manifest{}, ctx.Err()
	}
}

// staleManifest answers with the last known digest when the upstream
// cannot confirm it, and says so.
func (e *Engine) staleManifest(ctx context.Context, repo Repo, tag string, rec storage.TagRecord, accept []string, why string) (Manifest, error) {
	e.metrics.staleServes.WithLabelValues(repo.Upstream).Inc()
	e.metrics.lookups.WithLabelValues("manifest", "hit").Inc()
	e.log.WithFields(logrus.Fields{"upstream": repo.Upstream, "repo": repo.Name, "tag": tag, "reason": why}).Warn("serving stale tag")
	m, ok, err := e.tagManifest(ctx, repo, tag, rec.Digest, accept)
	if !ok {
		return Manifest{}, &Error{Kind: KindUnavailable, Msg: why}
	}
	m.Stale = why
	return m, err
}

// refreshTag asks the upstream what a tag points at now: a HEAD when berth
// already knows a digest (Docker Hub does not count HEADs against its pull
// limit), a GET when the digest changed or was never seen.
func (e *Engine) refreshTag(ctx context.Context, repo Repo, tag string, rec storage.TagRecord, have bool) (storage.TagRecord, error) {
	cfg, _ := e.config()
	fresh, known, lease := e.fleet.tag(ctx, repo, tag, cfg.TagTTL.D())
	if fresh != nil {
		// Another host asked the upstream within the TTL: its answer stands for the fleet.
		e.recordTag(repo, tag, rec, have, *fresh)
		return *fresh, nil
	}
	if lease != nil {
		defer lease.Release(context.WithoutCancel(ctx))
	}
	if known != nil && (!have || known.Checked.After(rec.Checked)) {
		key := storage.Key{Upstream: repo.Upstream, Digest: known.Digest}
		if _, err := e.local.GetManifest(key); err == nil || e.fleet.manifest(ctx, repo, key) {
			rec, have = *known, true
		}
	}
	next, err := e.askUpstreamTag(ctx, repo, tag, rec, have)
	if err != nil {
		return rec, err
	}
	e.recordTag(repo, tag, rec, have, next)
	e.fleet.putTag(ctx, repo, tag, next)
	return next, nil
}

// recordTag stores what the fleet or the upstream said of a tag, and
// publishes a change of its digest.
func (e *Engine) recordTag(repo Repo, tag string, prev storage.TagRecord, had bool, next storage.TagRecord) {
	if err := e.local.PutTag(repo.Upstream, repo.Name, tag, next); err != nil {
		e.log.WithError(err).Warn("could not record tag")
	}
	if !had || prev.Digest != next.Digest {
		old := digest.Digest("")
		if had {
			old = prev.Digest
		}
		e.publish(Event{Kind: TagChanged, Repo: repo, Tag: tag, Digest: next.Digest, Old: old, MediaType: next.MediaType, Size: next.Size})
	}
}

func (e *Engine) askUpstreamTag(ctx context.Context, repo Repo, tag string, rec storage.TagRecord, have bool) (storage.TagRecord, error) {
	up, err := e.upstreamOf(repo)
	if err != nil {
		return rec, err
	}
	if have {
		resp, err := e.upstreamDo(ctx, up, repo.Name, "manifest", http.MethodHead, up.url(repo.Name, "manifests", tag), http.Header{"Accept": {manifestAccept}})
		if err != nil {
			return rec, err
		}
		resp.Body.Close()
		if resp.Header.Get("Docker-Content-Digest") == rec.Digest.String() {
			rec.Checked = time.Now()
			return rec, nil
		}
	}
	m, err := e.fetchManifest(ctx, repo, tag, manifestAccept, "")
	if err != nil {
		return rec, err
	}
	return storage.TagRecord{Digest: m.Digest, MediaType: m.MediaType, Size: int64(len(m.Content)), Checked: time.Now()}, nil
}

// fetchManifest GETs a manifest, verifies it against want (a digest
// reference) or the upstream's Docker-Content-Digest, and stores it.
func (e *Engine) fetchManifest(ctx context.Context, repo Repo, ref, accept string, want digest.Digest) (Manifest, error) {
	up, err := e.upstreamOf(repo)
	if err != nil {
		return Manifest{}, err
	}
	resp, err := e.upstreamDo(ctx, up, repo.Name, "manifest", http.MethodGet, up.url(repo.Name, "manifests", ref), http.Header{"Accept": {accept}})
	if err != nil {
		return Manifest{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	if err != nil {
		return Manifest{}, &UpstreamError{Host: up.host, err: err}
	}
	if len(body) > maxManifestSize {
		return Manifest{}, fmt.Errorf("upstream %s sent a manifest over 4 MiB", up.host)
	}
	// Without a digest to check against (a tag whose answer lacks
	// Docker-Content-Digest) any body hashes to itself: a proxy's error page
	// must not become the tag's manifest.
	if !json.Valid(body) {
		return Manifest{}, &UpstreamError{Host: up.host, err: fmt.Errorf("manifest %s is not JSON (Content-Type %q)", ref, resp.Header.Get("Content-Type"))}
	}
	if want == "" {
		if hd, err := digest.Parse(resp.Header.Get("Docker-Content-Digest")); err == nil {
			want = hd
		} else {
			want = digest.FromBytes(body)
		}
	}
	if !want.Algorithm().Available() || want.Algorithm().FromBytes(body) != want {
		e.metrics.mismatches.WithLabelValues("upstream").Inc()
		return Manifest{}, fmt.Errorf("manifest %s: %w", want, storage.ErrDigestMismatch)
	}
	m := storage.Manifest{MediaType: manifestMediaType(resp.Header.Get("Content-Type"), body), Content: body}
	key := storage.Key{Upstream: up.host, Digest: want}
	if err := e.storeManifest(repo, key, m, false); err != nil {
		e.log.WithError(err).Warn("could not cache manifest")
	}
	e.fleet.putManifest(ctx, key, m)
	return Manifest{Digest: want, MediaType: m.MediaType, Content: body}, nil
}

// storeManifest keeps a verified manifest on disk and says so to subscribers.
func (e *Engine) storeManifest(repo Repo, key storage.Key, m storage.Manifest, fromBucket bool) error {
	if err := e.local.PutManifest(key, m); err != nil {
		return err
	}
	e.publish(Event{Kind: ManifestStored, Repo: repo, Digest: key.Digest, MediaType: m.MediaType, Size: int64(len(m.Content)), FromBucket: fromBucket})
	return nil
}

// manifestMediaType prefers the manifest's own mediaType field over a
// generic Content-Type some registries send.
func manifestMediaType(header string, body []byte) string {
	var probe struct {
		MediaType string `json:"mediaType"`
	}
	if json.Unmarshal(body, &probe) == nil && probe.MediaType != "" {
		return probe.MediaType
	}
	if mt, _, err := mime.ParseMediaType(header); err == nil && mt != "" && mt != "application/json" && mt != "text/plain" {
		return mt
	}
	return "application/vnd.oci.image.manifest.v1+json"
}

func (e *Engine) manifestByDigest(ctx context.Context, repo Repo, d digest.Digest) (Manifest, error) {
	key := storage.Key{Upstream: repo.Upstream, Digest: d}
	if m, err := e.local.GetManifest(key); err == nil {
		e.metrics.lookups.WithLabelValues("manifest", "hit").Inc()
		return Manifest{Digest: d, MediaType: m.MediaType, Content: m.Content}, nil
	}
	e.metrics.lookups.WithLabelValues("manifest", "miss").Inc()
	// Manifests by digest are immutable: once fetched they are never revalidated.
	c := e.background("digest\x00"+key.String(), func(ctx context.Context) (any, error) {
		if e.fleet.manifest(ctx, repo, key) {
			return nil, nil
		}
		_, err := e.fetchManifest(ctx, repo, d.String(), manifestAccept, d)
		return nil, err
	})
	select {
	case <-c.done:
		if c.err != nil {
			return Manifest{}, c.err
		}
		m, err := e.local.GetManifest(key)
		if err != nil {
			return Manifest{}, &Error{Kind: KindInternal, Msg: "manifest could not be stored"}
		}
		return Manifest{Digest: d, MediaType: m.MediaType, Content: m.Content}, nil
	case <-ctx.Done():
		return Manifest{}, ctx.Err()
	}
}

// tagManifest returns what a tag points at, honouring the caller's
// Accept: berth asks upstreams with every manifest type it knows, so a
// caller that accepts fewer (an old client that cannot read an index)
// gets what the upstream gives for its own Accept, fetched for it and kept
// by digest. ok is false when d is not on disk.
func (e *Engine) tagManifest(ctx context.Context, repo Repo, tag string, d digest.Digest, accept []string) (m Manifest, ok bool, err error) {
	sm, err := e.local.GetManifest(storage.Key{Upstream: repo.Upstream, Digest: d})
	if err != nil {
		return Manifest{}, false, nil
	}
	if !acceptable(accept, sm.MediaType) {
		ctx, cancel := context.WithTimeout(ctx, upstreamFetchTimeout)
		defer cancel()
		m, err := e.fetchManifest(ctx, repo, tag, strings.Join(accept, ", "), "")
		return m, true, err
	}
	return Manifest{Digest: d, MediaType: sm.MediaType, Content: sm.Content}, true, nil
}

// acceptable reports whether the Accept values admit mediaType; none at
// all admits anything.
func acceptable(accept []string, mediaType string) bool {
	if len(accept) == 0 {
		return true
	}
	for _, v := range accept {
		for _, part := range strings.Split(v, ",") {
			mt, _, err := mime.ParseMediaType(strings.TrimSpace(part))
			if err == nil && (mt == mediaType || mt == "*/*" || mt == "application/*") {
				return true
			}
		}
	}
	return false
}

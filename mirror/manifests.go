package mirror

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"

	v2 "github.com/distribution/distribution/v3/registry/api/v2"
	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"
	"golang.org/x/sync/singleflight"

	"github.com/berth-dev/berth/storage"
)

// maxManifestSize bounds what berth reads as a manifest (the spec's 4 MiB).
const maxManifestSize = 4 << 20

// upstreamFetchTimeout bounds a manifest fetch that nobody waits on any more.
const upstreamFetchTimeout = 60 * time.Second

// background runs fn once for every caller asking with the same key, on a
// context of its own bounded by upstreamFetchTimeout: a caller that stops
// waiting does not cancel it, and Close waits for it.
func (s *Server) background(key string, fn func(ctx context.Context) (any, error)) <-chan singleflight.Result {
	return s.revalidate.DoChan(key, func() (any, error) {
		s.wg.Add(1)
		defer s.wg.Done()
		s.revalStarted.Store(key, time.Now())
		defer s.revalStarted.Delete(key)
		ctx, cancel := context.WithTimeout(s.downloadCtx, upstreamFetchTimeout)
		defer cancel()
		return fn(ctx)
	})
}

func (s *Server) serveManifestByTag(w http.ResponseWriter, r *http.Request, t target, tag string) {
	cfg, _ := s.config()
	rec, err := s.local.GetTag(t.up.host, t.repo, tag)
	have := err == nil
	if have && time.Since(rec.Checked) < cfg.TagTTL.D() {
		if s.serveTagManifest(w, r, t, tag, rec.Digest) {
			s.metrics.lookups.WithLabelValues("manifest", "hit").Inc()
			return
		}
		have = false
	}
	if have {
		if _, err := s.local.GetManifest(storage.Key{Upstream: t.up.host, Digest: rec.Digest}); err != nil {
			have = false
		}
	}
	// The refresh runs on its own context: if this client stops waiting (the
	// stale timeout) the answer still lands in the cache for the next one.
	key := "tag\x00" + t.up.host + "\x00" + t.repo + "\x00" + tag
	ch := s.background(key, func(ctx context.Context) (any, error) {
		return s.refreshTag(ctx, t, tag, rec, have)
	})
	var stale <-chan time.Time
	if have {
		wait := cfg.StaleTimeout.D()
		if started, ok := s.revalStarted.Load(key); ok && time.Since(started.(time.Time)) > wait {
			// Someone already waited out the stale timeout on this
			// revalidation: the upstream is stuck, don't make every client wait.
			wait = 0
		}
		timer := time.NewTimer(wait)
		defer timer.Stop()
		stale = timer.C
	}
	select {
	case res := <-ch:
		if res.Err == nil {
			s.metrics.lookups.WithLabelValues("manifest", "miss").Inc()
			if !s.serveTagManifest(w, r, t, tag, res.Val.(storage.TagRecord).Digest) {
				s.upstreamFailure(w, errors.New("manifest could not be stored"), v2.ErrorCodeManifestUnknown)
			}
			return
		}
		ue, ok := asUpstreamError(res.Err)
		if have && (!ok || ue.unavailable()) {
			s.serveStale(w, r, t, tag, rec, res.Err.Error())
			return
		}
		s.upstreamFailure(w, res.Err, v2.ErrorCodeManifestUnknown)
	case <-stale:
		s.serveStale(w, r, t, tag, rec, "upstream did not answer within "+cfg.StaleTimeout.String())
	case <-r.Context().Done():
	}
}

// serveStale answers with the last known digest when the upstream cannot
// confirm it, and says so.
func (s *Server) serveStale(w http.ResponseWriter, r *http.Request, t target, tag string, rec storage.TagRecord, why string) {
	s.metrics.staleServes.WithLabelValues(t.up.host).Inc()
	s.metrics.lookups.WithLabelValues("manifest", "hit").Inc()
	s.log.WithFields(logrus.Fields{"upstream": t.up.host, "repo": t.repo, "tag": tag, "reason": why}).Warn("serving stale tag")
	w.Header().Set("Warning", `110 berth "Response is Stale"`)
	w.Header().Set("Berth-Stale", "true")
	if !s.serveTagManifest(w, r, t, tag, rec.Digest) {
		s.upstreamFailure(w, errors.New(why), v2.ErrorCodeManifestUnknown)
	}
}

// refreshTag asks the upstream what a tag points at now: a HEAD when berth
// already knows a digest (Docker Hub does not count HEADs against its pull
// limit), a GET when the digest changed or was never seen.
func (s *Server) refreshTag(ctx context.Context, t target, tag string, rec storage.TagRecord, have bool) (storage.TagRecord, error) {
	cfg, _ := s.config()
	fresh, known, lease := s.sharedTag(ctx, t, tag, cfg.TagTTL.D())
	if fresh != nil {
		// Another host asked the upstream within the TTL: its answer stands for the fleet.
		if err := s.local.PutTag(t.up.host, t.repo, tag, *fresh); err != nil {
			s.log.WithError(err).Warn("could not record tag")
		}
		return *fresh, nil
	}
	if lease != nil {
		defer lease.Release(context.WithoutCancel(ctx))
	}
	if known != nil && (!have || known.Checked.After(rec.Checked)) {
		key := storage.Key{Upstream: t.up.host, Digest: known.Digest}
		if _, err := s.local.GetManifest(key); err == nil || s.sharedManifest(ctx, key) {
			rec, have = *known, true
		}
	}
	rec, err := s.askUpstreamTag(ctx, t, tag, rec, have)
	if err == nil {
		s.putSharedTag(ctx, t, tag, rec)
	}
	return rec, err
}

func (s *Server) askUpstreamTag(ctx context.Context, t target, tag string, rec storage.TagRecord, have bool) (storage.TagRecord, error) {
	if have {
		resp, err := s.upstreamDo(ctx, t.up, t.repo, "manifest", http.MethodHead, t.up.url(t.repo, "manifests", tag), http.Header{"Accept": {manifestAccept}})
		if err != nil {
			return rec, err
		}
		resp.Body.Close()
		if resp.Header.Get("Docker-Content-Digest") == rec.Digest.String() {
			rec.Checked = time.Now()
			if err := s.local.PutTag(t.up.host, t.repo, tag, rec); err != nil {
				s.log.WithError(err).Warn("could not record tag")
			}
			return rec, nil
		}
	}
	key, m, err := s.fetchManifest(ctx, t, tag, manifestAccept, "")
	if err != nil {
		return rec, err
	}
	rec = storage.TagRecord{Digest: key.Digest, MediaType: m.MediaType, Size: int64(len(m.Content)), Checked: time.Now()}
	if err := s.local.PutTag(t.up.host, t.repo, tag, rec); err != nil {
		s.log.WithError(err).Warn("could not record tag")
	}
	return rec, nil
}

// fetchManifest GETs a manifest, verifies it against want (a digest
// reference) or the upstream's Docker-Content-Digest, and stores it.
func (s *Server) fetchManifest(ctx context.Context, t target, ref, accept string, want digest.Digest) (storage.Key, storage.Manifest, error) {
	resp, err := s.upstreamDo(ctx, t.up, t.repo, "manifest", http.MethodGet, t.up.url(t.repo, "manifests", ref), http.Header{"Accept": {accept}})
	if err != nil {
		return storage.Key{}, storage.Manifest{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	if err != nil {
		return storage.Key{}, storage.Manifest{}, &upstreamError{host: t.up.host, err: err}
	}
	if len(body) > maxManifestSize {
		return storage.Key{}, storage.Manifest{}, fmt.Errorf("upstream %s sent a manifest over 4 MiB", t.up.host)
	}
	// Without a digest to check against (a tag whose answer lacks
	// Docker-Content-Digest) any body hashes to itself: a proxy's error page
	// must not become the tag's manifest.
	if !json.Valid(body) {
		return storage.Key{}, storage.Manifest{}, &upstreamError{host: t.up.host, err: fmt.Errorf("manifest %s is not JSON (Content-Type %q)", ref, resp.Header.Get("Content-Type"))}
	}
	if want == "" {
		if hd, err := digest.Parse(resp.Header.Get("Docker-Content-Digest")); err == nil {
			want = hd
		} else {
			want = digest.FromBytes(body)
		}
	}
	if !want.Algorithm().Available() || want.Algorithm().FromBytes(body) != want {
		s.metrics.mismatches.WithLabelValues("upstream").Inc()
		return storage.Key{}, storage.Manifest{}, fmt.Errorf("manifest %s: %w", want, storage.ErrDigestMismatch)
	}
	m := storage.Manifest{MediaType: manifestMediaType(resp.Header.Get("Content-Type"), body), Content: body}
	key := storage.Key{Upstream: t.up.host, Digest: want}
	if err := s.local.PutManifest(key, m); err != nil {
		s.log.WithError(err).Warn("could not cache manifest")
	}
	s.putSharedManifest(ctx, key, m)
	return key, m, nil
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

func (s *Server) serveManifestByDigest(w http.ResponseWriter, r *http.Request, t target, d digest.Digest) {
	key := storage.Key{Upstream: t.up.host, Digest: d}
	if s.serveStoredManifest(w, r, t, d) {
		s.metrics.lookups.WithLabelValues("manifest", "hit").Inc()
		return
	}
	s.metrics.lookups.WithLabelValues("manifest", "miss").Inc()
	// Manifests by digest are immutable: once fetched they are never revalidated.
	ch := s.background("digest\x00"+key.String(), func(ctx context.Context) (any, error) {
		if s.sharedManifest(ctx, key) {
			return nil, nil
		}
		_, _, err := s.fetchManifest(ctx, t, d.String(), manifestAccept, d)
		return nil, err
	})
	select {
	case res := <-ch:
		if res.Err != nil {
			s.upstreamFailure(w, res.Err, v2.ErrorCodeManifestUnknown)
			return
		}
		if !s.serveStoredManifest(w, r, t, d) {
			s.upstreamFailure(w, errors.New("manifest could not be stored"), v2.ErrorCodeManifestUnknown)
		}
	case <-r.Context().Done():
	}
}

// serveTagManifest serves what a tag points at, honouring the client's
// Accept: berth asks upstreams with every manifest type it knows, so a
// client that accepts fewer (an old one that cannot read an index) gets what
// the upstream gives for its own Accept, fetched for it and kept by digest.
func (s *Server) serveTagManifest(w http.ResponseWriter, r *http.Request, t target, tag string, d digest.Digest) bool {
	m, err := s.local.GetManifest(storage.Key{Upstream: t.up.host, Digest: d})
	if err != nil {
		return false
	}
	if !acceptable(r, m.MediaType) {
		ctx, cancel := context.WithTimeout(r.Context(), upstreamFetchTimeout)
		defer cancel()
		key, alt, err := s.fetchManifest(ctx, t, tag, strings.Join(r.Header.Values("Accept"), ", "), "")
		if err != nil {
			s.upstreamFailure(w, err, v2.ErrorCodeManifestUnknown)
			return true
		}
		d, m = key.Digest, alt
	}
	s.writeManifest(w, r, d, m)
	return true
}

// acceptable reports whether the Accept headers admit mediaType; none at
// all admits anything.
func acceptable(r *http.Request, mediaType string) bool {
	values := r.Header.Values("Accept")
	if len(values) == 0 {
		return true
	}
	for _, v := range values {
		for _, part := range strings.Split(v, ",") {
			mt, _, err := mime.ParseMediaType(strings.TrimSpace(part))
			if err == nil && (mt == mediaType || mt == "*/*" || mt == "application/*") {
				return true
			}
		}
	}
	return false
}

// serveStoredManifest answers from the local cache; false on a miss.
func (s *Server) serveStoredManifest(w http.ResponseWriter, r *http.Request, t target, d digest.Digest) bool {
	m, err := s.local.GetManifest(storage.Key{Upstream: t.up.host, Digest: d})
	if err != nil {
		return false
	}
	s.writeManifest(w, r, d, m)
	return true
}

func (s *Server) writeManifest(w http.ResponseWriter, r *http.Request, d digest.Digest, m storage.Manifest) {
	h := w.Header()
	h.Set("Content-Type", m.MediaType)
	h.Set("Docker-Content-Digest", d.String())
	h.Set("ETag", `"`+d.String()+`"`)
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, "", time.Time{}, bytes.NewReader(m.Content))
	s.metrics.bytesServed.WithLabelValues("local").Add(float64(cw.n))
}

package mirror

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/storage"
)

// The fleet tier: a bucket every host reads before the upstream. A host
// takes a lease before fetching a blob or revalidating a tag upstream, so
// the fleet fetches each once; the others wait for the object to appear.
// When the bucket misbehaves berth goes straight to the upstream and tries
// the bucket again after sharedBackoff, so an outage costs the fleet-wide
// dedup and nothing else.

const (
	sharedBackoff  = 10 * time.Second
	tagLeaseTTL    = 30 * time.Second
	maxLeasePoll   = 2 * time.Second
	firstLeasePoll = 100 * time.Millisecond
)

type sharedTier struct {
	store     storage.Shared
	leaseTTL  time.Duration
	downUntil atomic.Int64 // unix nanoseconds; skip the bucket until then
	self      string       // URL other hosts reach this berth at, if any

	requests *prometheus.CounterVec // op
	errors   *prometheus.CounterVec // op
	leases   *prometheus.CounterVec // kind, event: taken, waited, taken_over
	avoided  *prometheus.CounterVec // kind: upstream fetches another host made for this one
	degraded prometheus.Counter
}

// renewer is the optional capability of leases that can be extended while
// a long download runs.
type renewer interface {
	Renew(ctx context.Context) error
}

// tookOver is the optional capability of leases that know they replaced an expired one.
type tookOver interface {
	TookOver() bool
}

// blobStreamer is the optional capability of tiers that can take a blob
// from a stream read once; a host relaying a blob it has no room for
// shares it that way.
type blobStreamer interface {
	PutBlobStream(ctx context.Context, k storage.Key, r io.Reader) error
}

// blobStatter is the optional capability of tiers that can check for a
// blob without opening it; waiting hosts poll with it.
type blobStatter interface {
	StatBlob(ctx context.Context, k storage.Key) (int64, error)
}

func newSharedMetrics(reg prometheus.Registerer) *sharedTier {
	t := &sharedTier{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_s3_requests_total", Help: "Requests sent to the shared S3 tier by operation.",
		}, []string{"op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_s3_errors_total", Help: "Failed requests to the shared S3 tier by operation.",
		}, []string{"op"}),
		leases: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_leases_total", Help: "Fleet leases by kind (blob, tag) and event (taken, waited, taken_over).",
		}, []string{"kind", "event"}),
		avoided: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_fleet_upstream_fetches_avoided_total", Help: "Upstream fetches this host did not make because another host's result was in S3, by kind (blob, manifest, tag).",
		}, []string{"kind"}),
		degraded: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "berth_s3_degraded_total", Help: "Times berth stopped using the S3 tier for a while after it failed.",
		}),
	}
	reg.MustRegister(t.requests, t.errors, t.leases, t.avoided, t.degraded)
	return t
}

// S3RequestHook counts S3 requests and errors; pass it as the tier's OnRequest.
func (s *Server) S3RequestHook() func(op string, err error) {
	return func(op string, err error) {
		s.sharedT.requests.WithLabelValues(op).Inc()
		if err != nil {
			s.sharedT.errors.WithLabelValues(op).Inc()
		}
	}
}

// SetShared puts a fleet tier under the local disk.
func (s *Server) SetShared(store storage.Shared, leaseTTL time.Duration) {
	s.sharedT.store = store
	s.sharedT.leaseTTL = leaseTTL
}

// Advertise sets the URL other hosts reach this berth at. It goes into the
// leases this host takes, so a host waiting on one streams the blob from
// here while it downloads instead of waiting for the upload to the bucket.
func (s *Server) Advertise(url string) {
	s.sharedT.self = strings.TrimSuffix(url, "/")
}

// peerHeader marks a request from another berth: it is answered from this
// host's disk or a download already running, never by starting one, so
// two hosts can never wait on each other.
const peerHeader = "Berth-Peer"

var peerClient = &http.Client{Transport: &http.Transport{
	DialContext:           (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
	ResponseHeaderTimeout: 10 * time.Second,
	MaxIdleConnsPerHost:   16,
}}

// openPeerBlob streams a blob from the lease holder's berth.
func (s *Server) openPeerBlob(ctx context.Context, holder string, key storage.Key, repo string) (source, bool) {
	if !strings.HasPrefix(holder, "http://") && !strings.HasPrefix(holder, "https://") || holder == s.sharedT.self {
		return source{}, false
	}
	u := holder + "/v2/" + repo + "/blobs/" + key.Digest.String() + "?ns=" + url.QueryEscape(key.Upstream)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return source{}, false
	}
	req.Header.Set(peerHeader, "1")
	resp, err := peerClient.Do(req)
	if err != nil {
		return source{}, false
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return source{}, false
	}
	s.sharedT.avoided.WithLabelValues("blob").Inc()
	return source{body: resp.Body, size: resp.ContentLength, label: "peer"}, true
}

// shared returns the fleet tier, or nil when there is none or it is backing off.
func (s *Server) shared() storage.Shared {
	t := s.sharedT
	if t.store == nil || time.Now().UnixNano() < t.downUntil.Load() {
		return nil
	}
	return t.store
}

// sharedFailed backs off from a failing bucket.
func (s *Server) sharedFailed(op string, err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	t := s.sharedT
	if t.downUntil.Swap(time.Now().Add(sharedBackoff).UnixNano()) < time.Now().UnixNano() {
		t.degraded.Inc()
		s.log.WithError(err).WithField("op", op).Warn("S3 tier failing; using the upstream directly for a while")
	}
}

// SharedHealth is the S3 tier's health check around ping: a failed ping
// makes requests skip the bucket too, a successful one ends a backoff early,
// so berth returns to the bucket as soon as it answers again.
func (s *Server) SharedHealth(ping func(context.Context) error) func(context.Context) error {
	return func(ctx context.Context) error {
		if err := ping(ctx); err != nil {
			s.sharedFailed("ping", err)
			return err
		}
		s.sharedT.downUntil.Store(0)
		return nil
	}
}

// openBlobSource finds a blob for a flight: the bucket, else the upstream
// under the fleet's lease, else (lease held elsewhere) the holder's berth
// when it advertises a URL, else the bucket once the holder has put it there.
func (s *Server) openBlobSource(ctx context.Context, key storage.Key, up *upstream, repo string) (source, error) {
	sh := s.shared()
	if sh == nil {
		return s.openUpstreamBlob(ctx, key, up, repo)
	}
	t := s.sharedT
	poll := firstLeasePoll
	waited := false
	giveUp := time.Now().Add(2 * t.leaseTTL)
	var holderExpires time.Time // of the lease we wait on, as last seen
	for {
		body, size, err := sh.GetBlob(ctx, key)
		if err == nil {
			t.avoided.WithLabelValues("blob").Inc()
			return source{body: body, size: size, label: "s3"}, nil
		}
		if !errors.Is(err, storage.ErrNotFound) {
			s.sharedFailed("get blob", err)
			return s.openUpstreamBlob(ctx, key, up, repo)
		}
		lease, err := sh.AcquireLease(ctx, storage.BlobLeaseName(key), t.leaseTTL)
		switch {
		case err == nil:
			// Another host may have uploaded and released between our miss
			// and our lease: look again before fetching upstream.
			if st, ok := sh.(blobStatter); ok {
				if _, serr := st.StatBlob(ctx, key); serr == nil {
					lease.Release(context.WithoutCancel(ctx))
					continue
				}
			}
			event := "taken"
			if to, ok := lease.(tookOver); ok && to.TookOver() {
				event = "taken_over"
			}
			t.leases.WithLabelValues("blob", event).Inc()
			src, err := s.openUpstreamBlob(ctx, key, up, repo)
			if err != nil {
				lease.Release(context.WithoutCancel(ctx))
				return src, err
			}
			src.lease = lease
			return src, nil
		case !errors.Is(err, storage.ErrLeaseHeld):
			s.sharedFailed("acquire lease", err)
			return s.openUpstreamBlob(ctx, key, up, repo)
		}
		if !waited {
			waited = true
			t.leases.WithLabelValues("blob", "waited").Inc()
		}
		var held *storage.LeaseHeldError
		if errors.As(err, &held) && !held.Expires.IsZero() && !held.Expires.Equal(holderExpires) {
			if !holderExpires.IsZero() {
				// Renewed or taken over since we last looked: a live host
				// is fetching, and waiting for it still beats a second fetch.
				giveUp = time.Now().Add(2 * t.leaseTTL)
			}
			holderExpires = held.Expires
		}
		if held != nil {
			if src, ok := s.openPeerBlob(ctx, held.Holder, key, repo); ok {
				return src, nil
			}
		}
		if time.Now().After(giveUp) {
			s.log.WithField("blob", key.String()).Warn("waited too long for another host's fetch; fetching from the upstream")
			return s.openUpstreamBlob(ctx, key, up, repo)
		}
		// Wait for the holder's upload, checking cheaply, and try the lease
		// again now and then in case its holder died.
		retryLeaseAt := time.Now().Add(t.leaseTTL / 2)
		st, canStat := sh.(blobStatter)
		for {
			select {
			case <-ctx.Done():
				return source{}, ctx.Err()
			case <-time.After(poll):
			}
			poll = min(poll*3/2, maxLeasePoll)
			if !canStat || time.Now().After(retryLeaseAt) {
				break
			}
			if _, err := st.StatBlob(ctx, key); !errors.Is(err, storage.ErrNotFound) {
				break // there now, or S3 failing: the next round finds out
			}
		}
	}
}

func (s *Server) openUpstreamBlob(ctx context.Context, key storage.Key, up *upstream, repo string) (source, error) {
	resp, err := s.upstreamDo(ctx, up, repo, "blob", http.MethodGet, up.url(repo, "blobs", key.Digest.String()), nil)
	if err != nil {
		return source{}, err
	}
	return source{body: resp.Body, size: resp.ContentLength, label: "upstream"}, nil
}

// keepLease renews a blob lease while its download runs; the returned
// function stops renewing.
func (s *Server) keepLease(lease storage.Lease) func() {
	r, ok := lease.(renewer)
	if !ok {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(s.sharedT.leaseTTL / 3)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				if err := r.Renew(s.downloadCtx); err != nil {
					s.log.WithError(err).Warn("could not renew blob lease")
				}
			}
		}
	}()
	return func() { close(done) }
}

// afterDownload shares what this host fetched: a blob from the upstream
// goes to the bucket before the lease is released, so waiting hosts find
// it; a corrupt blob from the bucket is deleted there.
func (s *Server) afterDownload(key storage.Key, src source, err error, log *logrus.Entry) {
	sh := s.sharedT.store
	if sh == nil {
		return
	}
	ctx := context.WithoutCancel(s.downloadCtx)
	defer func() {
		if src.lease != nil {
			if err := src.lease.Release(ctx); err != nil {
				log.WithError(err).Warn("could not release blob lease")
			}
		}
	}()
	if err != nil {
		if src.label == "s3" && errors.Is(err, storage.ErrDigestMismatch) {
			log.Warn("corrupt blob in S3; deleting it so it is fetched again")
			if derr := sh.DeleteBlob(ctx, key); derr != nil {
				s.sharedFailed("delete blob", derr)
			}
		}
		return
	}
	if src.label != "upstream" || s.shared() == nil {
		return
	}
	f, size, release, oerr := s.local.OpenBlob(key)
	if oerr != nil {
		return // evicted already; the next host to miss fetches it
	}
	defer release()
	defer f.Close()
	start := time.Now()
	if perr := sh.PutBlob(s.downloadCtx, key, f, size); perr != nil {
		s.sharedFailed("put blob", perr)
		return
	}
	log.WithFields(logrus.Fields{"bytes": size, "seconds": time.Since(start).Seconds()}).Debug("blob shared to S3")
}

// sharedManifest reads a manifest from the bucket into the local cache.
func (s *Server) sharedManifest(ctx context.Context, key storage.Key) bool {
	sh := s.shared()
	if sh == nil {
		return false
	}
	m, err := sh.GetManifest(ctx, key)
	if err != nil {
		if !errors.Is(err, storage.ErrNotFound) {
			s.sharedFailed("get manifest", err)
		}
		return false
	}
	if err := s.local.PutManifest(key, m); err != nil {
		return false // digest mismatch or disk trouble: treat as absent
	}
	s.sharedT.avoided.WithLabelValues("manifest").Inc()
	return true
}

func (s *Server) putSharedManifest(ctx context.Context, key storage.Key, m storage.Manifest) {
	if sh := s.shared(); sh != nil {
		if err := sh.PutManifest(ctx, key, m); err != nil {
			s.sharedFailed("put manifest", err)
		}
	}
}

// sharedTag consults the fleet before asking the upstream about a tag. It
// returns a record fresh enough to use, or the best known record and,
// when this host should revalidate, the lease to release afterwards.
func (s *Server) sharedTag(ctx context.Context, t target, tag string, ttl time.Duration) (fresh *storage.TagRecord, known *storage.TagRecord, lease storage.Lease) {
	sh := s.shared()
	if sh == nil {
		return nil, nil, nil
	}
	read := func() *storage.TagRecord {
		rec, err := sh.GetTag(ctx, t.up.host, t.repo, tag)
		if err != nil {
			if !errors.Is(err, storage.ErrNotFound) {
				s.sharedFailed("get tag", err)
			}
			return nil
		}
		return &rec
	}
	usable := func(r *storage.TagRecord) bool {
		if r == nil || time.Since(r.Checked) >= ttl {
			return false
		}
		key := storage.Key{Upstream: t.up.host, Digest: r.Digest}
		if _, err := s.local.GetManifest(key); err == nil {
			return true
		}
		return s.sharedManifest(ctx, key)
	}
	rec := read()
	if s.shared() == nil {
		return nil, nil, nil // the read just failed: don't try the lease on a failing bucket
	}
	if usable(rec) {
		s.sharedT.avoided.WithLabelValues("tag").Inc()
		return rec, rec, nil
	}
	l, err := sh.AcquireLease(ctx, storage.TagLeaseName(t.up.host, t.repo, tag), tagLeaseTTL)
	if err == nil {
		// Another host may have revalidated and released between our read
		// and our lease: its answer stands, so look again before asking.
		if r := read(); usable(r) {
			l.Release(context.WithoutCancel(ctx))
			s.sharedT.avoided.WithLabelValues("tag").Inc()
			return r, r, nil
		} else if r != nil {
			rec = r
		}
		s.sharedT.leases.WithLabelValues("tag", "taken").Inc()
		return nil, rec, l
	}
	if !errors.Is(err, storage.ErrLeaseHeld) {
		s.sharedFailed("acquire lease", err)
		return nil, rec, nil
	}
	// Another host is asking the upstream right now: wait briefly for its answer.
	s.sharedT.leases.WithLabelValues("tag", "waited").Inc()
	for poll := firstLeasePoll; poll < 5*time.Second; poll *= 2 {
		select {
		case <-ctx.Done():
			return nil, rec, nil
		case <-time.After(poll):
		}
		if r := read(); usable(r) {
			s.sharedT.avoided.WithLabelValues("tag").Inc()
			return r, r, nil
		}
	}
	return nil, rec, nil
}

func (s *Server) putSharedTag(ctx context.Context, t target, tag string, rec storage.TagRecord) {
	if sh := s.shared(); sh != nil {
		if err := sh.PutTag(ctx, t.up.host, t.repo, tag, rec); err != nil {
			s.sharedFailed("put tag", err)
		}
	}
}

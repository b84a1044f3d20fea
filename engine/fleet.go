package engine

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/berth-dev/berth/storage"
)

// The fleet tier: a bucket every host reads before the upstream. A host
// takes a lease before fetching a blob or revalidating a tag upstream, so
// the fleet fetches each once; the others wait for the object to appear,
// or stream it from the lease holder. When the bucket misbehaves berth
// goes straight to the upstream and tries the bucket again after
// bucketBackoff, so an outage costs the fleet-wide dedup and nothing else.

const (
	bucketBackoff  = 10 * time.Second
	tagLeaseTTL    = 30 * time.Second
	maxLeasePoll   = 2 * time.Second
	firstLeasePoll = 100 * time.Millisecond
)

type fleet struct {
	e         *Engine
	bucket    storage.Bucket
	leaseTTL  time.Duration
	self      string       // URL other hosts reach this berth at, if any
	downUntil atomic.Int64 // unix nanoseconds; skip the bucket until then

	leases   *prometheus.CounterVec // kind, event: taken, waited, taken_over
	avoided  *prometheus.CounterVec // kind: upstream fetches another host made for this one
	degraded prometheus.Counter
}

func newFleet(e *Engine, b storage.Bucket, leaseTTL time.Duration, advertise string, reg prometheus.Registerer) *fleet {
	f := &fleet{
		e: e, bucket: b, leaseTTL: leaseTTL, self: strings.TrimSuffix(advertise, "/"),
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
	reg.MustRegister(f.leases, f.avoided, f.degraded)
	return f
}

// CountS3Requests returns the hook that counts the bucket's requests and
// errors (berth_s3_requests_total, berth_s3_errors_total); pass it as
// storage.S3Options.OnRequest.
func CountS3Requests(reg prometheus.Registerer) func(op string, err error) {
	requests := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "berth_s3_requests_total", Help: "Requests sent to the shared S3 tier by operation.",
	}, []string{"op"})
	errs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "berth_s3_errors_total", Help: "Failed requests to the shared S3 tier by operation.",
	}, []string{"op"})
	reg.MustRegister(requests, errs)
	return func(op string, err error) {
		requests.WithLabelValues(op).Inc()
		if err != nil {
			errs.WithLabelValues(op).Inc()
		}
	}
}

// use returns the bucket, or nil when there is none or it is backing off.
func (f *fleet) use() storage.Bucket {
	if f == nil || time.Now().UnixNano() < f.downUntil.Load() {
		return nil
	}
	return f.bucket
}

// failed backs off from a failing bucket.
func (f *fleet) failed(op string, err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	if f.downUntil.Swap(time.Now().Add(bucketBackoff).UnixNano()) < time.Now().UnixNano() {
		f.degraded.Inc()
		f.e.log.WithError(err).WithField("op", op).Warn("S3 tier failing; using the upstream directly for a while")
	}
}

func (f *fleet) health(ctx context.Context) error {
	if err := f.bucket.Ping(ctx); err != nil {
		f.failed("ping", err)
		return err
	}
	f.downUntil.Store(0)
	return nil
}

// manifest reads a manifest from the bucket into the local cache.
func (f *fleet) manifest(ctx context.Context, repo Repo, key storage.Key) bool {
	b := f.use()
	if b == nil {
		return false
	}
	m, err := b.GetManifest(ctx, key)
	if err != nil {
		if !errors.Is(err, storage.ErrNotFound) {
			f.failed("get manifest", err)
		}
		return false
	}
	if err := f.e.storeManifest(repo, key, m, true); err != nil {
		return false // digest mismatch or disk trouble: treat as absent
	}
	f.avoided.WithLabelValues("manifest").Inc()
	return true
}

func (f *fleet) putManifest(ctx context.Context, key storage.Key, m storage.Manifest) {
	if b := f.use(); b != nil {
		if err := b.PutManifest(ctx, key, m); err != nil {
			f.failed("put manifest", err)
		}
	}
}

// tag consults the fleet before asking the upstream about a tag. It
// returns a record fresh enough to use, or the best known record and,
// when this host should revalidate, the lease to release afterwards.
func (f *fleet) tag(ctx context.Context, repo Repo, tag string, ttl time.Duration) (fresh *storage.TagRecord, known *storage.TagRecord, lease storage.Lease) {
	b := f.use()
	if b == nil {
		return nil, nil, nil
	}
	read := func() *storage.TagRecord {
		rec, err := b.GetTag(ctx, repo.Upstream, repo.Name, tag)
		if err != nil {
			if !errors.Is(err, storage.ErrNotFound) {
				f.failed("get tag", err)
			}
			return nil
		}
		return &rec
	}
	usable := func(r *storage.TagRecord) bool {
		if r == nil || time.Since(r.Checked) >= ttl {
			return false
		}
		key := storage.Key{Upstream: repo.Upstream, Digest: r.Digest}
		if _, err := f.e.local.GetManifest(key); err == nil {
			return true
		}
		return f.manifest(ctx, repo, key)
	}
	rec := read()
	if f.use() == nil {
		return nil, nil, nil // the read just failed: don't try the lease on a failing bucket
	}
	if usable(rec) {
		f.avoided.WithLabelValues("tag").Inc()
		return rec, rec, nil
	}
	l, err := b.AcquireLease(ctx, storage.TagLeaseName(repo.Upstream, repo.Name, tag), tagLeaseTTL)
	if err == nil {
		// Another host may have revalidated and released between our read
		// and our lease: its answer stands, so look again before asking.
		if r := read(); usable(r) {
			l.Release(context.WithoutCancel(ctx))
			f.avoided.WithLabelValues("tag").Inc()
			return r, r, nil
		} else if r != nil {
			rec = r
		}
		f.leases.WithLabelValues("tag", "taken").Inc()
		return nil, rec, l
	}
	if !errors.Is(err, storage.ErrLeaseHeld) {
		f.failed("acquire lease", err)
		return nil, rec, nil
	}
	// Another host is asking the upstream right now: wait briefly for its answer.
	f.leases.WithLabelValues("tag", "waited").Inc()
	var answer *storage.TagRecord
	poll(ctx, time.Now().Add(5*time.Second), func() bool {
		if r := read(); usable(r) {
			answer = r
		}
		return answer != nil
	})
	if answer != nil {
		f.avoided.WithLabelValues("tag").Inc()
		return answer, answer, nil
	}
	return nil, rec, nil
}

func (f *fleet) putTag(ctx context.Context, repo Repo, tag string, rec storage.TagRecord) {
	if b := f.use(); b != nil {
		if err := b.PutTag(ctx, repo.Upstream, repo.Name, tag, rec); err != nil {
			f.failed("put tag", err)
		}
	}
}

package mirror

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/berth-dev/berth/storage"
)

// metrics are berth's Prometheus series. The hit ratio is
// sum(rate(berth_cache_lookups_total{result="hit"}[5m])) / sum(rate(berth_cache_lookups_total[5m])).
type metrics struct {
	requests      *prometheus.CounterVec   // kind, method, code
	duration      *prometheus.HistogramVec // kind
	bytesServed   *prometheus.CounterVec   // source
	lookups       *prometheus.CounterVec   // kind, result
	upstreamReqs  *prometheus.CounterVec   // upstream, op, code
	upstreamErrs  *prometheus.CounterVec   // upstream, op
	upstreamBytes *prometheus.CounterVec   // upstream
	inflight      prometheus.Gauge
	staleServes   *prometheus.CounterVec // upstream
	evictions     prometheus.Counter
	evictedBytes  prometheus.Counter
	passthrough   prometheus.Counter
	mismatches    *prometheus.CounterVec // source
}

func newMetrics(reg prometheus.Registerer, local *storage.Local) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_requests_total", Help: "Registry API requests by kind (manifest, blob, tags, catalog, base, write, other), method and status code.",
		}, []string{"kind", "method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "berth_request_duration_seconds", Help: "Time to first response byte of registry API requests.",
			Buckets: []float64{.001, .005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"kind"}),
		bytesServed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_bytes_served_total", Help: "Blob and manifest bytes sent to clients by where they came from (local, s3, upstream).",
		}, []string{"source"}),
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_cache_lookups_total", Help: "Cache lookups of blobs and manifests by result (hit, miss).",
		}, []string{"kind", "result"}),
		upstreamReqs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_upstream_requests_total", Help: "Requests berth sent to upstream registries by operation and status code (0: no answer).",
		}, []string{"upstream", "op", "code"}),
		upstreamErrs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_upstream_errors_total", Help: "Upstream requests that failed: no answer, 429 or 5xx, or bad content.",
		}, []string{"upstream", "op"}),
		upstreamBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_upstream_bytes_total", Help: "Blob bytes fetched from upstream registries.",
		}, []string{"upstream"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "berth_inflight_fetches", Help: "Blob downloads in progress (shared by every client waiting on them).",
		}),
		staleServes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_stale_serves_total", Help: "Tags served from the last known digest because the upstream could not revalidate them in time.",
		}, []string{"upstream"}),
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "berth_evictions_total", Help: "Blobs evicted from the local cache to stay within its budget.",
		}),
		evictedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "berth_evicted_bytes_total", Help: "Bytes evicted from the local cache.",
		}),
		passthrough: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "berth_passthrough_total", Help: "Blobs streamed to a client without caching because the local disk had no room.",
		}),
		mismatches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_digest_mismatches_total", Help: "Content that did not match its digest and was discarded, by source.",
		}, []string{"source"}),
	}
	reg.MustRegister(m.requests, m.duration, m.bytesServed, m.lookups, m.upstreamReqs, m.upstreamErrs,
		m.upstreamBytes, m.inflight, m.staleServes, m.evictions, m.evictedBytes, m.passthrough, m.mismatches)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "berth_cache_size_bytes", Help: "Bytes of blobs in the local cache.",
	}, func() float64 { b, _ := local.Usage(); return float64(b) }))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "berth_cache_blobs", Help: "Blobs in the local cache.",
	}, func() float64 { _, n := local.Usage(); return float64(n) }))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "berth_cache_budget_bytes", Help: "Configured local cache budget.",
	}, func() float64 { return float64(local.Budget()) }))
	return m
}

func (m *metrics) evicted(_ storage.Key, size int64) {
	m.evictions.Inc()
	m.evictedBytes.Add(float64(size))
}

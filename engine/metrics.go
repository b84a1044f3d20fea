package engine

import (
	"context"
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/berth-dev/berth/storage"
)

// metrics are the engine's Prometheus series. The hit ratio is
// sum(rate(berth_cache_lookups_total{result="hit"}[5m])) / sum(rate(berth_cache_lookups_total[5m])).
type metrics struct {
	lookups       *prometheus.CounterVec // kind, result
	upstreamReqs  *prometheus.CounterVec // upstream, op, code
	upstreamErrs  *prometheus.CounterVec // upstream, op
	upstreamBytes *prometheus.CounterVec // upstream
	inflight      prometheus.Gauge
	staleServes   *prometheus.CounterVec // upstream
	evictions     prometheus.Counter
	evictedBytes  prometheus.Counter
	passthrough   prometheus.Counter
	mismatches    *prometheus.CounterVec // source
	eventsDropped prometheus.Counter
	resumes       *prometheus.CounterVec // source, reason
	rerequested   *prometheus.CounterVec // source
}

func newMetrics(reg prometheus.Registerer, local *storage.Local, e *Engine) *metrics {
	m := &metrics{
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
			Name: "berth_inflight_fetches", Help: "Blob downloads in progress (shared by every caller waiting on them).",
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
			Name: "berth_passthrough_total", Help: "Blob downloads relayed to their readers without caching because the local disk had no room.",
		}),
		mismatches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_digest_mismatches_total", Help: "Content that did not match its digest and was discarded, by source.",
		}, []string{"source"}),
		eventsDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "berth_events_dropped_total", Help: "Engine events a subscriber was too slow to take.",
		}),
		resumes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_resumes_total", Help: "Downloads continued from the byte reached after their source stalled (stall), broke (error), ended early (short), or a resumed source was set aside (size, mismatch), by the failed source.",
		}, []string{"source", "reason"}),
		rerequested: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_resume_rerequested_bytes_total", Help: "Bytes a source that ignored a range request sent again before the resume point.",
		}, []string{"source"}),
	}
	reg.MustRegister(m.lookups, m.upstreamReqs, m.upstreamErrs, m.upstreamBytes, m.inflight, m.staleServes,
		m.evictions, m.evictedBytes, m.passthrough, m.mismatches, m.eventsDropped, m.resumes, m.rerequested)
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

func (m *metrics) evicted(size int64) {
	m.evictions.Inc()
	m.evictedBytes.Add(float64(size))
}

// upstreamDo sends a request upstream and counts it.
func (e *Engine) upstreamDo(ctx context.Context, up *upstream, repo, op, method, url string, hdr http.Header) (*http.Response, error) {
	resp, err := up.do(ctx, repo, method, url, hdr)
	code := 0
	if err == nil {
		code = resp.StatusCode
	} else if ue, ok := asUpstreamError(err); ok {
		code = ue.Status
		if ue.Unavailable() {
			e.metrics.upstreamErrs.WithLabelValues(up.host, op).Inc()
		}
	}
	e.metrics.upstreamReqs.WithLabelValues(up.host, op, strconv.Itoa(code)).Inc()
	return resp, err
}

// Downloads is the number of blob downloads in progress.
func (e *Engine) Downloads() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.downloads)
}

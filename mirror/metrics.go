package mirror

import "github.com/prometheus/client_golang/prometheus"

// metrics are the registry API's own series; the engine counts the rest.
type metrics struct {
	requests    *prometheus.CounterVec   // kind, method, code
	duration    *prometheus.HistogramVec // kind
	bytesServed *prometheus.CounterVec   // source
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_requests_total", Help: "Registry API requests by kind (manifest, blob, tags, catalog, base, write, other), method and status code.",
		}, []string{"kind", "method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "berth_request_duration_seconds", Help: "Time to first response byte of registry API requests.",
			Buckets: []float64{.001, .005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"kind"}),
		bytesServed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_bytes_served_total", Help: "Blob and manifest bytes sent to clients by where they came from (local, s3, peer, upstream).",
		}, []string{"source"}),
	}
	reg.MustRegister(m.requests, m.duration, m.bytesServed)
	return m
}

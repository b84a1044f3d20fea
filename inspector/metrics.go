package inspector

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the inspector's Prometheus series (docs/inspector.md).
type metrics struct {
	inspections *prometheus.CounterVec // result: ok, error, shared
	dropped     prometheus.Counter
	seconds     prometheus.Histogram
	deliveries  *prometheus.CounterVec // result: delivered, failed
	attempts    prometheus.Counter
	events      *prometheus.CounterVec // type, claimed: this host's or another's
	missing     *prometheus.GaugeVec   // image
	coldStart   *prometheus.GaugeVec   // image
	fetchRate   prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer, i *Inspector) *metrics {
	m := &metrics{
		inspections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_inspections_total", Help: "Manifests inspected by this host (ok, error: recorded with an inspection error), read from the fleet's bucket (shared), or read from the bucket and left to the host that fetched them (deferred).",
		}, []string{"result"}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "berth_inspect_dropped_total", Help: "Manifests not inspected because the inspect queue was full.",
		}),
		seconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "berth_inspect_duration_seconds", Help: "Time to inspect one manifest.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 8),
		}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_webhook_deliveries_total", Help: "Webhook deliveries by outcome: delivered, or failed after every attempt.",
		}, []string{"result"}),
		attempts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "berth_webhook_attempts_total", Help: "Webhook HTTP requests sent, retries included.",
		}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_tag_events_total", Help: "Tag changes seen by this host, by type (new, changed, deleted) and whether this host claimed their delivery for the fleet (claimed: yes, no).",
		}, []string{"type", "claimed"}),
		missing: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "berth_image_missing_bytes", Help: "Bytes of a pinned or watched image (this node's platform) that this node's disk lacks.",
		}, []string{"image"}),
		coldStart: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "berth_image_cold_start_seconds", Help: "Estimated time to fetch what this node lacks of a pinned or watched image, at the node's measured fetch rate.",
		}, []string{"image"}),
		fetchRate: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "berth_fetch_rate_bytes", Help: "This node's measured blob fetch rate in bytes per second: bytes cached over the time downloads were in flight, decaying.",
		}),
	}
	reg.MustRegister(m.inspections, m.dropped, m.seconds, m.deliveries, m.attempts, m.events, m.missing, m.coldStart, m.fetchRate,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "berth_inspect_queue", Help: "Manifests waiting in the inspect queue.",
		}, func() float64 { return float64(i.QueueLen()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "berth_inspect_waiting", Help: "Manifests waiting for a pull to cache their config blob before they are inspected.",
		}, func() float64 { return float64(i.Waiting()) }),
	)
	if q := i.o.PrewarmQueue; q != nil {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "berth_prewarm_queue", Help: "Blobs pre-warm has yet to bring onto this node's disk: waiting or being fetched.",
		}, func() float64 { return float64(q()) }))
	}
	return m
}

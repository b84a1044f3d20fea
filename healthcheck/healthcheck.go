// Package healthcheck runs berth's health checks in the background and
// answers liveness, readiness and status probes from their last results.
//
// Probes never run a check themselves: a kubelet or Docker probing every
// few seconds must get an answer at once even while an upstream registry or
// S3 takes its time, and a slow dependency must not pile up probe requests.
//
// distribution's health package was considered; it polls checks in the
// background too, but it has no notion of liveness versus readiness versus
// informational checks, no per-check timeout or latency, and registers a
// handler on http.DefaultServeMux at init, so this package keeps its own
// small registry instead.
package healthcheck

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Kind says which probe a failing check fails.
type Kind int

const (
	// Liveness checks fail /healthz (and /readyz): the process should be
	// restarted, e.g. its data directory is no longer writable.
	Liveness Kind = iota
	// Readiness checks fail /readyz: the node should get no traffic yet.
	Readiness
	// Informational checks never fail a probe; a failure shows as
	// "degraded". berth keeps serving its cache when the upstream or the S3
	// tier is away, so those checks are informational.
	Informational
)

func (k Kind) String() string {
	switch k {
	case Liveness:
		return "liveness"
	case Readiness:
		return "readiness"
	case Informational:
		return "informational"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// MarshalText writes the kind's name into /status JSON.
func (k Kind) MarshalText() ([]byte, error) {
	switch k {
	case Liveness, Readiness, Informational:
		return []byte(k.String()), nil
	}
	return nil, fmt.Errorf("healthcheck: unknown kind %d", int(k))
}

// UnmarshalText reads a kind's name, so clients can decode /status.
func (k *Kind) UnmarshalText(b []byte) error {
	for _, c := range []Kind{Liveness, Readiness, Informational} {
		if string(b) == c.String() {
			*k = c
			return nil
		}
	}
	return fmt.Errorf("healthcheck: unknown kind %q", b)
}

// Status is the state of one check or of the whole process.
type Status string

const (
	StatusOK       Status = "ok"
	StatusFailing  Status = "failing"  // a liveness or readiness check fails
	StatusDegraded Status = "degraded" // only informational checks fail
	StatusUnknown  Status = "unknown"  // no result yet
)

// Defaults used when Add is given a zero interval or timeout.
const (
	DefaultInterval = 10 * time.Second
	DefaultTimeout  = 5 * time.Second
)

// Checker is a registry of named checks, each run on its own interval.
// Its methods are safe for concurrent use.
type Checker struct {
	mu      sync.RWMutex
	checks  map[string]*check
	ctx     context.Context // set by Start; checks added later start at once
	up      *prometheus.GaugeVec
	latency *prometheus.GaugeVec
}

type check struct {
	name     string
	kind     Kind
	interval time.Duration
	timeout  time.Duration
	fn       func(context.Context) error
	cancel   context.CancelFunc // stops the loop; nil before Start

	mu          sync.Mutex
	running     bool // fn has not returned yet, possibly from a timed-out round
	hasResult   bool
	err         error
	lastRun     time.Time
	lastSuccess time.Time
	latency     time.Duration
	failures    int
}

// New returns an empty Checker. Its gauges berth_health_check_up{check,kind}
// and berth_health_check_latency_seconds{check} are registered with reg
// unless reg is nil; collectors already registered there (a second Checker
// in one process) are reused.
func New(reg prometheus.Registerer) *Checker {
	c := &Checker{
		checks: map[string]*check{},
		up: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "berth_health_check_up",
			Help: "1 when the health check's last run passed, 0 when it failed.",
		}, []string{"check", "kind"}),
		latency: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "berth_health_check_latency_seconds",
			Help: "How long the health check's last run took.",
		}, []string{"check"}),
	}
	if reg != nil {
		c.up = registerOrReuse(reg, c.up)
		c.latency = registerOrReuse(reg, c.latency)
	}
	return c
}

func registerOrReuse(reg prometheus.Registerer, g *prometheus.GaugeVec) *prometheus.GaugeVec {
	if err := reg.Register(g); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(*prometheus.GaugeVec); ok {
				return existing
			}
		}
		panic("healthcheck: registering metrics: " + err.Error())
	}
	return g
}

// Add registers fn under name, to run every interval with at most timeout
// per run (zero means DefaultInterval, DefaultTimeout). Adding a name that
// exists replaces that check and forgets its results, which is what a
// configuration reload wants when an upstream's URL changes. After Start a
// new check runs at once, in the background.
//
// fn should honour its context; one that does not is reported as failing
// once its timeout passes, and is not started again until it returns.
func (c *Checker) Add(name string, kind Kind, interval, timeout time.Duration, fn func(ctx context.Context) error) {
	if name == "" || fn == nil {
		panic("healthcheck: Add needs a name and a function")
	}
	if _, err := kind.MarshalText(); err != nil {
		panic(err.Error())
	}
	if interval <= 0 {
		interval = DefaultInterval
	}
	if timeout <= 0 {
		timeout = min(DefaultTimeout, interval)
	}
	ch := &check{name: name, kind: kind, interval: interval, timeout: timeout, fn: fn}

	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.checks[name]; ok {
		c.removeLocked(old)
	}
	c.checks[name] = ch
	if c.ctx != nil {
		c.launchLocked(ch, nil)
	}
}

// Remove stops and forgets the named check and its metrics. It reports
// whether the check existed.
func (c *Checker) Remove(name string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch, ok := c.checks[name]
	if ok {
		c.removeLocked(ch)
	}
	return ok
}

func (c *Checker) removeLocked(ch *check) {
	if ch.cancel != nil {
		ch.cancel()
	}
	delete(c.checks, ch.name)
	c.up.DeleteLabelValues(ch.name, ch.kind.String())
	c.latency.DeleteLabelValues(ch.name)
}

// Start runs every check once, concurrently, and returns when all have a
// result or their timeouts have passed (or ctx is done); from then on each
// check runs on its interval until ctx is done. Calling Start again does
// nothing.
func (c *Checker) Start(ctx context.Context) {
	c.mu.Lock()
	if c.ctx != nil {
		c.mu.Unlock()
		return
	}
	c.ctx = ctx
	firsts := make([]chan struct{}, 0, len(c.checks))
	for _, ch := range c.checks {
		first := make(chan struct{})
		firsts = append(firsts, first)
		c.launchLocked(ch, first)
	}
	c.mu.Unlock()
	for _, first := range firsts {
		select {
		case <-first:
		case <-ctx.Done():
			return
		}
	}
}

// launchLocked starts ch's loop; first, if not nil, is closed after its first run.
func (c *Checker) launchLocked(ch *check, first chan struct{}) {
	ctx, cancel := context.WithCancel(c.ctx)
	ch.cancel = cancel
	go c.loop(ctx, ch, first)
}

func (c *Checker) loop(ctx context.Context, ch *check, first chan struct{}) {
	c.runOnce(ctx, ch)
	if first != nil {
		close(first)
	}
	t := time.NewTicker(ch.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.runOnce(ctx, ch)
		}
	}
}

// runOnce runs ch.fn with its timeout and records the result. It returns
// by the timeout even when fn ignores its context, so one stuck dependency
// cannot stop its check from reporting.
func (c *Checker) runOnce(ctx context.Context, ch *check) {
	start := time.Now()
	ch.mu.Lock()
	if ch.running {
		ch.mu.Unlock()
		c.record(ctx, ch, start, 0, fmt.Errorf("still running from an earlier round, past its %s timeout", ch.timeout))
		return
	}
	ch.running = true
	ch.mu.Unlock()

	runCtx, cancel := context.WithTimeout(ctx, ch.timeout)
	defer cancel()
	res := make(chan error, 1)
	go func() {
		defer func() {
			ch.mu.Lock()
			ch.running = false
			ch.mu.Unlock()
		}()
		res <- call(runCtx, ch.fn)
	}()

	var err error
	select {
	case err = <-res:
		if err != nil && runCtx.Err() == context.DeadlineExceeded {
			err = fmt.Errorf("no answer within %s: %w", ch.timeout, err)
		}
	case <-runCtx.Done():
		select {
		case err = <-res:
			if err != nil {
				err = fmt.Errorf("no answer within %s: %w", ch.timeout, err)
			}
		default:
			err = fmt.Errorf("no answer within %s", ch.timeout)
		}
	}
	c.record(ctx, ch, start, time.Since(start), err)
}

// call runs fn, turning a panic into a failed check rather than a crashed berth.
func call(ctx context.Context, fn func(context.Context) error) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("check panicked: %v\n%s", p, debug.Stack())
		}
	}()
	return fn(ctx)
}

func (c *Checker) record(ctx context.Context, ch *check, start time.Time, latency time.Duration, err error) {
	// A round cut short by shutdown or by Remove says nothing about health.
	if ctx.Err() != nil {
		return
	}
	ch.mu.Lock()
	ch.hasResult = true
	ch.err = err
	ch.lastRun = start
	ch.latency = latency
	if err == nil {
		ch.failures = 0
		ch.lastSuccess = start
	} else {
		ch.failures++
	}
	ch.mu.Unlock()

	// Under c.mu so a concurrent Remove cannot have its series brought back.
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.checks[ch.name] != ch {
		return
	}
	up := 0.0
	if err == nil {
		up = 1
	}
	c.up.WithLabelValues(ch.name, ch.kind.String()).Set(up)
	c.latency.WithLabelValues(ch.name).Set(latency.Seconds())
}

// CheckStatus is one check's last result, as /status shows it.
type CheckStatus struct {
	Name                string        `json:"name"`
	Kind                Kind          `json:"kind"`
	Status              Status        `json:"status"`
	Error               string        `json:"error,omitempty"`
	LastRun             time.Time     `json:"last_run,omitzero"`
	LastSuccess         time.Time     `json:"last_success,omitzero"`
	Latency             time.Duration `json:"-"`
	LatencySeconds      float64       `json:"latency_seconds"`
	ConsecutiveFailures int           `json:"consecutive_failures"`
	Interval            string        `json:"interval"`
	Timeout             string        `json:"timeout"`
}

// Report is the state of every check and of the whole process.
type Report struct {
	// Status is failing when a liveness or readiness check fails, unknown
	// when one has no result yet, degraded when only informational checks
	// fail, ok otherwise.
	Status Status        `json:"status"`
	Live   bool          `json:"live"`
	Ready  bool          `json:"ready"`
	Checks []CheckStatus `json:"checks"`
}

func (ch *check) status() CheckStatus {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	s := CheckStatus{
		Name:                ch.name,
		Kind:                ch.kind,
		LastRun:             ch.lastRun,
		LastSuccess:         ch.lastSuccess,
		Latency:             ch.latency,
		LatencySeconds:      ch.latency.Seconds(),
		ConsecutiveFailures: ch.failures,
		Interval:            ch.interval.String(),
		Timeout:             ch.timeout.String(),
	}
	switch {
	case !ch.hasResult:
		s.Status = StatusUnknown
	case ch.err == nil:
		s.Status = StatusOK
	case ch.kind == Informational:
		s.Status, s.Error = StatusDegraded, ch.err.Error()
	default:
		s.Status, s.Error = StatusFailing, ch.err.Error()
	}
	return s
}

// Report returns every check's last result, sorted by name.
func (c *Checker) Report() Report {
	c.mu.RLock()
	checks := make([]*check, 0, len(c.checks))
	for _, ch := range c.checks {
		checks = append(checks, ch)
	}
	c.mu.RUnlock()
	sort.Slice(checks, func(i, j int) bool { return checks[i].name < checks[j].name })

	r := Report{Status: StatusOK, Live: true, Ready: true, Checks: make([]CheckStatus, 0, len(checks))}
	var failing, unknown, degraded bool
	for _, ch := range checks {
		s := ch.status()
		r.Checks = append(r.Checks, s)
		if s.Kind == Informational {
			degraded = degraded || s.Status == StatusDegraded
			continue
		}
		switch s.Status {
		case StatusFailing:
			r.Ready, failing = false, true
			if s.Kind == Liveness {
				r.Live = false
			}
		case StatusUnknown:
			// A process still running its first liveness checks is alive
			// (restarting it would not help) but not ready for traffic.
			r.Ready = false
			unknown = true
		}
	}
	switch {
	case failing:
		r.Status = StatusFailing
	case unknown:
		r.Status = StatusUnknown
	case degraded:
		r.Status = StatusDegraded
	}
	return r
}

// Live reports whether no liveness check is failing.
func (c *Checker) Live() bool { return c.Report().Live }

// Ready reports whether every liveness and readiness check has passed its
// last run.
func (c *Checker) Ready() bool { return c.Report().Ready }

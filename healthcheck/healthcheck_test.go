package healthcheck

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type answer struct {
	code int
	body string
	took time.Duration
}

func get(t *testing.T, h http.Handler, target string) answer {
	t.Helper()
	start := time.Now()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, target, nil))
	return answer{code: rec.Code, body: rec.Body.String(), took: time.Since(start)}
}

func statusOf(t *testing.T, h http.Handler) (int, Report) {
	t.Helper()
	a := get(t, h, "/status")
	var r Report
	if err := json.Unmarshal([]byte(a.body), &r); err != nil {
		t.Fatalf("/status is not JSON: %v\n%s", err, a.body)
	}
	return a.code, r
}

func find(t *testing.T, r Report, name string) CheckStatus {
	t.Helper()
	for _, c := range r.Checks {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("check %q missing from report %+v", name, r)
	return CheckStatus{}
}

// errVar is a check whose result the test sets.
type errVar struct{ v atomic.Pointer[error] }

func (e *errVar) set(err error) { e.v.Store(&err) }
func (e *errVar) check(context.Context) error {
	if p := e.v.Load(); p != nil {
		return *p
	}
	return nil
}

func started(t *testing.T, c *Checker) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c.Start(ctx)
}

func TestSlowCheckDoesNotBlockProbes(t *testing.T) {
	c := New(nil)
	var slow atomic.Bool
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	c.Add("upstream", Readiness, 10*time.Millisecond, 30*time.Second, func(ctx context.Context) error {
		if !slow.Load() {
			return nil
		}
		select {
		case entered <- struct{}{}:
		default:
		}
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	started(t, c)
	h := c.Handler()
	if a := get(t, h, "/readyz"); a.code != 200 {
		t.Fatalf("/readyz after a passing first round = %d %q", a.code, a.body)
	}
	slow.Store(true)
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the check did not run again on its interval")
	}
	// Fast rounds may have run until the slow one began; from here on the
	// last result must stay the one before it.
	_, before := statusOf(t, h)
	lastRun := find(t, before, "upstream").LastRun
	if s := find(t, before, "upstream"); s.Status != StatusOK {
		t.Fatalf("status before the slow round = %+v", s)
	}
	// The check is now stuck until its 30s timeout; every probe must still
	// answer from the last result. A probe that waited for the check would
	// take 30s, so 10s tells the two apart on however loaded a machine (a
	// 200ms bound failed once in CI with the race detector on two cores).
	for i := 0; i < 50; i++ {
		for _, p := range []string{"/healthz", "/readyz", "/status"} {
			a := get(t, h, p)
			if a.code != 200 {
				t.Fatalf("%s while a check is slow = %d %q; want the last result (200)", p, a.code, a.body)
			}
			if a.took > 10*time.Second {
				t.Fatalf("%s took %s while a check was slow", p, a.took)
			}
		}
	}
	_, during := statusOf(t, h)
	if s := find(t, during, "upstream"); s.Status != StatusOK || !s.LastRun.Equal(lastRun) {
		t.Fatalf("status while slow = %+v; want the previous ok result from %s", s, lastRun)
	}
}

func TestCheckIgnoringItsContextTimesOut(t *testing.T) {
	c := New(nil)
	release := make(chan struct{})
	var released atomic.Bool
	defer func() {
		if !released.Load() {
			close(release)
		}
	}()
	calls := atomic.Int32{}
	c.Add("stuck", Liveness, 20*time.Millisecond, 50*time.Millisecond, func(context.Context) error {
		calls.Add(1)
		<-release // deliberately deaf to its context
		return nil
	})
	start := time.Now()
	started(t, c)
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("Start waited %s for a check with a 50ms timeout", took)
	}
	h := c.Handler()
	a := get(t, h, "/healthz")
	if a.code != 503 || !strings.Contains(a.body, "[-]stuck failed: no answer within 50ms") {
		t.Fatalf("/healthz with a stuck liveness check = %d %q", a.code, a.body)
	}
	waitFor(t, "later rounds to report the stuck run", 5*time.Second, func() bool {
		_, r := statusOf(t, h)
		s := find(t, r, "stuck")
		return s.ConsecutiveFailures >= 3 && strings.Contains(s.Error, "still running from an earlier round")
	})
	if n := calls.Load(); n != 1 {
		t.Fatalf("the stuck check was started %d times; want 1 until it returns", n)
	}
	released.Store(true)
	close(release)
	waitFor(t, "the check to pass once it returns", 5*time.Second, func() bool { return c.Live() })
	if a := get(t, h, "/healthz"); a.code != 200 || a.body != "ok\n" {
		t.Fatalf("/healthz after recovery = %d %q", a.code, a.body)
	}
	_, r := statusOf(t, h)
	if s := find(t, r, "stuck"); s.ConsecutiveFailures != 0 || s.Error != "" {
		t.Fatalf("after recovery: %+v", s)
	}
}

func TestFailingLivenessFailsBothProbes(t *testing.T) {
	c := New(nil)
	c.Add("data-dir", Liveness, time.Hour, time.Second, func(context.Context) error {
		return errors.New("read-only file system")
	})
	c.Add("store", Readiness, time.Hour, time.Second, func(context.Context) error { return nil })
	c.Add("upstream", Informational, time.Hour, time.Second, func(context.Context) error { return nil })
	started(t, c)
	h := c.Handler()

	a := get(t, h, "/healthz")
	if a.code != http.StatusServiceUnavailable {
		t.Fatalf("/healthz = %d; want 503", a.code)
	}
	for _, want := range []string{"[-]data-dir failed: read-only file system", "healthz check failed"} {
		if !strings.Contains(a.body, want) {
			t.Errorf("/healthz body %q lacks %q", a.body, want)
		}
	}
	if strings.Contains(a.body, "store") {
		t.Errorf("/healthz lists readiness checks: %q", a.body)
	}
	a = get(t, h, "/readyz")
	if a.code != 503 || !strings.Contains(a.body, "[-]data-dir failed") || !strings.Contains(a.body, "[+]store ok") {
		t.Fatalf("/readyz = %d %q", a.code, a.body)
	}
	code, r := statusOf(t, h)
	if code != 503 || r.Status != StatusFailing || r.Live || r.Ready {
		t.Fatalf("/status = %d %+v", code, r)
	}
	s := find(t, r, "data-dir")
	if s.Kind != Liveness || s.Status != StatusFailing || s.Error != "read-only file system" || s.ConsecutiveFailures != 1 || s.LastRun.IsZero() {
		t.Fatalf("data-dir status = %+v", s)
	}
	if c.Ready() || c.Live() {
		t.Fatal("Ready or Live with a failing liveness check")
	}
}

func TestFailingReadinessFailsOnlyReadyz(t *testing.T) {
	c := New(nil)
	c.Add("data-dir", Liveness, time.Hour, time.Second, func(context.Context) error { return nil })
	c.Add("store", Readiness, time.Hour, time.Second, func(context.Context) error { return errors.New("index not open") })
	started(t, c)
	h := c.Handler()
	if a := get(t, h, "/healthz"); a.code != 200 || a.body != "ok\n" {
		t.Fatalf("/healthz = %d %q", a.code, a.body)
	}
	if a := get(t, h, "/readyz"); a.code != 503 || !strings.Contains(a.body, "[-]store failed: index not open") {
		t.Fatalf("/readyz = %d %q", a.code, a.body)
	}
	if !c.Live() || c.Ready() {
		t.Fatal("want live and not ready")
	}
}

func TestInformationalFailureIsDegradedNotFailing(t *testing.T) {
	c := New(nil)
	c.Add("data-dir", Liveness, time.Hour, time.Second, func(context.Context) error { return nil })
	c.Add("upstream docker.io", Informational, 10*time.Millisecond, time.Second, func(context.Context) error {
		return errors.New("dial tcp 127.0.0.1:1: connection refused")
	})
	started(t, c)
	h := c.Handler()
	if a := get(t, h, "/healthz"); a.code != 200 || a.body != "ok\n" {
		t.Fatalf("/healthz = %d %q", a.code, a.body)
	}
	if a := get(t, h, "/readyz"); a.code != 200 || a.body != "ok\n" {
		t.Fatalf("/readyz = %d %q", a.code, a.body)
	}
	a := get(t, h, "/readyz?verbose")
	if a.code != 200 || !strings.Contains(a.body, "[~]upstream docker.io degraded") || !strings.Contains(a.body, "[+]data-dir ok") ||
		!strings.Contains(a.body, "readyz check passed") {
		t.Fatalf("/readyz?verbose = %d %q", a.code, a.body)
	}
	waitFor(t, "failures to accumulate", 5*time.Second, func() bool {
		_, r := statusOf(t, h)
		return find(t, r, "upstream docker.io").ConsecutiveFailures >= 3
	})
	code, r := statusOf(t, h)
	if code != 200 || r.Status != StatusDegraded || !r.Live || !r.Ready {
		t.Fatalf("/status = %d %+v", code, r)
	}
	s := find(t, r, "upstream docker.io")
	if s.Kind != Informational || s.Status != StatusDegraded || !strings.Contains(s.Error, "connection refused") {
		t.Fatalf("upstream status = %+v", s)
	}
}

func TestBeforeFirstResult(t *testing.T) {
	c := New(nil)
	c.Add("data-dir", Liveness, time.Hour, time.Second, func(context.Context) error { return nil })
	c.Add("store", Readiness, time.Hour, time.Second, func(context.Context) error { return nil })
	h := c.Handler()
	// Not started: alive (a restart would not help) but not ready.
	if a := get(t, h, "/healthz"); a.code != 200 {
		t.Fatalf("/healthz before any result = %d %q", a.code, a.body)
	}
	if a := get(t, h, "/readyz"); a.code != 503 || !strings.Contains(a.body, "[-]store failed: no result yet") {
		t.Fatalf("/readyz before any result = %d %q", a.code, a.body)
	}
	if code, r := statusOf(t, h); code != 503 || r.Status != StatusUnknown {
		t.Fatalf("/status before any result = %d %+v", code, r)
	}
	started(t, c)
	if a := get(t, h, "/readyz"); a.code != 200 {
		t.Fatalf("/readyz after Start = %d %q", a.code, a.body)
	}
}

func TestEmptyCheckerIsHealthy(t *testing.T) {
	c := New(nil)
	started(t, c)
	h := c.Handler()
	for _, p := range []string{"/healthz", "/readyz", "/status"} {
		if a := get(t, h, p); a.code != 200 {
			t.Errorf("%s with no checks = %d %q", p, a.code, a.body)
		}
	}
}

func TestHandlerRoutingAndMethods(t *testing.T) {
	c := New(nil)
	started(t, c)
	h := c.Handler()
	if a := get(t, h, "/debug/healthz"); a.code != 200 {
		t.Errorf("a prefixed mount: /debug/healthz = %d", a.code)
	}
	if a := get(t, h, "/nope"); a.code != 404 {
		t.Errorf("/nope = %d; want 404", a.code)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/readyz", nil))
	if rec.Code != http.StatusMethodNotAllowed || rec.Header().Get("Allow") == "" {
		t.Errorf("POST /readyz = %d, Allow %q", rec.Code, rec.Header().Get("Allow"))
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/status", nil))
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("/status Content-Type %q", ct)
	}
}

func TestPanickingCheckFails(t *testing.T) {
	c := New(nil)
	c.Add("boom", Readiness, time.Hour, time.Second, func(context.Context) error { panic("nil map") })
	started(t, c)
	a := get(t, c.Handler(), "/readyz")
	if a.code != 503 || !strings.Contains(a.body, "[-]boom failed: check panicked: nil map\n") {
		t.Fatalf("/readyz = %d %q", a.code, a.body)
	}
}

func TestAddAfterStartReplaceAndRemove(t *testing.T) {
	c := New(nil)
	started(t, c)
	var e errVar
	e.set(errors.New("first"))
	c.Add("upstream", Readiness, 10*time.Millisecond, time.Second, e.check)
	waitFor(t, "a check added after Start to run", 5*time.Second, func() bool {
		return find(t, c.Report(), "upstream").Error == "first"
	})
	c.Add("upstream", Readiness, 10*time.Millisecond, time.Second, func(context.Context) error { return nil })
	waitFor(t, "the replacement to run", 5*time.Second, c.Ready)
	if !c.Remove("upstream") || c.Remove("upstream") {
		t.Fatal("Remove should report true once, then false")
	}
	if n := len(c.Report().Checks); n != 0 {
		t.Fatalf("%d checks after Remove", n)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := New(reg)
	var up errVar
	c.Add("data-dir", Liveness, 10*time.Millisecond, time.Second, up.check)
	c.Add("upstream", Informational, time.Hour, time.Second, func(context.Context) error {
		time.Sleep(20 * time.Millisecond)
		return errors.New("down")
	})
	started(t, c)

	if got := gauge(t, reg, "berth_health_check_up", map[string]string{"check": "data-dir", "kind": "liveness"}); got != 1 {
		t.Errorf("up{data-dir} = %v; want 1", got)
	}
	if got := gauge(t, reg, "berth_health_check_up", map[string]string{"check": "upstream", "kind": "informational"}); got != 0 {
		t.Errorf("up{upstream} = %v; want 0", got)
	}
	if got := gauge(t, reg, "berth_health_check_latency_seconds", map[string]string{"check": "upstream"}); got < 0.02 || got > 5 {
		t.Errorf("latency{upstream} = %v; want about 0.02", got)
	}
	up.set(errors.New("gone"))
	waitFor(t, "the gauge to follow the check", 5*time.Second, func() bool {
		return gauge(t, reg, "berth_health_check_up", map[string]string{"check": "data-dir", "kind": "liveness"}) == 0
	})

	// A second Checker in the same process reuses the registered gauges
	// instead of panicking, and Remove drops a check's series.
	c2 := New(reg)
	c2.Remove("nothing")
	c.Remove("upstream")
	if got := gauge(t, reg, "berth_health_check_latency_seconds", map[string]string{"check": "upstream"}); got != -1 {
		t.Errorf("latency{upstream} after Remove = %v; want no series", got)
	}
}

// gauge returns the value of the named series, or -1 if it is absent.
func gauge(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			if len(got) != len(labels) {
				continue
			}
			for k, v := range labels {
				if got[k] != v {
					continue metrics
				}
			}
			return m.GetGauge().GetValue()
		}
	}
	return -1
}

func TestKindText(t *testing.T) {
	for _, k := range []Kind{Liveness, Readiness, Informational} {
		b, err := k.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		var back Kind
		if err := back.UnmarshalText(b); err != nil || back != k {
			t.Errorf("%s round-trips to %s, %v", k, back, err)
		}
	}
	if _, err := Kind(7).MarshalText(); err == nil {
		t.Error("Kind(7) marshals")
	}
}

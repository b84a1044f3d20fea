package healthcheck

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestDialAddr(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:5000": "127.0.0.1:5000",
		":5000":          "127.0.0.1:5000",
		"0.0.0.0:5000":   "127.0.0.1:5000",
		"localhost:5000": "127.0.0.1:5000",
		"[::]:5000":      "[::1]:5000",
		"[::1]:5000":     "[::1]:5000",
		"10.0.0.7:5000":  "10.0.0.7:5000",
	} {
		got, err := DialAddr(in)
		if err != nil || got != want {
			t.Errorf("DialAddr(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "5000", "127.0.0.1", "127.0.0.1:"} {
		if got, err := DialAddr(bad); err == nil {
			t.Errorf("DialAddr(%q) = %q; want an error", bad, got)
		}
	}
}

// serve starts an HTTP server on loopback and returns its port.
func serve(t *testing.T, h http.Handler) string {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	return port
}

func TestProbe(t *testing.T) {
	c := New(nil)
	var store errVar
	c.Add("data-dir", Liveness, 10*time.Millisecond, time.Second, func(context.Context) error { return nil })
	c.Add("store", Readiness, 10*time.Millisecond, time.Second, store.check)
	started(t, c)
	port := serve(t, c.Handler())
	ctx := context.Background()

	// Probed through the forms a listen flag takes.
	for _, listen := range []string{"127.0.0.1:" + port, ":" + port, "0.0.0.0:" + port} {
		if err := Probe(ctx, listen, "/readyz"); err != nil {
			t.Errorf("Probe(%s) of a healthy berth: %v", listen, err)
		}
	}
	if err := Probe(ctx, ":"+port, "healthz"); err != nil {
		t.Errorf("path without a slash: %v", err)
	}

	store.set(errors.New("index not open"))
	waitFor(t, "the store check to fail", 5*time.Second, func() bool { return !c.Ready() })
	err := Probe(ctx, ":"+port, "/readyz")
	if err == nil {
		t.Fatal("Probe of an unready berth passed")
	}
	msg := err.Error()
	for _, want := range []string{"/readyz answered 503 Service Unavailable", "store failed: index not open"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, "\n") || strings.Contains(msg, "data-dir") {
		t.Errorf("error should be one line naming only the failing check: %q", msg)
	}
	if err := Probe(ctx, ":"+port, "/healthz"); err != nil {
		t.Errorf("/healthz of a live but unready berth: %v", err)
	}
}

func TestProbeNothingListening(t *testing.T) {
	addr := closedAddr(t)
	err := Probe(context.Background(), addr, "/readyz")
	if !errors.Is(err, ErrNotListening) || !strings.Contains(err.Error(), addr) {
		t.Fatalf("Probe of a closed port = %v; want ErrNotListening naming %s", err, addr)
	}
}

func TestProbeTimeout(t *testing.T) {
	hang := make(chan struct{})
	port := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-hang:
		case <-r.Context().Done():
		}
	}))
	defer close(hang)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := Probe(ctx, ":"+port, "/readyz")
	if err == nil || !strings.Contains(err.Error(), "no answer") {
		t.Fatalf("Probe of a hanging server = %v", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("Probe took %s with a 100ms deadline", took)
	}
}

func TestProbeOtherServer(t *testing.T) {
	port := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "no such page\nsecond line", http.StatusNotFound)
	}))
	err := Probe(context.Background(), ":"+port, "/readyz")
	if err == nil || !strings.HasSuffix(err.Error(), "answered 404 Not Found: no such page") {
		t.Fatalf("Probe of something that is not berth = %v", err)
	}
}

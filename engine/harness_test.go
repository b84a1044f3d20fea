package engine

import (
	"os"

	"context"
	"github.com/sirupsen/logrus"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/internal/testsupport"
	"github.com/berth-dev/berth/storage"
)

const testTimeout = 15 * time.Second

// upstreamFake is an in-process registry that counts requests and lets a
// test replace the answer to one path.
type upstreamFake struct {
	t    *testing.T
	srv  *httptest.Server
	host string
	reg  http.Handler
	stop chan struct{}

	mu     sync.Mutex
	counts map[string]int
	faults map[string]http.HandlerFunc // "GET /v2/..."
}

func newUpstreamFake(t *testing.T) *upstreamFake {
	u := &upstreamFake{t: t, reg: registry.New(registry.Logger(log.New(io.Discard, "", 0))),
		stop: make(chan struct{}), counts: map[string]int{}, faults: map[string]http.HandlerFunc{}}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key := r.Method + " " + r.URL.Path
		u.mu.Lock()
		u.counts[key]++
		f := u.faults[key]
		u.mu.Unlock()
		if f != nil {
			f(w, r)
			return
		}
		u.reg.ServeHTTP(w, r)
	}))
	t.Cleanup(u.srv.Close)
	t.Cleanup(func() { close(u.stop) })
	u.host = strings.TrimPrefix(u.srv.URL, "http://")
	return u
}

func (u *upstreamFake) set(method, path string, f http.HandlerFunc) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.faults[method+" "+path] = f
}

func (u *upstreamFake) count(method, path string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.counts[method+" "+path]
}

func (u *upstreamFake) pushBlob(repo string, content []byte) digest.Digest {
	u.t.Helper()
	r, err := name.NewRepository(u.host + "/" + repo)
	if err != nil {
		u.t.Fatal(err)
	}
	if err := remote.WriteLayer(r, static.NewLayer(content, types.OCILayer)); err != nil {
		u.t.Fatal(err)
	}
	u.mu.Lock()
	u.counts = map[string]int{}
	u.mu.Unlock()
	return digest.FromBytes(content)
}

// pauseAfter answers with the first n bytes of the real body, then waits
// for gate (or the test's end) before the rest.
func (u *upstreamFake) pauseAfter(n int, gate <-chan struct{}) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		rec := httptest.NewRecorder()
		u.reg.ServeHTTP(rec, r)
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		body := rec.Body.Bytes()
		w.Write(body[:min(n, len(body))])
		w.(http.Flusher).Flush()
		select {
		case <-gate:
		case <-u.stop:
			return
		case <-r.Context().Done():
			return
		}
		w.Write(body[min(n, len(body)):])
	}
}

func blobPath(repo string, d digest.Digest) string { return "/v2/" + repo + "/blobs/" + d.String() }

type testEngine struct {
	*Engine
	reg   *prometheus.Registry
	local *storage.Local
	root  string
	repo  Repo
}

// newTestEngine is an engine over a fresh disk whose only upstream is u
// (as "upstream.test"), with the options mod sets.
func newTestEngine(t *testing.T, u *upstreamFake, mod func(*Options, *storage.LocalOptions)) *testEngine {
	t.Helper()
	cfg := config.Default()
	cfg.Upstreams = map[string]config.Upstream{"upstream.test": {URL: u.srv.URL}}
	cfg.DefaultUpstream = "upstream.test"
	cfg.TagTTL = config.Duration(time.Hour)
	lo := storage.LocalOptions{Budget: 1 << 30}
	o := Options{Config: cfg}
	if mod != nil {
		mod(&o, &lo)
	}
	root := t.TempDir()
	local, err := storage.OpenLocal(root, lo)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	o.Local, o.Metrics = local, reg
	if os.Getenv("BERTH_TEST_LOG") != "" {
		l := logrus.New()
		l.SetLevel(logrus.DebugLevel)
		o.Log = logrus.NewEntry(l)
	}
	e, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return &testEngine{Engine: e, reg: reg, local: local, root: root, repo: Repo{Upstream: "upstream.test", Name: "org/app"}}
}

// open opens blob d through the engine, closed when the test ends; with
// source set, it must come from there ("peer", "s3", ...).
func (e *testEngine) open(t *testing.T, ctx context.Context, d digest.Digest, source string) *Blob {
	t.Helper()
	b, err := e.Blob(ctx, e.repo, d)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	if source != "" && b.Source != source {
		t.Fatalf("source %q, want %s", b.Source, source)
	}
	return b
}

// read reads blob d whole through the engine.
func (e *testEngine) read(t *testing.T, d digest.Digest) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	b, err := e.Blob(ctx, e.repo, d)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	return io.ReadAll(b)
}

func (e *testEngine) counter(c prometheus.Collector) float64 { return testutil.ToFloat64(c) }

func randomBytes(seed int64, n int) []byte { return testsupport.RandomBytes(seed, n) }

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testsupport.Eventually(t, what, testTimeout, cond)
}

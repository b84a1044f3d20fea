package mirror

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/internal/testsupport"
	"github.com/berth-dev/berth/storage"
)

// testTimeout bounds every client request and every poll in these tests.
const testTimeout = 15 * time.Second

// fault replaces the upstream's answer to one request; next is the real
// registry.
type fault func(w http.ResponseWriter, r *http.Request, next http.Handler)

// fakeUpstream is an in-process registry behind a handler that counts
// requests and injects faults per method and path.
type fakeUpstream struct {
	t    *testing.T
	srv  *httptest.Server
	host string // 127.0.0.1:PORT
	url  string
	reg  http.Handler

	stop     chan struct{} // closed at cleanup: hung handlers return
	stopOnce sync.Once

	mu     sync.Mutex
	counts map[string]int   // "GET /v2/..." -> requests
	faults map[string]fault // "GET /v2/..." or "* /v2/..."
}

func newFakeUpstream(t *testing.T) *fakeUpstream {
	t.Helper()
	u := &fakeUpstream{
		t:      t,
		reg:    registry.New(registry.Logger(log.New(io.Discard, "", 0))),
		stop:   make(chan struct{}),
		counts: map[string]int{},
		faults: map[string]fault{},
	}
	u.srv = httptest.NewServer(u)
	t.Cleanup(u.srv.Close)
	u.url = u.srv.URL
	u.host = strings.TrimPrefix(u.srv.URL, "http://")
	return u
}

func (u *fakeUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	key := r.Method + " " + r.URL.Path
	u.mu.Lock()
	u.counts[key]++
	f, ok := u.faults[key]
	if !ok {
		f, ok = u.faults["* "+r.URL.Path]
	}
	u.mu.Unlock()
	if ok {
		f(w, r, u.reg)
		return
	}
	u.reg.ServeHTTP(w, r)
}

// release lets every hung handler return.
func (u *fakeUpstream) release() { u.stopOnce.Do(func() { close(u.stop) }) }

// set installs f for method ("*" for any) and path.
func (u *fakeUpstream) set(method, path string, f fault) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.faults[method+" "+path] = f
}

func (u *fakeUpstream) clear(method, path string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	delete(u.faults, method+" "+path)
}

func (u *fakeUpstream) count(method, path string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.counts[method+" "+path]
}

func (u *fakeUpstream) resetCounts() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.counts = map[string]int{}
}

func blobPath(repo string, d digest.Digest) string { return "/v2/" + repo + "/blobs/" + d.String() }
func manifestPath(repo, ref string) string         { return "/v2/" + repo + "/manifests/" + ref }

// pushBlob uploads content as a blob of repo and returns its digest.
func (u *fakeUpstream) pushBlob(repo string, content []byte) digest.Digest {
	u.t.Helper()
	r, err := name.NewRepository(u.host + "/" + repo)
	if err != nil {
		u.t.Fatal(err)
	}
	if err := remote.WriteLayer(r, static.NewLayer(content, types.OCILayer)); err != nil {
		u.t.Fatalf("pushing blob: %v", err)
	}
	u.resetCounts()
	return digest.FromBytes(content)
}

// pushImage uploads img as repo:tag and returns its manifest's digest.
func (u *fakeUpstream) pushImage(repo, tag string, img v1.Image) digest.Digest {
	u.t.Helper()
	ref, err := name.NewTag(u.host + "/" + repo + ":" + tag)
	if err != nil {
		u.t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		u.t.Fatalf("pushing %s: %v", ref, err)
	}
	u.resetCounts()
	d, err := img.Digest()
	if err != nil {
		u.t.Fatal(err)
	}
	return digest.Digest(d.String())
}

func (u *fakeUpstream) pushIndex(repo, tag string, idx v1.ImageIndex) digest.Digest {
	u.t.Helper()
	ref, err := name.NewTag(u.host + "/" + repo + ":" + tag)
	if err != nil {
		u.t.Fatal(err)
	}
	if err := remote.WriteIndex(ref, idx); err != nil {
		u.t.Fatalf("pushing %s: %v", ref, err)
	}
	u.resetCounts()
	d, err := idx.Digest()
	if err != nil {
		u.t.Fatal(err)
	}
	return digest.Digest(d.String())
}

// hang blocks until the test ends or the caller gives up, then drops the
// connection: a hung request never turns into an answer.
func (u *fakeUpstream) hang() fault {
	return func(w http.ResponseWriter, r *http.Request, _ http.Handler) {
		select {
		case <-u.stop:
		case <-r.Context().Done():
		}
		panic(http.ErrAbortHandler)
	}
}

// status answers code with a registry-style error body; kv are header pairs.
func status(code int, kv ...string) fault {
	return func(w http.ResponseWriter, r *http.Request, _ http.Handler) {
		for i := 0; i+1 < len(kv); i += 2 {
			w.Header().Set(kv[i], kv[i+1])
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		fmt.Fprintf(w, `{"errors":[{"code":"INJECTED","message":"%d"}]}`, code)
	}
}

// drop closes the connection without an answer.
func drop() fault {
	return func(http.ResponseWriter, *http.Request, http.Handler) { panic(http.ErrAbortHandler) }
}

// record runs the real registry into a buffer.
func record(r *http.Request, next http.Handler) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	next.ServeHTTP(rec, r)
	return rec
}

func copyHeader(dst, src http.Header) {
	for k, v := range src {
		dst[k] = v
	}
}

// corrupt flips one byte in the middle of the body, keeping its length and
// headers (Docker-Content-Digest included), as a bad cache or disk would.
func corrupt() fault {
	return func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		rec := record(r, next)
		body := rec.Body.Bytes()
		if len(body) > 0 {
			body[len(body)/2] ^= 0x55
		}
		copyHeader(w.Header(), rec.Header())
		w.WriteHeader(rec.Code)
		w.Write(body)
	}
}

// pauseAfter sends the first n body bytes, then waits for gate (or the
// test's end) before sending the rest. mutate, if set, changes the body first.
func (u *fakeUpstream) pauseAfter(n int, gate <-chan struct{}, mutate func([]byte)) fault {
	return func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		rec := record(r, next)
		body := rec.Body.Bytes()
		if mutate != nil {
			mutate(body)
		}
		copyHeader(w.Header(), rec.Header())
		w.WriteHeader(rec.Code)
		if n > len(body) {
			n = len(body)
		}
		w.Write(body[:n])
		w.(http.Flusher).Flush()
		select {
		case <-gate:
		case <-u.stop:
			return
		case <-r.Context().Done():
			return
		}
		w.Write(body[n:])
	}
}

// chunked answers without Content-Length, as a streaming proxy would.
func chunked() fault {
	return func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		rec := record(r, next)
		copyHeader(w.Header(), rec.Header())
		w.Header().Del("Content-Length")
		w.WriteHeader(rec.Code)
		body := rec.Body.Bytes()
		w.Write(body[:len(body)/2])
		w.(http.Flusher).Flush()
		w.Write(body[len(body)/2:])
	}
}

// harness is a berth mirror over a fresh local tier, fetching from up.
type harness struct {
	t     *testing.T
	up    *fakeUpstream
	root  string
	local *storage.Local
	srv   *Server
	eng   *engine.Engine
	ts    *httptest.Server
	reg   *prometheus.Registry
	cfg   *config.Config

	active atomic.Int64 // requests inside berth's handler now
}

type setup struct {
	cfg    *config.Config
	local  storage.LocalOptions
	root   string         // reuse a data directory
	engine engine.Options // timeouts; the harness fills in the rest
}

func newHarness(t *testing.T, up *fakeUpstream, opts ...func(*setup)) *harness {
	t.Helper()
	s := &setup{cfg: config.Default(), local: storage.LocalOptions{Budget: 1 << 30}, root: t.TempDir()}
	s.cfg.TagTTL = config.Duration(time.Hour)
	s.cfg.StaleTimeout = config.Duration(300 * time.Millisecond)
	s.cfg.DefaultUpstream = config.DockerHub
	s.cfg.Upstreams = map[string]config.Upstream{}
	if up != nil {
		// Both names reach the same fake, so tests can tell the routes apart
		// by the cache keys berth uses.
		s.cfg.Upstreams[config.DockerHub] = config.Upstream{URL: up.url}
		s.cfg.Upstreams[up.host] = config.Upstream{URL: up.url}
	}
	for _, o := range opts {
		o(s)
	}
	local, err := storage.OpenLocal(s.root, s.local)
	if err != nil {
		t.Fatal(err)
	}
	logger := logrus.New()
	logger.SetOutput(io.Discard)
	reg := prometheus.NewRegistry()
	o := s.engine
	o.Config, o.Local, o.Metrics, o.Log = s.cfg, local, reg, logrus.NewEntry(logger)
	eng, err := engine.New(o)
	if err != nil {
		t.Fatalf("engine.New: %v", err)
	}
	srv := New(eng, reg, o.Log)
	h := &harness{t: t, up: up, root: s.root, local: local, srv: srv, eng: eng, reg: reg, cfg: s.cfg}
	h.ts = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.active.Add(1)
		defer h.active.Add(-1)
		srv.ServeHTTP(w, r)
	}))
	// Cleanups run last-registered first: free hung upstream handlers, let
	// berth's handlers finish, stop its downloads, then the upstream goes.
	t.Cleanup(eng.Close)
	t.Cleanup(h.ts.Close)
	if up != nil {
		t.Cleanup(up.release)
	}
	return h
}

// newBlobFixture is a berth whose upstream holds one blob of org/app.
func newBlobFixture(t *testing.T, seed int64, size int) (up *fakeUpstream, h *harness, content []byte, d digest.Digest, path string) {
	t.Helper()
	up = newFakeUpstream(t)
	h = newHarness(t, up)
	content = randomBytes(seed, size)
	d = up.pushBlob("org/app", content)
	return up, h, content, d, blobPath("org/app", d)
}

// upstreamHost is the fake's registry name as berth knows it.
func (h *harness) upstreamHost() string { return h.up.host }

type response struct {
	*http.Response
	body    []byte
	readErr error // no answer, or the body ended early (connection cut)
}

// cutOrError checks r did not deliver a complete 200: berth either cut the
// connection or answered with the registry error status and code.
func cutOrError(t *testing.T, r response, status int, code string) {
	t.Helper()
	switch {
	case r.StatusCode == http.StatusOK && r.readErr == nil:
		t.Fatalf("%s %s: complete 200 body of %d bytes, want a cut connection or %s", r.Request.Method, r.Request.URL.Path, len(r.body), code)
	case r.StatusCode == 0 || r.StatusCode == http.StatusOK:
		// cut short
	default:
		errorCode(t, r, status, code)
	}
}

func (h *harness) do(method, path string, hdr ...string) response {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	return h.doCtx(ctx, method, path, hdr...)
}

func (h *harness) doCtx(ctx context.Context, method, path string, hdr ...string) response {
	h.t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, h.ts.URL+path, nil)
	if err != nil {
		h.t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := h.ts.Client().Do(req)
	if err != nil {
		// No answer at all (berth cut the connection before its headers
		// went out) is status 0 with the error.
		return response{Response: &http.Response{Request: req, Header: http.Header{}}, readErr: err}
	}
	defer resp.Body.Close()
	body, rerr := io.ReadAll(resp.Body)
	return response{Response: resp, body: body, readErr: rerr}
}

func (h *harness) get(path string, hdr ...string) response {
	h.t.Helper()
	return h.do(http.MethodGet, path, hdr...)
}

// wantOK fails unless r is a complete 200 with body want.
func wantOK(t *testing.T, r response, want []byte) {
	t.Helper()
	if r.StatusCode != http.StatusOK || r.readErr != nil {
		t.Fatalf("%s %s: status %d, read error %v, body %.300s", r.Request.Method, r.Request.URL.Path, r.StatusCode, r.readErr, r.body)
	}
	if !bytes.Equal(r.body, want) {
		t.Fatalf("%s %s: body of %d bytes (sha256 %s) differs from the %d expected (sha256 %s)",
			r.Request.Method, r.Request.URL.Path, len(r.body), sha(r.body), len(want), sha(want))
	}
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// errorCode checks r is a registry JSON error with the status and code.
func errorCode(t *testing.T, r response, status int, code string) {
	t.Helper()
	if r.StatusCode != status {
		t.Fatalf("%s %s: status %d, want %d (body %.300s)", r.Request.Method, r.Request.URL, r.StatusCode, status, r.body)
	}
	if r.Request.Method == http.MethodHead {
		return
	}
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("%s %s: error Content-Type %q, want application/json", r.Request.Method, r.Request.URL, ct)
	}
	var body struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	if err := json.Unmarshal(r.body, &body); err != nil || len(body.Errors) == 0 {
		t.Fatalf("%s %s: error body %q is not {\"errors\":[...]} (%v)", r.Request.Method, r.Request.URL, r.body, err)
	}
	if body.Errors[0].Code != code {
		t.Fatalf("%s %s: errors[0].code %q, want %q (message %q)", r.Request.Method, r.Request.URL, body.Errors[0].Code, code, body.Errors[0].Message)
	}
}

// metric sums the series of a metric family whose labels include want.
func (h *harness) metric(family string, want map[string]string) float64 {
	h.t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		h.t.Fatal(err)
	}
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() != family {
			continue
		}
		for _, m := range mf.GetMetric() {
			if !labelsMatch(m, want) {
				continue
			}
			switch {
			case m.Counter != nil:
				total += m.Counter.GetValue()
			case m.Gauge != nil:
				total += m.Gauge.GetValue()
			}
		}
	}
	return total
}

// wantMetric waits for a metric to reach want: berth counts a request
// after its handler returns, which can be after the client has read the
// whole answer.
func (h *harness) wantMetric(family string, labels map[string]string, want float64) {
	h.t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		got := h.metric(family, labels)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s%v = %v, want %v", family, labels, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func labelsMatch(m *dto.Metric, want map[string]string) bool {
	have := map[string]string{}
	for _, l := range m.GetLabel() {
		have[l.GetName()] = l.GetValue()
	}
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return true
}

// eventually polls cond until it holds or the test timeout passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testsupport.Eventually(t, what, testTimeout, cond)
}

func (h *harness) tmpEmpty() bool {
	ents, err := os.ReadDir(filepath.Join(h.root, "tmp"))
	return err == nil && len(ents) == 0
}

// ageTag makes berth's record of a tag older than any TTL, as if it had
// been checked long ago, so the next request revalidates it.
func (h *harness) ageTag(upstream, repo, tag string) {
	h.t.Helper()
	rec, err := h.local.GetTag(upstream, repo, tag)
	if err != nil {
		h.t.Fatalf("no tag record for %s/%s:%s: %v", upstream, repo, tag, err)
	}
	rec.Checked = time.Now().Add(-24 * time.Hour)
	if err := h.local.PutTag(upstream, repo, tag, rec); err != nil {
		h.t.Fatal(err)
	}
}

func randomBytes(seed int64, n int) []byte { return testsupport.RandomBytes(seed, n) }

// closedPortURL is an http URL nothing listens on.
func closedPortURL(t *testing.T) string {
	return "http://" + testsupport.FreeAddr(t)
}

var errTimeout = errors.New("timed out")

// within waits for ch up to d.
func within[T any](ch <-chan T, d time.Duration) (T, error) {
	select {
	case v := <-ch:
		return v, nil
	case <-time.After(d):
		var zero T
		return zero, errTimeout
	}
}

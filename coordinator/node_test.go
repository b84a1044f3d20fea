package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/auth"
	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/storage"
)

// upstream is an in-process registry standing in for a node's upstream.
type upstream struct {
	t      *testing.T
	host   string
	mu     sync.Mutex
	gets   map[string]int                              // GET paths
	faults map[string]func(w http.ResponseWriter) bool // by path suffix: true when it answered
}

// fault makes GETs of paths ending in suffix answer with f instead.
func (u *upstream) fault(suffix string, f func(w http.ResponseWriter) bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.faults[suffix] = f
}

func newUpstream(t *testing.T) *upstream {
	u := &upstream{t: t, gets: map[string]int{}, faults: map[string]func(http.ResponseWriter) bool{}}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		if r.Method == http.MethodGet {
			u.gets[r.URL.Path]++
		}
		var f func(http.ResponseWriter) bool
		for suffix, ff := range u.faults {
			if strings.HasSuffix(r.URL.Path, suffix) {
				f = ff
			}
		}
		u.mu.Unlock()
		if f != nil && f(w) {
			return
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	u.host = strings.TrimPrefix(srv.URL, "http://")
	return u
}

func (u *upstream) push(repo, tag string, img v1.Image) v1.Hash {
	u.t.Helper()
	ref, err := name.ParseReference(u.host + "/" + repo + ":" + tag)
	if err != nil {
		u.t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		u.t.Fatal(err)
	}
	d, _ := img.Digest()
	return d
}

func (u *upstream) pushIndex(repo, tag string, idx v1.ImageIndex) v1.Hash {
	u.t.Helper()
	ref, _ := name.ParseReference(u.host + "/" + repo + ":" + tag)
	if err := remote.WriteIndex(ref, idx); err != nil {
		u.t.Fatal(err)
	}
	d, _ := idx.Digest()
	return d
}

func blobsOf(t *testing.T, img v1.Image) (ds []digest.Digest, total int64) {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	ds = append(ds, digest.Digest(m.Config.Digest.String()))
	total += m.Config.Size
	for _, l := range m.Layers {
		ds = append(ds, digest.Digest(l.Digest.String()))
		total += l.Size
	}
	return ds, total
}

// testNode is a node over a real engine and disk, its API on a handler.
type testNode struct {
	dir   string
	local *storage.Local
	eng   *engine.Engine
	node  *Node
	h     http.Handler
	logs  *bytes.Buffer
}

func startNode(t *testing.T, up *upstream, dir string, budget int64, admin *auth.Tokens) *testNode {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	local, err := storage.OpenLocal(dir, storage.LocalOptions{Budget: budget})
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Upstreams = map[string]config.Upstream{"registry.test": {URL: "http://" + up.host}}
	cfg.DefaultUpstream = "registry.test"
	eng, err := engine.New(engine.Options{Config: cfg, Local: local})
	if err != nil {
		t.Fatal(err)
	}
	logs := &bytes.Buffer{}
	l := logrus.New()
	l.Out = &lockedWriter{w: logs}
	n, err := NewNode(NodeOptions{Engine: eng, Local: local, DataDir: dir, Version: "test", AdminTokens: admin, Log: logrus.NewEntry(l)})
	if err != nil {
		t.Fatal(err)
	}
	tn := &testNode{dir: dir, local: local, eng: eng, node: n, h: n.Handler(), logs: logs}
	t.Cleanup(tn.close)
	return tn
}

var closeOnce sync.Map

func (tn *testNode) close() {
	if _, done := closeOnce.LoadOrStore(tn, true); done {
		return
	}
	tn.node.Close()
	tn.eng.Close()
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// do serves one request from addr with an optional bearer token.
func do(h http.Handler, method, path, remote, token string, body any) *httptest.ResponseRecorder {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	r := httptest.NewRequest(method, path, rd)
	r.RemoteAddr = remote
	if token != "" {
		r.Header.Set("Authorization", "Bearer "+token)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

const loop = "127.0.0.1:40000"

func (tn *testNode) prefetch(t *testing.T, req PrefetchRequest) string {
	t.Helper()
	w := do(tn.h, "POST", "/berth/v1/prefetch", loop, "", req)
	if w.Code != http.StatusAccepted {
		t.Fatalf("prefetch: %d %s", w.Code, w.Body)
	}
	var a PrefetchAccepted
	json.Unmarshal(w.Body.Bytes(), &a)
	return a.ID
}

func (tn *testNode) wait(t *testing.T, id string) JobSnapshot {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		w := do(tn.h, "GET", "/berth/v1/jobs/"+id, loop, "", nil)
		var s JobSnapshot
		if err := json.Unmarshal(w.Body.Bytes(), &s); err != nil {
			t.Fatalf("job %s: %d %s", id, w.Code, w.Body)
		}
		if s.Terminal() {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s still %s", id, s.State)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (tn *testNode) warmCode() (int, WarmStatus) {
	w := do(tn.h, "GET", "/berth/v1/warm", loop, "", nil)
	var st WarmStatus
	json.Unmarshal(w.Body.Bytes(), &st)
	return w.Code, st
}

func TestNodePrefetchPinsAndWarm(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(4096, 3)
	d := up.push("org/app", "v1", img)
	blobs, total := blobsOf(t, img)
	tn := startNode(t, up, "", 1<<30, nil)

	if code, st := tn.warmCode(); code != 200 || st.Pins != 0 {
		t.Fatalf("warm with no pins: %d %+v", code, st)
	}
	until := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	id := tn.prefetch(t, PrefetchRequest{Images: []Image{{Repository: "registry.test/org/app", Digest: digest.Digest(d.String())}}, PinUntil: until})
	s := tn.wait(t, id)
	if s.State != StateSucceeded || s.BytesDone != total || s.BytesTotal != total || s.BlobsDone != len(blobs) {
		t.Fatalf("job: %+v", s)
	}
	for _, b := range s.Images[0].Blobs {
		if b.State != StateDone {
			t.Errorf("blob %s: %s", b.Digest, b.State)
		}
	}
	for _, b := range blobs {
		if _, ok := tn.local.HasBlob(storage.Key{Upstream: "registry.test", Digest: b}); !ok {
			t.Errorf("blob %s not on disk", b)
		}
	}
	if got := len(tn.eng.Pinned()); got != len(blobs) {
		t.Errorf("engine pins %d, want %d", got, len(blobs))
	}
	w := do(tn.h, "GET", "/berth/v1/pins", loop, "", nil)
	var pins []Pin
	json.Unmarshal(w.Body.Bytes(), &pins)
	if len(pins) != len(blobs) || !pins[0].Until.Equal(until) || !pins[0].OnDisk {
		t.Errorf("pins: %s", w.Body)
	}
	if code, st := tn.warmCode(); code != 200 || !st.Warm || st.Pins != len(blobs) {
		t.Errorf("warm: %d %+v", code, st)
	}
	w = do(tn.h, "GET", "/berth/v1/node", loop, "", nil)
	var f NodeFacts
	json.Unmarshal(w.Body.Bytes(), &f)
	if f.OS == "" || f.Arch == "" || f.CacheBudget != 1<<30 || f.Version != "test" || f.DiskFree <= 0 || f.PinnedBytes != total {
		t.Errorf("facts: %s", w.Body)
	}
	// A second prefetch of warm blobs moves nothing from the upstream.
	before := up.count()
	tn.wait(t, tn.prefetch(t, PrefetchRequest{Images: []Image{{Repository: "registry.test/org/app", Digest: digest.Digest(d.String())}}}))
	if after := up.count(); after != before {
		t.Errorf("re-prefetch of warm blobs made %d upstream GETs", after-before)
	}

	// Restart: the pins file brings the pins back, the warm gate follows.
	tn.close()
	if err := os.RemoveAll(filepath.Join(tn.dir, "blobs")); err != nil {
		t.Fatal(err)
	}
	tn2 := startNode(t, up, tn.dir, 1<<30, nil)
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, st := tn2.warmCode()
		if code == 200 && st.Pins == len(blobs) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after restart: warm %d %+v", code, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := len(tn2.eng.Pinned()); got != len(blobs) {
		t.Errorf("after restart: engine pins %d, want %d", got, len(blobs))
	}
}

func (u *upstream) count() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for p, c := range u.gets {
		if strings.Contains(p, "/blobs/") {
			n += c
		}
	}
	return n
}

func TestNodePinReleasedAtItsTime(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(1024, 1)
	d := up.push("org/app", "v1", img)
	tn := startNode(t, up, "", 1<<30, nil)
	id := tn.prefetch(t, PrefetchRequest{Images: []Image{{Repository: "registry.test/org/app", Digest: digest.Digest(d.String())}}, PinUntil: time.Now().Add(1500 * time.Millisecond)})
	tn.wait(t, id)
	if len(tn.eng.Pinned()) == 0 {
		t.Fatal("not pinned")
	}
	time.Sleep(2 * time.Second)
	if got := len(tn.eng.Pinned()); got != 0 {
		t.Errorf("engine pins after their time: %d", got)
	}
	if code, st := tn.warmCode(); code != 200 || st.Pins != 0 {
		t.Errorf("warm after pins expired: %d %+v", code, st)
	}
}

func TestNodeRefusesPinBeyondBudget(t *testing.T) {
	up := newUpstream(t)
	small, _ := random.Image(2000, 1)
	big, _ := random.Image(6000, 2)
	ds := up.push("org/small", "v1", small)
	db := up.push("org/big", "v1", big)
	_, smallTotal := blobsOf(t, small)
	tn := startNode(t, up, "", 10000, nil)
	tn.wait(t, tn.prefetch(t, PrefetchRequest{Images: []Image{{Repository: "registry.test/org/small", Digest: digest.Digest(ds.String())}}, PinUntil: time.Now().Add(time.Hour)}))
	w := do(tn.h, "POST", "/berth/v1/prefetch", loop, "", PrefetchRequest{Images: []Image{{Repository: "registry.test/org/big", Digest: digest.Digest(db.String())}}, PinUntil: time.Now().Add(time.Hour)})
	if w.Code != http.StatusInsufficientStorage || !strings.Contains(w.Body.String(), "PREWARM_NO_SPACE") || !strings.Contains(w.Body.String(), `"kind":"no_space"`) {
		t.Fatalf("pin beyond budget: %d %s", w.Code, w.Body)
	}
	var pins []Pin
	json.Unmarshal(do(tn.h, "GET", "/berth/v1/pins", loop, "", nil).Body.Bytes(), &pins)
	var pinned int64
	for _, p := range pins {
		pinned += p.Size
	}
	if pinned != smallTotal {
		t.Errorf("pinned %d bytes after the refusal, want the first image's %d", pinned, smallTotal)
	}
}

func TestNodeTypedErrors(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(1024, 1)
	d := up.push("org/app", "v1", img)
	tn := startNode(t, up, "", 1<<30, nil)
	missing := digest.FromString("nothing")
	id := tn.prefetch(t, PrefetchRequest{Images: []Image{
		{Repository: "registry.test/org/app", Digest: digest.Digest(d.String())},
		{Repository: "registry.test/org/app", Digest: missing},
		{Repository: "other.example/org/app", Digest: digest.Digest(d.String())},
		{Repository: "registry.test/org/app", Digest: "sha256:nothex"},
		{Repository: "registry.test/Org/App", Digest: digest.Digest(d.String())},
	}, PinUntil: time.Now().Add(time.Hour)})
	s := tn.wait(t, id)
	want := []string{"", "not_found", "unknown_registry", "invalid_reference", "invalid_name"}
	for i, w := range want {
		im := s.Images[i]
		got := ""
		if im.Error != nil {
			got = im.Error.Kind
		}
		if got != w {
			t.Errorf("image %d (%s): error %q (%+v), want %q", i, im.Image, got, im.Error, w)
		}
	}
	if s.State != StateFailed || s.Images[0].State != StateDone {
		t.Errorf("job %s, first image %s", s.State, s.Images[0].State)
	}
	// The image that worked stays pinned; nothing else is.
	_, n := blobsOf(t, img)
	if f := tn.node.Facts(); f.PinnedBytes != n {
		t.Errorf("pinned %d bytes, want %d", f.PinnedBytes, n)
	}
	for _, bad := range []string{`{`, `{"images":[]}`, `{"images":[{"repository":"a","digest":"sha256:00"}],"platforms":["linux"]}`, `{"images":[{"repository":"a","digest":"sha256:00"}],"pin_until":"2001-01-01T00:00:00Z"}`, `{"unknown":1}`} {
		r := httptest.NewRequest("POST", "/berth/v1/prefetch", strings.NewReader(bad))
		r.RemoteAddr = loop
		w := httptest.NewRecorder()
		tn.h.ServeHTTP(w, r)
		if w.Code != 400 || !strings.Contains(w.Body.String(), "PREWARM_INVALID") {
			t.Errorf("%s: %d %s", bad, w.Code, w.Body)
		}
	}
	if w := do(tn.h, "GET", "/berth/v1/jobs/nope", loop, "", nil); w.Code != 404 || !strings.Contains(w.Body.String(), "PREWARM_JOB_UNKNOWN") {
		t.Errorf("unknown job: %d %s", w.Code, w.Body)
	}
	if w := do(tn.h, "GET", "/berth/v1/resolve?ref=registry.test/org/app:v1", loop, "", nil); w.Code != 200 || !strings.Contains(w.Body.String(), d.String()) {
		t.Errorf("resolve: %d %s", w.Code, w.Body)
	}
	if w := do(tn.h, "GET", "/berth/v1/resolve?ref=registry.test/org/app:nope", loop, "", nil); w.Code != 404 || !strings.Contains(w.Body.String(), `"kind":"not_found"`) {
		t.Errorf("resolve of a missing tag: %d %s", w.Code, w.Body)
	}
	if w := do(tn.h, "GET", "/berth/v1/resolve?ref=Bad::ref", loop, "", nil); w.Code != 400 || !strings.Contains(w.Body.String(), `"kind":"invalid_reference"`) {
		t.Errorf("resolve of a bad reference: %d %s", w.Code, w.Body)
	}
}

func TestNodeUnsupportedManifest(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(512, 1)
	art := mutate.MediaType(img, types.MediaType("application/vnd.example.thing.v1+json"))
	d := up.push("org/art", "v1", art)
	tn := startNode(t, up, "", 1<<30, nil)
	s := tn.wait(t, tn.prefetch(t, PrefetchRequest{Images: []Image{{Repository: "registry.test/org/art", Digest: digest.Digest(d.String())}}}))
	if im := s.Images[0]; im.Error == nil || im.Error.Kind != "unsupported" {
		t.Errorf("unsupported media type: %+v", im)
	}
}

func TestNodeIndexPlatformsAndAttestations(t *testing.T) {
	up := newUpstream(t)
	amd, _ := random.Image(1000, 1)
	arm, _ := random.Image(1000, 1)
	att, _ := random.Image(1000, 1)
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
		mutate.IndexAddendum{Add: att, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "unknown", Architecture: "unknown"},
			Annotations: map[string]string{"vnd.docker.reference.type": "attestation-manifest"}}},
	)
	d := up.pushIndex("org/multi", "v1", idx)
	tn := startNode(t, up, "", 1<<30, nil)
	s := tn.wait(t, tn.prefetch(t, PrefetchRequest{Images: []Image{{Repository: "registry.test/org/multi", Digest: digest.Digest(d.String())}}, Platforms: []string{"linux/arm64"}}))
	armBlobs, armTotal := blobsOf(t, arm)
	if s.State != StateSucceeded || s.BytesTotal != armTotal || len(s.Images[0].Blobs) != len(armBlobs) || s.Images[0].Platforms[0] != "linux/arm64" {
		t.Fatalf("arm64 of the index: %+v", s)
	}
	attBlobs, _ := blobsOf(t, att)
	for _, b := range attBlobs {
		if _, ok := tn.local.HasBlob(storage.Key{Upstream: "registry.test", Digest: b}); ok {
			t.Errorf("attestation blob %s fetched", b)
		}
	}
	s = tn.wait(t, tn.prefetch(t, PrefetchRequest{Images: []Image{{Repository: "registry.test/org/multi", Digest: digest.Digest(d.String())}}, Platforms: []string{"windows/amd64"}}))
	if im := s.Images[0]; im.Error == nil || im.Error.Kind != "not_found" || !strings.Contains(im.Error.Message, "linux/amd64") {
		t.Errorf("missing platform: %+v", im.Error)
	}
}

const adminToken = "admin-token-0123456789abcdef"
const fleetToken = "fleet-token-0123456789abcdef"

func tokens(t *testing.T, tok string) *auth.Tokens {
	t.Helper()
	p := filepath.Join(t.TempDir(), "tokens")
	os.WriteFile(p, []byte(tok+"\n"), 0o600)
	ts, err := auth.LoadTokens(p)
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

func TestNodeAuth(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(512, 1)
	d := up.push("org/app", "v1", img)
	req := PrefetchRequest{Images: []Image{{Repository: "registry.test/org/app", Digest: digest.Digest(d.String())}}}
	remote := "192.0.2.7:5555"

	// No admin token configured: writes from loopback only.
	open := startNode(t, up, "", 1<<30, nil)
	if w := do(open.h, "POST", "/berth/v1/prefetch", remote, "", req); w.Code != 401 || !strings.Contains(w.Body.String(), `"code":"UNAUTHORIZED"`) {
		t.Errorf("write from a non-loopback address: %d %s", w.Code, w.Body)
	}
	if w := do(open.h, "POST", "/berth/v1/prefetch", "[::1]:5555", "", req); w.Code != 202 {
		t.Errorf("write from ::1: %d %s", w.Code, w.Body)
	}
	if w := do(open.h, "GET", "/berth/v1/warm", remote, "", nil); w.Code != 200 {
		t.Errorf("read on the registry listener: %d", w.Code)
	}

	// An admin token configured: writes need it, from anywhere.
	tn := startNode(t, up, "", 1<<30, tokens(t, adminToken))
	for _, c := range []struct {
		remote, token string
		want          int
	}{
		{loop, "", 401}, {loop, "wrong-token-0123456789", 401}, {remote, "", 401},
		{remote, adminToken, 202}, {loop, adminToken, 202},
	} {
		w := do(tn.h, "POST", "/berth/v1/prefetch", c.remote, c.token, req)
		if w.Code != c.want {
			t.Errorf("POST from %s with token %v: %d %s, want %d", c.remote, c.token != "", w.Code, w.Body, c.want)
		}
		if w.Code == 401 && (w.Header().Get("WWW-Authenticate") == "" || !strings.Contains(w.Body.String(), `"errors"`)) {
			t.Errorf("401 without challenge or error JSON: %v %s", w.Header(), w.Body)
		}
	}
	if strings.Contains(tn.logs.String(), "wrong-token") || strings.Contains(tn.logs.String(), adminToken) {
		t.Errorf("a token was logged:\n%s", tn.logs)
	}
	if !strings.Contains(tn.logs.String(), "request refused") {
		t.Errorf("refusals not logged:\n%s", tn.logs)
	}

	// The fleet port: every request needs a credential; writes the admin token.
	fh := tn.node.FleetHandler(tokens(t, fleetToken))
	for _, c := range []struct {
		method, path, token string
		want                int
	}{
		{"GET", "/berth/v1/warm", "", 401},
		{"GET", "/berth/v1/warm", "nope-nope-nope-nope-nope", 401},
		{"GET", "/berth/v1/warm", fleetToken, 200},
		{"GET", "/berth/v1/node", adminToken, 200},
		{"POST", "/berth/v1/prefetch", fleetToken, 401},
		{"POST", "/berth/v1/prefetch", adminToken, 202},
	} {
		var body any
		if c.method == "POST" {
			body = req
		}
		if w := do(fh, c.method, c.path, remote, c.token, body); w.Code != c.want {
			t.Errorf("fleet port %s %s (token %v): %d %s, want %d", c.method, c.path, c.token != "", w.Code, w.Body, c.want)
		}
	}
}

func TestNodeSSEProgressIsMonotonic(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(200000, 4)
	d := up.push("org/app", "v1", img)
	_, total := blobsOf(t, img)
	tn := startNode(t, up, "", 1<<30, nil)
	srv := httptest.NewServer(tn.h)
	defer srv.Close()
	id := tn.prefetch(t, PrefetchRequest{Images: []Image{{Repository: "registry.test/org/app", Digest: digest.Digest(d.String())}}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var last JobSnapshot
	n := 0
	err := Events(ctx, http.DefaultClient, srv.URL+"/berth/v1/jobs/"+id+"/events", "", func(ev string, data []byte) error {
		var s JobSnapshot
		if err := json.Unmarshal(data, &s); err != nil {
			return err
		}
		if s.BytesDone < last.BytesDone || s.Seq < last.Seq {
			t.Errorf("progress went back: %d after %d", s.BytesDone, last.BytesDone)
		}
		last = s
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if last.State != StateSucceeded || last.BytesDone != total || n < 1 {
		t.Errorf("last event: %+v after %d events", last, n)
	}
}

// An upstream that refuses (401) or rate-limits (429) a blob: the image
// fails with that kind, the others of the job go on.
func TestNodeUpstreamErrorsAreTyped(t *testing.T) {
	up := newUpstream(t)
	a, _ := random.Image(1000, 1)
	b, _ := random.Image(1000, 1)
	c, _ := random.Image(1000, 1)
	da := up.push("org/a", "v1", a)
	db := up.push("org/b", "v1", b)
	dc := up.push("org/c", "v1", c)
	la, _ := a.Layers()
	lb, _ := b.Layers()
	ha, _ := la[0].Digest()
	hb, _ := lb[0].Digest()
	up.fault(ha.String(), func(w http.ResponseWriter) bool {
		w.Header().Set("WWW-Authenticate", `Bearer realm="x"`)
		w.WriteHeader(http.StatusUnauthorized)
		return true
	})
	up.fault(hb.String(), func(w http.ResponseWriter) bool {
		w.Header().Set("Retry-After", "30")
		w.WriteHeader(http.StatusTooManyRequests)
		return true
	})
	tn := startNode(t, up, "", 1<<30, nil)
	s := tn.wait(t, tn.prefetch(t, PrefetchRequest{Images: []Image{
		{Repository: "registry.test/org/a", Digest: digest.Digest(da.String())},
		{Repository: "registry.test/org/b", Digest: digest.Digest(db.String())},
		{Repository: "registry.test/org/c", Digest: digest.Digest(dc.String())},
	}, PinUntil: time.Now().Add(time.Hour)}))
	for i, want := range []string{"unauthorized", "rate_limited", ""} {
		got := ""
		if e := s.Images[i].Error; e != nil {
			got = e.Kind
		}
		if got != want {
			t.Errorf("image %d: %q (%+v), want %q", i, got, s.Images[i].Error, want)
		}
	}
	// Nothing of the failed images stays pinned.
	_, n := blobsOf(t, c)
	if f := tn.node.Facts(); f.PinnedBytes != n {
		t.Errorf("pinned %d bytes, want only image c's %d", f.PinnedBytes, n)
	}
	held := tn.eng.Pinned()
	cfgA, _ := a.ConfigName()
	if _, ok := held[storage.Key{Upstream: "registry.test", Digest: digest.Digest(cfgA.String())}]; ok {
		t.Error("a blob of a failed image is still pinned in the engine")
	}
}

func TestNodeWarmImages(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(4096, 3)
	d := up.push("org/app", "v1", img)
	other, _ := random.Image(2048, 2)
	od := up.push("org/other", "v1", other)
	_, total := blobsOf(t, img)
	_, otherTotal := blobsOf(t, other)
	tn := startNode(t, up, "", 1<<30, nil)
	app := "registry.test/org/app@" + d.String()
	warm := func(q string) (int, WarmStatus) {
		t.Helper()
		w := do(tn.h, "GET", "/berth/v1/warm?"+q, loop, "", nil)
		var st WarmStatus
		if err := json.Unmarshal(w.Body.Bytes(), &st); err != nil {
			t.Fatalf("warm?%s: %d %s", q, w.Code, w.Body)
		}
		return w.Code, st
	}

	// Nothing fetched yet: the whole image is missing, and the gate says so.
	code, st := warm("image=" + app)
	if code != 503 || st.Warm || len(st.Images) != 1 || st.Images[0].MissingBytes != total || st.Images[0].Bytes != total || st.Images[0].Warm || st.Images[0].Error != nil {
		t.Fatalf("before: %d %+v", code, st)
	}
	// Pinned: nothing missing, pinned until the job's time.
	until := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	tn.wait(t, tn.prefetch(t, PrefetchRequest{Images: []Image{{Repository: "registry.test/org/app", Digest: digest.Digest(d.String())}}, PinUntil: until}))
	// The other image on disk without a pin: nothing missing, not warm.
	tn.wait(t, tn.prefetch(t, PrefetchRequest{Images: []Image{{Repository: "registry.test/org/other", Digest: digest.Digest(od.String())}}}))
	code, st = warm("image=" + app + "&image=registry.test/org/other@" + od.String())
	a, o := st.Images[0], st.Images[1]
	if code != 503 || a.MissingBytes != 0 || !a.Warm || !a.PinnedUntil.Equal(until) || o.MissingBytes != 0 || o.Bytes != otherTotal || o.Warm || !o.PinnedUntil.IsZero() {
		t.Fatalf("after: %d %+v", code, st)
	}
	if code, st = warm("image=" + app); code != 200 || !st.Warm {
		t.Errorf("the pinned image alone: %d %+v", code, st)
	}
	// A digest the upstream does not have: the image's typed error.
	code, st = warm("image=registry.test/org/app@sha256:" + strings.Repeat("0", 64))
	if code != 503 || st.Images[0].Error == nil || st.Images[0].Error.Kind != "not_found" {
		t.Errorf("unknown digest: %d %+v", code, st)
	}
	for _, q := range []string{"image=registry.test/org/app:v1", "image=@" + d.String(), "image=" + app + "&platform=linux"} {
		if w := do(tn.h, "GET", "/berth/v1/warm?"+q, loop, "", nil); w.Code != 400 || !strings.Contains(w.Body.String(), "PREWARM_INVALID") {
			t.Errorf("warm?%s: %d %s", q, w.Code, w.Body)
		}
	}
}

// The pre-warm queue counts a job's blobs until each is on disk: a blob
// the upstream holds back keeps it above zero, and it is zero once the
// job has ended.
func TestNodeQueueMoves(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(4096, 2)
	d := up.push("org/app", "v1", img)
	layers, _ := img.Layers()
	held, _ := layers[0].Digest()
	arrived, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	up.fault(held.String(), func(w http.ResponseWriter) bool {
		once.Do(func() { close(arrived) })
		<-release
		return false // then the registry answers
	})
	tn := startNode(t, up, "", 1<<30, nil)
	if q := tn.node.Queue(); q != 0 {
		t.Fatalf("queue %d before any job", q)
	}
	id := tn.prefetch(t, PrefetchRequest{Images: []Image{{Repository: "registry.test/org/app", Digest: digest.Digest(d.String())}}})
	select {
	case <-arrived:
	case <-time.After(20 * time.Second):
		t.Fatal("the held blob was never asked for")
	}
	if q := tn.node.Queue(); q < 1 {
		t.Errorf("queue %d while a blob is being fetched", q)
	}
	close(release)
	if s := tn.wait(t, id); s.State != StateSucceeded {
		t.Fatalf("job %+v", s)
	}
	if q := tn.node.Queue(); q != 0 {
		t.Errorf("queue %d after the job", q)
	}
}

// The node ID is made once and kept in the data directory: a restart on
// the same disk is the same node, another disk another node, and a
// damaged ID file stops the node with an error that names it.
func TestNodeIDSurvivesRestart(t *testing.T) {
	up := newUpstream(t)
	tn := startNode(t, up, "", 1<<30, nil)
	f := tn.node.Facts()
	if !validNodeID(f.ID) {
		t.Fatalf("node ID %q is not %d hex digits", f.ID, nodeIDLen)
	}
	if host, _ := os.Hostname(); f.Hostname != host {
		t.Errorf("hostname %q, want %q", f.Hostname, host)
	}
	w := do(tn.h, "GET", "/berth/v1/node", loop, "", nil)
	var got NodeFacts
	if w.Code != 200 || json.Unmarshal(w.Body.Bytes(), &got) != nil || got.ID != f.ID || got.Hostname != f.Hostname {
		t.Errorf("GET /berth/v1/node: %d %s", w.Code, w.Body)
	}
	tn.close()
	if again := startNode(t, up, tn.dir, 1<<30, nil).node.Facts().ID; again != f.ID {
		t.Errorf("after a restart on the same data directory: ID %q, was %q", again, f.ID)
	}
	if other := startNode(t, up, "", 1<<30, nil).node.Facts().ID; other == f.ID || !validNodeID(other) {
		t.Errorf("a fresh data directory got ID %q (first node %q)", other, f.ID)
	}

	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, nodeIDFile), []byte("not-an-id\n"), 0o644)
	local, err := storage.OpenLocal(dir, storage.LocalOptions{Budget: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	_, err = NewNode(NodeOptions{Local: local, DataDir: dir})
	if err == nil || !strings.Contains(err.Error(), filepath.Join(dir, nodeIDFile)) || !strings.Contains(err.Error(), "not-an-id") {
		t.Errorf("a damaged ID file: %v", err)
	}
}

package coordinator

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/storage"
)

// fakeNode answers the node API's facts and warm routes from a table of
// missing bytes per image; it records the queries it got.
type fakeNode struct {
	url     string
	id      string // its node ID, "" for a node older than IDs
	h       http.Handler
	mu      sync.Mutex
	queries []string
}

func newFakeNode(t *testing.T, id, version string, missing map[string]int64, pinned bool) *fakeNode {
	f := &fakeNode{id: id}
	f.h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/berth/v1/node":
			writeJSON(w, 200, NodeFacts{ID: f.id, Hostname: "node-" + f.id, OS: "linux", Arch: "amd64", Version: version, CacheBudget: 10 << 30, CacheUsed: 1 << 30, DiskFree: 50 << 30})
		case "/berth/v1/warm":
			f.mu.Lock()
			f.queries = append(f.queries, r.URL.RawQuery)
			f.mu.Unlock()
			st := WarmStatus{Warm: true}
			for _, s := range r.URL.Query()["image"] {
				img, err := ParseImage(s)
				if err != nil {
					writeError(w, 400, ErrorCodeInvalid, "invalid_request", err.Error())
					return
				}
				iw := ImageWarmth{Image: img, Bytes: 3000, Blobs: 3}
				if m, ok := missing[s]; ok {
					iw.MissingBytes, iw.MissingBlobs = m, 1
				}
				if pinned {
					iw.PinnedUntil = time.Now().Add(time.Hour)
				}
				iw.Warm = iw.MissingBytes == 0 && pinned
				st.Warm = st.Warm && iw.Warm
				st.Images = append(st.Images, iw)
			}
			code := 200
			if !st.Warm {
				code = 503
			}
			writeJSON(w, code, st)
		default:
			http.NotFound(w, r)
		}
	})
	f.url = f.alias(t)
	return f
}

// alias serves the node at one more URL.
func (f *fakeNode) alias(t *testing.T) string {
	srv := httptest.NewServer(f.h)
	t.Cleanup(srv.Close)
	return srv.URL
}

func putJobs(t *testing.T, mem *storage.Memory, jobs ...JobRecord) {
	t.Helper()
	for _, j := range jobs {
		b, _ := json.Marshal(j)
		if err := mem.PutObject(context.Background(), jobObject(j.ID), b); err != nil {
			t.Fatal(err)
		}
	}
}

func TestFleetMatrix(t *testing.T) {
	d1 := digest.FromString("app v1")
	d2 := digest.FromString("db v2")
	app := Image{Repository: "registry.test/org/app", Digest: d1, Ref: `registry.test/org/app:<script>x</script>`}
	db := Image{Repository: "registry.test/org/db", Digest: d2}
	gone := Image{Repository: "registry.test/org/gone", Digest: digest.FromString("gone")}
	now := time.Now().UTC()
	mem := storage.NewMemory(storage.MemoryOptions{})
	putJobs(t, mem,
		JobRecord{ID: "a", State: StateSucceeded, Spec: JobSpec{PinUntil: now.Add(time.Hour)}, Images: []Image{app, db}},
		JobRecord{ID: "b", State: StateFailed, Spec: JobSpec{PinUntil: now.Add(2 * time.Hour)}, Images: []Image{db}},
		JobRecord{ID: "c", State: StateSucceeded, Spec: JobSpec{PinUntil: now.Add(-time.Minute)}, Images: []Image{gone}},
		JobRecord{ID: "d", State: StateCanceled, Spec: JobSpec{PinUntil: now.Add(time.Hour)}, Images: []Image{gone}},
		JobRecord{ID: "e", State: StateSucceeded, Images: []Image{gone}}, // no pin
	)
	warm := newFakeNode(t, "", "v1.2.3", nil, true)
	cold := newFakeNode(t, "", "v1.2.3", map[string]int64{db.Repository + "@" + d2.String(): 2500}, true)
	down := httptest.NewServer(http.NotFoundHandler())
	down.Close()
	garbage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/berth/v1/node" {
			writeJSON(w, 200, NodeFacts{OS: "linux", Arch: "arm64", Version: "v0.9"})
			return
		}
		w.Write([]byte("<html>not a node</html>"))
	}))
	defer garbage.Close()
	s := NewService(ServiceOptions{Store: mem, Discovery: Discovery{Static: []string{warm.url, cold.url, down.URL, garbage.URL}}})

	f := s.Fleet(context.Background())
	if f.Error != nil || len(f.Pins) != 2 || len(f.Nodes) != 4 {
		t.Fatalf("fleet: %+v", f)
	}
	if f.Pins[0].Image.Digest != d1 || f.Pins[1].Image.Digest != d2 || !f.Pins[1].Until.Equal(now.Add(2*time.Hour)) || strings.Join(f.Pins[1].Jobs, ",") != "a,b" {
		t.Errorf("pins: %+v", f.Pins)
	}
	if f.Pins[0].Image.Ref != app.Ref {
		t.Errorf("the pin lost its reference: %+v", f.Pins[0].Image)
	}
	rows := map[string]FleetNode{}
	for _, n := range f.Nodes {
		rows[n.Node] = n
	}
	if r := rows[warm.url]; r.Error != nil || r.Facts == nil || r.Facts.Version != "v1.2.3" || !r.Cells[0].Warm || !r.Cells[1].Warm || !r.Warm() {
		t.Errorf("warm node: %+v", r)
	}
	if r := rows[cold.url]; r.Error != nil || !r.Cells[0].Warm || r.Cells[1].Warm || r.Cells[1].MissingBytes != 2500 || r.Warm() {
		t.Errorf("cold node: %+v", r)
	}
	if r := rows[down.URL]; r.Error == nil || r.Error.Kind != "node_unreachable" || r.Facts != nil || len(r.Cells) != 2 || r.Cells[1].Error == nil {
		t.Errorf("down node: %+v", r)
	}
	if r := rows[garbage.URL]; r.Error != nil || r.Facts == nil || r.Cells[0].Error == nil || r.Cells[0].Error.Kind != "bad_answer" || r.Warm() {
		t.Errorf("garbage node: %+v", r)
	}
	if f.WarmNodes != 1 {
		t.Errorf("warm nodes %d, want 1", f.WarmNodes)
	}
	// One request per node for both images.
	if len(cold.queries) != 1 || strings.Count(cold.queries[0], "image=") != 2 {
		t.Errorf("warm queries %q", cold.queries)
	}

	// The JSON form and the page, through the coordinator's door.
	h := s.Handler()
	w := do(h, "GET", "/berth/v1/coordinator/fleet", loop, "", nil)
	var got Fleet
	if w.Code != 200 || json.Unmarshal(w.Body.Bytes(), &got) != nil || len(got.Nodes) != 4 || got.WarmNodes != 1 {
		t.Errorf("GET fleet: %d %s", w.Code, w.Body)
	}
	w = do(h, "GET", "/ui/", loop, "", nil)
	page := w.Body.String()
	if w.Code != 200 || !strings.HasPrefix(w.Header().Get("Content-Type"), "text/html") || !strings.Contains(w.Header().Get("Content-Security-Policy"), "default-src 'none'") {
		t.Fatalf("page: %d %v", w.Code, w.Header())
	}
	for _, want := range []string{"registry.test/org/app:&lt;script&gt;x&lt;/script&gt;", "2.4 KiB missing", ">warm<", "node_unreachable", "bad_answer", "v1.2.3", "linux/arm64", "1 nodes warm"} {
		if !strings.Contains(page, want) {
			t.Errorf("the page lacks %q:\n%s", want, page)
		}
	}
	if strings.Contains(page, "<script>") {
		t.Error("the page carries an unescaped <script>")
	}
	if w := do(h, "GET", "/ui/static/style.css", loop, "", nil); w.Code != 200 || !strings.Contains(w.Body.String(), "meter.bar") {
		t.Errorf("style: %d", w.Code)
	}
}

func TestFleetPageNeedsTheAPIToken(t *testing.T) {
	mem := storage.NewMemory(storage.MemoryOptions{})
	tok := "fleet-page-token-0123456789"
	s := NewService(ServiceOptions{Store: mem, Discovery: Discovery{Static: []string{}}, APITokens: tokens(t, tok)})
	h := s.Handler()
	remote := "10.1.2.3:5555"
	for _, path := range []string{"/ui/", "/berth/v1/coordinator/fleet"} {
		w := do(h, "GET", path, loop, "", nil)
		if w.Code != 401 {
			t.Errorf("%s without a token, from loopback: %d", path, w.Code)
		}
	}
	w := do(h, "GET", "/ui/", remote, "", nil)
	if w.Code != 401 || !strings.HasPrefix(w.Header().Get("WWW-Authenticate"), "Basic ") {
		t.Errorf("page without a token: %d %v", w.Code, w.Header())
	}
	if w := do(h, "GET", "/berth/v1/coordinator/fleet", remote, "", nil); !strings.HasPrefix(w.Header().Get("WWW-Authenticate"), "Bearer ") {
		t.Errorf("API challenge %v", w.Header())
	}
	r := httptest.NewRequest("GET", "/ui/", nil)
	r.RemoteAddr = remote
	r.SetBasicAuth("anyone", tok)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r)
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), "no node discovered") {
		t.Errorf("page with the token as a password: %d %s", rec.Code, rec.Body)
	}
	r.SetBasicAuth("anyone", "wrong-token-0123456789")
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, r)
	if rec.Code != 401 {
		t.Errorf("page with a wrong password: %d", rec.Code)
	}
	if w := do(h, "GET", "/berth/v1/coordinator/fleet", remote, tok, nil); w.Code != 200 {
		t.Errorf("fleet JSON with the token: %d %s", w.Code, w.Body)
	}
}

// URLs that reach one node ID are one row, asked once; nodes without an
// ID stay one row per URL.
func TestFleetMergesTheURLsOfOneNode(t *testing.T) {
	img := Image{Repository: "registry.test/org/app", Digest: digest.FromString("app v1")}
	mem := storage.NewMemory(storage.MemoryOptions{})
	putJobs(t, mem, JobRecord{ID: "a", State: StateSucceeded, Spec: JobSpec{PinUntil: time.Now().Add(time.Hour)}, Images: []Image{img}})
	n := newFakeNode(t, "0123456789abcdef0123456789abcdef", "v2", nil, true)
	again := n.alias(t)
	old := newFakeNode(t, "", "v1", nil, true)
	oldAgain := old.alias(t)
	s := NewService(ServiceOptions{Store: mem, Discovery: Discovery{Static: []string{n.url, old.url, again, oldAgain}}})
	f := s.Fleet(context.Background())
	if len(f.Nodes) != 3 || f.WarmNodes != 3 {
		t.Fatalf("rows: %+v", f.Nodes)
	}
	var merged []FleetNode
	var unnamed []string
	for _, r := range f.Nodes {
		if r.Facts != nil && r.Facts.ID == n.id {
			merged = append(merged, r)
		} else if len(r.Aliases) == 0 {
			unnamed = append(unnamed, r.Node)
		}
	}
	if len(merged) != 1 || !slices.Equal(sorted(append([]string{merged[0].Node}, merged[0].Aliases...)), sorted([]string{n.url, again})) || !merged[0].Warm() {
		t.Fatalf("the node reached twice: %+v", merged)
	}
	if !slices.Equal(sorted(unnamed), sorted([]string{old.url, oldAgain})) {
		t.Errorf("the node without an ID: %v", unnamed)
	}
	if len(n.queries) != 1 {
		t.Errorf("the node reached twice was asked %d times for its warmth", len(n.queries))
	}
	w := do(s.Handler(), "GET", "/ui/", loop, "", nil)
	for _, want := range []string{"= " + merged[0].Aliases[0], "id " + n.id, "node-" + n.id, "3 nodes"} {
		if !strings.Contains(w.Body.String(), want) {
			t.Errorf("the page lacks %q:\n%s", want, w.Body)
		}
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

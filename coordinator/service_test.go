package coordinator

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/storage"
)

// servedNode is a node API on a loopback HTTP server that counts prefetches.
type servedNode struct {
	*testNode
	url      string
	prefetch atomic.Int64 // prefetch requests, through every URL of the node
	facts    atomic.Int64 // facts requests, likewise
}

func serveNode(t *testing.T, up *upstream) *servedNode {
	t.Helper()
	sn := &servedNode{testNode: startNode(t, up, "", 1<<30, nil)}
	sn.url = sn.alias(t)
	return sn
}

// alias serves the node at one more URL, as a node is reached under its
// IP and its DNS name; prefetches through every URL are counted together.
func (sn *servedNode) alias(t *testing.T) string {
	srv := httptest.NewServer(http.HandlerFunc(sn.serve))
	t.Cleanup(srv.Close)
	return srv.URL
}

func (sn *servedNode) serve(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodPost && r.URL.Path == "/berth/v1/prefetch":
		sn.prefetch.Add(1)
	case r.URL.Path == "/berth/v1/node":
		sn.facts.Add(1)
	}
	sn.h.ServeHTTP(w, r)
}

func startService(t *testing.T, store Store, o ServiceOptions) (*Service, string) {
	t.Helper()
	o.Store = store
	if o.Poll == 0 {
		o.Poll = 50 * time.Millisecond
	}
	if o.Interval == 0 {
		o.Interval = 100 * time.Millisecond
	}
	if o.LeaseTTL == 0 {
		o.LeaseTTL = time.Second
	}
	s := NewService(o)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	srv := httptest.NewServer(s.Handler())
	t.Cleanup(srv.Close)
	return s, srv.URL
}

func waitJob(t *testing.T, s *Service, id string) JobRecord {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		r, err := s.getJob(context.Background(), id)
		if err == nil && r.Terminal() {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s: %+v %v", id, r, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestServiceRunsAJobOnceWithTwoCoordinators(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(3000, 2)
	up.push("org/app", "v1", img)
	_, total := blobsOf(t, img)
	nodes := []*servedNode{serveNode(t, up), serveNode(t, up), serveNode(t, up)}
	var urls []string
	for _, n := range nodes {
		urls = append(urls, n.url)
	}
	mem := storage.NewMemory(storage.MemoryOptions{})
	s1, api1 := startService(t, mem.Host("coordinator-1"), ServiceOptions{Discovery: Discovery{Static: urls}})
	s2, _ := startService(t, mem.Host("coordinator-2"), ServiceOptions{Discovery: Discovery{Static: urls}})

	c := &Client{Base: api1}
	id, err := c.Submit(context.Background(), JobSpec{Refs: []string{"registry.test/org/app:v1", "registry.test/org/nope:v1"}, PinUntil: time.Now().Add(time.Hour), Require: "all"})
	if err != nil {
		t.Fatal(err)
	}
	r := waitJob(t, s1, id)
	if r2, _ := s2.getJob(context.Background(), id); r2.State != r.State {
		t.Errorf("the two coordinators disagree: %s, %s", r.State, r2.State)
	}
	// One ref did not resolve: the job fails the policy, the rest is warm.
	if r.State != StateFailed || r.RefErrors["registry.test/org/nope:v1"] == nil || r.RefErrors["registry.test/org/nope:v1"].Kind != "not_found" {
		t.Errorf("job: %s %+v", r.State, r.RefErrors)
	}
	if r.Attempts != 1 || len(r.Nodes) != 3 {
		t.Errorf("attempts %d, nodes %d", r.Attempts, len(r.Nodes))
	}
	var prefetches int64
	for _, n := range nodes {
		prefetches += n.prefetch.Load()
		if f := n.node.Facts(); f.PinnedBytes != total {
			t.Errorf("%s pinned %d bytes, want %d", n.url, f.PinnedBytes, total)
		}
	}
	// One bucket fill and one per node: the job ran once.
	if prefetches != 4 {
		t.Errorf("%d prefetch requests to the nodes, want 4 (the job ran more than once?)", prefetches)
	}
	// The API: get, list, events; the job record is in the bucket.
	got, err := c.CoordinatorJob(context.Background(), id)
	if err != nil || got.ID != id {
		t.Errorf("get: %+v %v", got, err)
	}
	if _, err := mem.GetObject(context.Background(), jobObject(id)); err != nil {
		t.Errorf("record not in the bucket: %v", err)
	}
	var last JobRecord
	if err := Events(context.Background(), nil, api1+"/berth/v1/coordinator/jobs/"+id+"/events", "", func(ev string, data []byte) error {
		return json.Unmarshal(data, &last)
	}); err != nil || !last.Terminal() {
		t.Errorf("events: %v %+v", err, last.State)
	}
}

func TestServiceResumesAJobWhoseCoordinatorDied(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(2000, 2)
	d := up.push("org/app", "v1", img)
	n := serveNode(t, up)
	mem := storage.NewMemory(storage.MemoryOptions{})
	// A coordinator took the job and died: its record says running, its
	// lease runs out.
	rec := JobRecord{ID: "dead-job", Source: "api", State: StateRunning, Created: time.Now().UTC(), Attempts: 1,
		Spec: JobSpec{Images: []Image{{Repository: "registry.test/org/app", Digest: digest.Digest(d.String())}}}}
	b, _ := json.Marshal(rec)
	mem.PutObject(context.Background(), jobObject(rec.ID), b)
	if _, err := mem.Host("dead").AcquireLease(context.Background(), jobLease(rec.ID), 500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	s, _ := startService(t, mem.Host("alive"), ServiceOptions{Discovery: Discovery{Static: []string{n.url}}})
	r := waitJob(t, s, rec.ID)
	if r.State != StateSucceeded || r.Attempts != 2 {
		t.Errorf("resumed job: %s after %d attempts", r.State, r.Attempts)
	}
}

// pinnedJobFromFile starts a coordinator that discovers its nodes from a
// file, first listing node, and runs a job pinning registry.test/org/app:v1
// for an hour to its success.
func pinnedJobFromFile(t *testing.T, node string) (list string, rec JobRecord) {
	t.Helper()
	list = filepath.Join(t.TempDir(), "nodes")
	os.WriteFile(list, []byte(node+"\n"), 0o644)
	s, api := startService(t, storage.NewMemory(storage.MemoryOptions{}), ServiceOptions{Discovery: Discovery{File: list}})
	id, err := (&Client{Base: api}).Submit(context.Background(), JobSpec{Refs: []string{"registry.test/org/app:v1"}, PinUntil: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if rec = waitJob(t, s, id); rec.State != StateSucceeded {
		t.Fatalf("job %s", rec.State)
	}
	return list, rec
}

func TestServiceWarmsANodeThatJoins(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(2000, 2)
	up.push("org/app", "v1", img)
	first := serveNode(t, up)
	list, _ := pinnedJobFromFile(t, first.url)
	late := serveNode(t, up)
	if code, st := late.warmCode(); code != 200 || st.Pins != 0 {
		t.Fatalf("the new node before joining: %d %+v", code, st)
	}
	os.WriteFile(list, []byte(first.url+"\n"+late.url+"\n"), 0o644)
	deadline := time.Now().Add(15 * time.Second)
	for {
		code, st := late.warmCode()
		if code == 200 && st.Pins > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the node that joined was not warmed: %d %+v", code, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestServiceWarmOnPush(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(2000, 1)
	d := up.push("team/app", "v2", img)
	n := serveNode(t, up)
	mem := storage.NewMemory(storage.MemoryOptions{})
	rule, _ := ParsePushRule("team/*:v*")
	s, api := startService(t, mem, ServiceOptions{Discovery: Discovery{Static: []string{n.url}}, PushRegistry: "registry.test", PushRules: []PushRule{rule}, PushPin: time.Hour})
	envelope := func(repo, tag, mt string) string {
		return `{"events":[{"id":"1","timestamp":"2026-01-01T00:00:00Z","action":"push","target":{"mediaType":"` + mt +
			`","digest":"` + d.String() + `","size":500,"repository":"` + repo + `","tag":"` + tag + `"},"request":{"host":"registry.example"}}]}`
	}
	post := func(body string) (int, []string) {
		req, _ := http.NewRequest("POST", api+"/berth/v1/coordinator/notifications", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/vnd.docker.distribution.events.v1+json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out struct{ Jobs []string }
		json.NewDecoder(resp.Body).Decode(&out)
		return resp.StatusCode, out.Jobs
	}
	for _, skip := range []string{
		envelope("other/app", "v2", "application/vnd.oci.image.manifest.v1+json"),
		envelope("team/app", "latest", "application/vnd.oci.image.manifest.v1+json"),
		envelope("team/app", "v2", "application/octet-stream"), // a blob push
	} {
		if code, jobs := post(skip); code != 200 || len(jobs) != 0 {
			t.Errorf("a push no rule selects made jobs: %d %v", code, jobs)
		}
	}
	code, jobs := post(envelope("team/app", "v2", "application/vnd.oci.image.manifest.v1+json"))
	if code != 200 || len(jobs) != 1 {
		t.Fatalf("push: %d %v", code, jobs)
	}
	r := waitJob(t, s, jobs[0])
	if r.State != StateSucceeded || r.Source != "push" || r.Spec.PinUntil.IsZero() {
		t.Errorf("job: %+v", r)
	}
	if code, st := n.warmCode(); code != 200 || st.Pins == 0 {
		t.Errorf("node after the push: %d %+v", code, st)
	}
	if code, _ := post("{not json"); code != 400 {
		t.Errorf("bad envelope: %d", code)
	}
}

func TestServiceAuth(t *testing.T) {
	mem := storage.NewMemory(storage.MemoryOptions{})
	s := NewService(ServiceOptions{Store: mem, Discovery: Discovery{Static: []string{"http://127.0.0.1:1"}}})
	h := s.Handler()
	if w := do(h, "GET", "/berth/v1/coordinator/jobs", "192.0.2.1:4000", "", nil); w.Code != 401 || !strings.Contains(w.Body.String(), "UNAUTHORIZED") {
		t.Errorf("no token from a non-loopback address: %d %s", w.Code, w.Body)
	}
	if w := do(h, "GET", "/berth/v1/coordinator/jobs", loop, "", nil); w.Code != 200 {
		t.Errorf("loopback without tokens configured: %d %s", w.Code, w.Body)
	}
	s = NewService(ServiceOptions{Store: mem, Discovery: Discovery{Static: []string{"http://127.0.0.1:1"}}, APITokens: tokens(t, adminToken)})
	h = s.Handler()
	for _, c := range []struct {
		remote, tok string
		want        int
	}{{loop, "", 401}, {loop, "wrong-wrong-wrong-wrong", 401}, {"192.0.2.1:4000", adminToken, 200}} {
		if w := do(h, "GET", "/berth/v1/coordinator/jobs", c.remote, c.tok, nil); w.Code != c.want {
			t.Errorf("%s token %v: %d, want %d", c.remote, c.tok != "", w.Code, c.want)
		}
	}
	if w := do(h, "POST", "/berth/v1/coordinator/jobs", loop, adminToken, JobSpec{}); w.Code != 400 {
		t.Errorf("empty job: %d %s", w.Code, w.Body)
	}
	if w := do(h, "GET", "/berth/v1/coordinator/jobs/nope", loop, adminToken, nil); w.Code != 404 {
		t.Errorf("unknown job: %d %s", w.Code, w.Body)
	}
}

func TestServiceCancel(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(2000, 1)
	up.push("org/app", "v1", img)
	ls, _ := img.Layers()
	h, _ := ls[0].Digest()
	release := make(chan struct{})
	up.fault(h.String(), func(w http.ResponseWriter) bool {
		<-release // the layer hangs until the test ends
		return false
	})
	defer close(release)
	n := serveNode(t, up)
	mem := storage.NewMemory(storage.MemoryOptions{})
	s, api := startService(t, mem, ServiceOptions{Discovery: Discovery{Static: []string{n.url}}, LeaseTTL: 30 * time.Second})
	c := &Client{Base: api}
	id, err := c.Submit(context.Background(), JobSpec{Refs: []string{"registry.test/org/app:v1"}, PinUntil: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		r, _ := s.getJob(context.Background(), id)
		if r.State == StateRunning && len(r.Images) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("job never ran: %+v", r)
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // into the node's job
	req, _ := http.NewRequest(http.MethodDelete, api+"/berth/v1/coordinator/jobs/"+id, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusAccepted {
		t.Fatalf("cancel: %v %v", resp, err)
	}
	resp.Body.Close()
	r := waitJob(t, s, id)
	if r.State != StateCanceled {
		t.Errorf("job after cancel: %s", r.State)
	}
	b, _ := mem.GetObject(context.Background(), jobObject(id))
	var stored JobRecord
	json.Unmarshal(b, &stored)
	if stored.State != StateCanceled {
		t.Errorf("stored record: %s", stored.State)
	}
	// The node's job was canceled too, and its pins undone.
	deadline = time.Now().Add(10 * time.Second)
	for {
		if f := n.node.Facts(); f.Pins == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the node still has pins after the cancel: %+v", n.node.Facts())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The coordinator remembers the nodes it warmed by node ID: a warm node
// that comes back under another address is not warmed again, and an
// empty node at an address a warm one had is.
func TestServiceKnowsNodesByID(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(2000, 2)
	up.push("org/app", "v1", img)
	a, fresh := serveNode(t, up), serveNode(t, up)
	// One address, served by a, then by a fresh node (a new disk).
	var at atomic.Pointer[servedNode]
	at.Store(a)
	addr := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { at.Load().serve(w, r) }))
	t.Cleanup(addr.Close)
	list, r := pinnedJobFromFile(t, addr.URL)
	if len(r.Nodes) != 1 || r.Nodes[0].ID != a.node.Facts().ID {
		t.Fatalf("job: %+v", r.Nodes)
	}
	if n := a.prefetch.Load(); n != 1 {
		t.Fatalf("the job sent %d prefetches to its one node", n)
	}

	// a moves to another address: the coordinator asks it who it is
	// (three membership passes, at least) and leaves it be.
	moved := a.alias(t)
	asked := a.facts.Load()
	os.WriteFile(list, []byte(moved+"\n"), 0o644)
	waitFor(t, "three membership passes", func() bool { return a.facts.Load() >= asked+3 })
	if n := a.prefetch.Load(); n != 1 {
		t.Errorf("a warm node under a new address was warmed again: %d prefetches", n)
	}

	// A fresh node at a's old address is another node: it is warmed.
	at.Store(fresh)
	os.WriteFile(list, []byte(moved+"\n"+addr.URL+"\n"), 0o644)
	waitFor(t, "the fresh node warm", func() bool {
		code, st := fresh.warmCode()
		return code == 200 && st.Pins > 0
	})
	if n := a.prefetch.Load(); n != 1 {
		t.Errorf("the warm node was warmed again: %d prefetches", n)
	}
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 15s for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

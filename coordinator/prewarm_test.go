package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/internal/testsupport"
)

// Run gives every node a result: warm ones succeed, a node that is down
// or answers garbage fails with its reason, and the others go on.
func TestRunReportsEachNode(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(3000, 2)
	d := up.push("org/app", "v1", img)
	_, total := blobsOf(t, img)
	good := []*servedNode{serveNode(t, up), serveNode(t, up)}
	garbage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		w.Write([]byte("<html>login</html>"))
	}))
	defer garbage.Close()
	down := httptest.NewServer(http.NotFoundHandler())
	down.Close()

	var mu sync.Mutex
	var events []Progress
	res := Run(context.Background(), RunOptions{
		Nodes:    []string{good[0].url, garbage.URL, down.URL, good[1].url},
		Images:   []Image{{Repository: "registry.test/org/app", Digest: digest.Digest(d.String()), Ref: "registry.test/org/app:v1"}},
		PinUntil: time.Now().Add(time.Hour), Parallel: 1,
		Report: func(p Progress) { mu.Lock(); events = append(events, p); mu.Unlock() },
	})
	want := map[string]string{good[0].url: "", good[1].url: "", garbage.URL: "bad_answer", down.URL: "node_unreachable"}
	for _, n := range res.Nodes {
		kind := ""
		if n.Error != nil {
			kind = n.Error.Kind
		}
		if kind != want[n.Node] {
			t.Errorf("%s: %s %q, want %q", n.Node, n.State, kind, want[n.Node])
		}
		if kind == "" && (n.State != StateSucceeded || n.BytesDone != total || n.ImagesDone != 1) {
			t.Errorf("%s: %+v", n.Node, n)
		}
	}
	if res.Succeeded() != 2 || res.Seed != good[0].url {
		t.Errorf("succeeded %d, seed %s", res.Succeeded(), res.Seed)
	}
	// The bucket phase ran on the seed only, without a pin, then every node with it.
	if good[0].prefetch.Load() != 2 || good[1].prefetch.Load() != 1 {
		t.Errorf("prefetches: seed %d, other %d", good[0].prefetch.Load(), good[1].prefetch.Load())
	}
	mu.Lock()
	defer mu.Unlock()
	last := map[string]int64{}
	for _, e := range events {
		k := e.Node + e.Phase
		if e.BytesDone < last[k] {
			t.Errorf("%s %s: progress went back", e.Node, e.Phase)
		}
		last[k] = e.BytesDone
	}
}

func TestDirectResolver(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(100, 1)
	d := up.push("org/app", "v1", img)
	ctx := context.Background()
	got, err := DirectResolver()(ctx, up.host+"/org/app:v1")
	if err != nil || got.Digest.String() != d.String() || got.Repository != up.host+"/org/app" {
		t.Errorf("resolve: %+v %v", got, err)
	}
	_, err = DirectResolver()(ctx, up.host+"/org/app:nope")
	if ei := infoOf(err); ei == nil || ei.Kind != "not_found" {
		t.Errorf("missing tag: %v", err)
	}
	if _, err := DirectResolver()(ctx, "Bad::Ref"); infoOf(err).Kind != "invalid_reference" {
		t.Errorf("bad reference: %v", err)
	}
	imgs, bad := ResolveAll(ctx, []string{up.host + "/org/app:v1", up.host + "/org/app@" + d.String(), "x y"}, DirectResolver())
	if len(imgs) != 1 || len(bad) != 1 || !strings.Contains(bad["x y"].Kind, "invalid") {
		t.Errorf("ResolveAll: %+v %+v", imgs, bad)
	}
}

// The nodes start while the seed is still fetching: a layer the upstream
// holds back mid-body does not keep them waiting for the whole image, and
// they are told which blobs the seed is fetching (to stream from it).
func TestRunStartsNodesWhileTheSeedFetches(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(200_000, 2)
	d := up.push("org/app", "v1", img)
	layers, _ := img.Layers()
	slow, _ := layers[0].Digest()
	rc, _ := layers[0].Compressed()
	body, _ := io.ReadAll(rc)
	gate := make(chan struct{})
	up.fault(slow.String(), func(w http.ResponseWriter) bool {
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		w.Header().Set("Docker-Content-Digest", slow.String())
		w.WriteHeader(http.StatusOK)
		w.Write(body[:1000])
		w.(http.Flusher).Flush()
		<-gate
		w.Write(body[1000:])
		return true
	})
	seed := startNode(t, up, "", 1<<30, nil)
	other := startNode(t, up, "", 1<<30, nil)
	var mu sync.Mutex
	var asked []PrefetchRequest
	var askedOf []*testNode
	serve := func(n *testNode) string {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPost && r.URL.Path == "/berth/v1/prefetch" {
				b, _ := io.ReadAll(r.Body)
				var req PrefetchRequest
				json.Unmarshal(b, &req)
				mu.Lock()
				asked = append(asked, req)
				askedOf = append(askedOf, n)
				mu.Unlock()
				r.Body = io.NopCloser(bytes.NewReader(b))
			}
			n.h.ServeHTTP(w, r)
		}))
		t.Cleanup(srv.Close)
		return srv.URL
	}
	seedURL, otherURL := serve(seed), serve(other)
	done := make(chan RunResult, 1)
	go func() {
		done <- Run(context.Background(), RunOptions{
			Nodes:  []string{seedURL, otherURL},
			Images: []Image{{Repository: "registry.test/org/app", Digest: digest.Digest(d.String())}},
		})
	}()
	testsupport.Eventually(t, "the other node asked while the seed fetches", 20*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(asked) == 3 // the seed's bucket phase, then both nodes'
	})
	close(gate)
	res := <-done
	if res.Succeeded() != 2 || res.Seed != seedURL {
		t.Fatalf("succeeded %d, seed %s: %+v", res.Succeeded(), res.Seed, res.Nodes)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(asked[0].FromHolder) != 0 {
		t.Errorf("the bucket phase was told to stream from a holder: %v", asked[0].FromHolder)
	}
	for i, req := range asked[1:] {
		switch fetching := slices.Contains(req.FromHolder, digest.Digest(slow.String())); {
		case askedOf[i+1] == other && !fetching:
			t.Errorf("the other node was not told the seed fetches %s: %v", slow, req.FromHolder)
		case askedOf[i+1] == seed && len(req.FromHolder) > 0:
			t.Errorf("the seed was told to stream from a holder: %v", req.FromHolder)
		}
	}
}

// A node reached under two URLs is one node: warmed once, under the first
// URL, and counted once, so a policy cannot be met with fewer distinct
// nodes than it asks for.
func TestRunMergesTheURLsOfOneNode(t *testing.T) {
	up := newUpstream(t)
	img, _ := random.Image(3000, 2)
	d := up.push("org/app", "v1", img)
	_, total := blobsOf(t, img)
	images := []Image{{Repository: "registry.test/org/app", Digest: digest.Digest(d.String())}}
	a, b := serveNode(t, up), serveNode(t, up)
	aAgain := a.alias(t)

	// b first: it fills the bucket, so a is asked for its own job only.
	res := Run(context.Background(), RunOptions{Nodes: []string{b.url, a.url, aAgain}, Images: images, PinUntil: time.Now().Add(time.Hour)})
	if len(res.Nodes) != 2 || res.Succeeded() != 2 {
		t.Fatalf("results: %+v", res.Nodes)
	}
	ra := res.Nodes[1]
	if ra.Node != a.url || !slices.Equal(ra.Aliases, []string{aAgain}) || ra.ID != a.node.Facts().ID || ra.BytesDone != total {
		t.Errorf("the node reached twice: %+v (its first URL %s, its ID %s)", ra, a.url, a.node.Facts().ID)
	}
	if rb := res.Nodes[0]; rb.Node != b.url || len(rb.Aliases) != 0 || rb.ID != b.node.Facts().ID || rb.ID == ra.ID {
		t.Errorf("the other node: %+v", rb)
	}
	if n := a.prefetch.Load(); n != 1 {
		t.Errorf("the node reached under two URLs got %d prefetch jobs, want 1", n)
	}
	for _, c := range []struct {
		require string
		met     bool
	}{{"2", true}, {"3", false}, {"100%", true}} {
		p, _ := ParsePolicy(c.require)
		if got := p.Met(res.Succeeded(), len(res.Nodes)); got != c.met {
			t.Errorf("--require %s over 3 URLs of 2 nodes: met %v, want %v", c.require, got, c.met)
		}
	}

	// Two URLs of one node alone: one node, no bucket phase, and
	// --require 2 is not met.
	before := a.prefetch.Load()
	res = Run(context.Background(), RunOptions{Nodes: []string{aAgain, a.url}, Images: images})
	if len(res.Nodes) != 1 || res.Nodes[0].Node != aAgain || !slices.Equal(res.Nodes[0].Aliases, []string{a.url}) || res.Seed != "" {
		t.Errorf("two URLs of one node: %+v, seed %q", res.Nodes, res.Seed)
	}
	if n := a.prefetch.Load() - before; n != 1 {
		t.Errorf("two URLs of one node: %d prefetch jobs, want 1", n)
	}
	if p, _ := ParsePolicy("2"); p.Met(res.Succeeded(), len(res.Nodes)) {
		t.Error("--require 2 was met by two URLs of one node")
	}
}

// Nodes that give no ID (older than node IDs) and URLs that reach no node
// are told apart by URL, as before.
func TestRunKeysNodesWithoutAnIDByURL(t *testing.T) {
	old := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/berth/v1/node" {
			writeJSON(w, 200, NodeFacts{OS: "linux", Arch: "amd64", Version: "v0.9"})
			return
		}
		writeError(w, 500, ErrorCodeFailed, "internal", "an old node that fails every job")
	}))
	defer old.Close()
	oldAgain := strings.Replace(old.URL, "127.0.0.1", "localhost", 1)
	down := httptest.NewServer(http.NotFoundHandler())
	down.Close()
	res := Run(context.Background(), RunOptions{Nodes: []string{old.URL, oldAgain, down.URL, down.URL},
		Images: []Image{{Repository: "registry.test/org/app", Digest: digest.FromString("x")}}})
	if len(res.Nodes) != 4 {
		t.Fatalf("%d results, want 4: %+v", len(res.Nodes), res.Nodes)
	}
	for _, n := range res.Nodes {
		if n.ID != "" || len(n.Aliases) != 0 || n.State != StateFailed {
			t.Errorf("%+v", n)
		}
	}
}

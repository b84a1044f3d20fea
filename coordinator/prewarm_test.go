package coordinator

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"
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

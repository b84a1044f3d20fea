package e2e

// The coordinator's fleet page (docs/prewarm.md): real `berth serve` nodes
// on one MinIO bucket, a real `berth coordinator`, a job that pins an image
// on a node with room and is refused on a node without; the fleet JSON and
// the page in Debian's chromium show one node warm, one missing the pin's
// bytes, one unreachable, and the job's reference holding a <script> as text.
// And the node's pre-warm queue as the scaler feed and its gauge report it.

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/coordinator"
	"github.com/berth-dev/berth/inspector/web"
	"github.com/berth-dev/berth/internal/testsupport"
)

func TestCoordinatorFleetPage(t *testing.T) {
	chromium := testsupport.RequireTool(t, "chromium")
	f := newPWFleet(t)
	img := PushImage(t, OCI, f.reg.Host, "org/app", "v1", 1<<20, 2)
	roomy := f.node(t, "", "")
	tight := f.node(t, "", "", "--cache-size", "512KiB") // the pin cannot fit
	down := "http://" + testsupport.FreeAddr(t)          // nothing listens there
	c := startCoordinator(t, f, testsupport.FreeAddr(t), "--nodes", strings.Join([]string{roomy.FleetURL, tight.FleetURL, down}, ","))

	// A job submitted by digest with a reference that tries to run a script:
	// the API takes resolved images as they come, so the page must escape it.
	ref := "docker.io/org/app:" + xssLabel
	pin := coordinator.Image{Repository: "docker.io/org/app", Digest: digest.Digest(img.Digest), Ref: ref}
	cl := &coordinator.Client{Base: c.URL, Token: f.adminToken}
	id, err := cl.Submit(context.Background(), coordinator.JobSpec{Images: []coordinator.Image{pin}, PinUntil: time.Now().Add(time.Hour).UTC().Truncate(time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		rec, err := cl.CoordinatorJob(context.Background(), id)
		if err == nil && rec.Terminal() {
			t.Logf("job %s: %s", id, rec.State)
			break
		}
		if time.Now().After(deadline) {
			c.ShowLog(t, 40)
			t.Fatalf("job %s did not end: %+v %v", id, rec, err)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// What the tight node itself says it lacks, for the page to show.
	st, err := (&coordinator.Client{Base: tight.FleetURL, Token: f.adminToken}).WarmImages(context.Background(), []coordinator.Image{pin}, nil)
	if err != nil || len(st.Images) != 1 {
		t.Fatalf("the tight node's warmth: %+v %v", st, err)
	}
	missing := st.Images[0].MissingBytes
	if missing <= 0 || st.Images[0].Warm {
		t.Fatalf("the tight node should lack the pin: %+v", st.Images[0])
	}

	// The JSON form.
	code, body := nodeGet(t, c.URL+"/berth/v1/coordinator/fleet", f.adminToken)
	var fl coordinator.Fleet
	if code != 200 || json.Unmarshal(body, &fl) != nil {
		t.Fatalf("GET fleet: %d %s", code, body)
	}
	if len(fl.Pins) != 1 || fl.Pins[0].Image.Ref != ref || len(fl.Nodes) != 3 || fl.WarmNodes != 1 {
		t.Fatalf("fleet: %s", body)
	}
	rows := map[string]coordinator.FleetNode{}
	for _, n := range fl.Nodes {
		rows[n.Node] = n
	}
	if r := rows[roomy.FleetURL]; r.Error != nil || r.Facts == nil || !r.Cells[0].Warm || r.Cells[0].Bytes != blobBytes(img) {
		t.Errorf("the roomy node: %+v", r)
	}
	if r := rows[tight.FleetURL]; r.Error != nil || r.Cells[0].Warm || r.Cells[0].MissingBytes != missing {
		t.Errorf("the tight node: %+v", r)
	}
	if r := rows[down]; r.Error == nil || r.Error.Kind != "node_unreachable" {
		t.Errorf("the down node: %+v", r)
	}
	if code, _ := nodeGet(t, c.URL+"/ui/", ""); code != 401 {
		t.Errorf("the page without the token: %d", code)
	}

	// The page, in chromium, with the token on every request.
	shots := filepath.Join(artifactsRoot(t), "coordinator")
	if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	b := newBrowser(t, chromium)
	text, scripts, xss, shot, problems := b.loadWith(t, c.URL+"/ui/", network.Headers{"Authorization": "Bearer " + f.adminToken})
	if err := os.WriteFile(filepath.Join(shots, "fleet.png"), shot, 0o644); err != nil {
		t.Fatal(err)
	}
	if len(problems) > 0 {
		t.Errorf("console errors on the fleet page:\n%s", strings.Join(problems, "\n"))
	}
	for _, want := range []string{ref, img.Digest, roomy.FleetURL, tight.FleetURL, down, "warm", web.Bytes(missing) + " missing",
		"node_unreachable", "1 nodes warm", "3 nodes", "1 active pins", "reachable", "unreachable"} {
		if !strings.Contains(text, want) {
			t.Errorf("the fleet page does not show %q; it shows:\n%s", want, text)
		}
	}
	if scripts != 0 || xss {
		t.Errorf("the fleet page has %d script elements, injected script ran: %v", scripts, xss)
	}
	// Same text for a browser that logs in with the token as a password.
	req, _ := http.NewRequest(http.MethodGet, c.URL+"/ui/", nil)
	req.SetBasicAuth("ops", f.adminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var page bytes.Buffer
	page.ReadFrom(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(page.String(), "&lt;script&gt;") {
		t.Errorf("the page with basic authentication: %d", resp.StatusCode)
	}
	if c.LogContains(f.adminToken) {
		t.Error("the coordinator logged a token")
	}
}

// berth serve wires the node's pre-warm queue into the scaler feed and the
// berth_prewarm_queue gauge: above zero while a prefetch of a slow image
// runs, zero once it has ended.
func TestPrewarmQueueGauge(t *testing.T) {
	f := newPWFleet(t)
	img := PushImage(t, OCI, f.reg.Host, "org/slow", "v1", 2<<20, 2)
	n := f.node(t, "", "")
	f.up.rate.Store(1 << 20) // each 2 MiB layer takes about 2s
	queue := func() (gauge, feed int) {
		t.Helper()
		code, body := nodeGet(t, n.URL+"/metrics", "")
		if code != 200 {
			t.Fatalf("/metrics: %d", code)
		}
		gauge = -1
		for _, l := range strings.Split(string(body), "\n") {
			if v, ok := strings.CutPrefix(l, "berth_prewarm_queue "); ok {
				gauge, _ = strconv.Atoi(strings.TrimSpace(v))
			}
		}
		code, body = nodeGet(t, n.URL+"/berth/v1/scaler", "")
		var fd struct {
			PrewarmQueue *int `json:"prewarm_queue"`
		}
		if code != 200 || json.Unmarshal(body, &fd) != nil || fd.PrewarmQueue == nil {
			t.Fatalf("/berth/v1/scaler: %d %s", code, body)
		}
		return gauge, *fd.PrewarmQueue
	}
	if g, fq := queue(); g != 0 || fq != 0 {
		t.Fatalf("before the job: gauge %d, feed %d", g, fq)
	}
	cl := &coordinator.Client{Base: n.FleetURL, Token: f.adminToken}
	id, err := cl.Prefetch(context.Background(), coordinator.PrefetchRequest{Images: []coordinator.Image{{Repository: "docker.io/org/slow", Digest: digest.Digest(img.Digest)}}})
	if err != nil {
		t.Fatal(err)
	}
	sawGauge, sawFeed := 0, 0
	deadline := time.Now().Add(2 * time.Minute)
	for {
		s, err := cl.Job(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if s.Terminal() {
			if s.State != coordinator.StateSucceeded {
				t.Fatalf("job: %+v", s)
			}
			break
		}
		g, fq := queue()
		sawGauge, sawFeed = max(sawGauge, g), max(sawFeed, fq)
		if time.Now().After(deadline) {
			t.Fatalf("the prefetch did not end: %+v", s)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if sawGauge < 1 || sawFeed < 1 {
		t.Errorf("while the prefetch ran: gauge at most %d, feed at most %d; want 1 or more", sawGauge, sawFeed)
	}
	if g, fq := queue(); g != 0 || fq != 0 {
		t.Errorf("after the job: gauge %d, feed %d", g, fq)
	}
	t.Logf("pre-warm queue seen at most %d (gauge), %d (feed)", sawGauge, sawFeed)
}

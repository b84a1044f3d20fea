package inspector

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/storage"
)

func getJSON(t *testing.T, url string, want int, into any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		t.Fatalf("GET %s: %d, want %d: %s", url, resp.StatusCode, want, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("GET %s: Content-Type %q", url, ct)
	}
	if into != nil {
		if err := json.Unmarshal(body, into); err != nil {
			t.Fatalf("GET %s: %v: %s", url, err, body)
		}
	}
}

func TestAPI(t *testing.T) {
	up := inProcessRegistry(t)
	d12 := up.push(t, "org/demo:1.2", build(t, dockerSpec(t)))
	up.push(t, "org/demo:latest", build(t, dockerSpec(t)))
	idx, _, _, unique := multiPlatform(t)
	idxD := up.pushIndex(t, "org/multi:1", idx)
	h := newHarness(t, up, harnessOptions{config: func(c *config.Config) { c.DefaultUpstream = "registry.test" }})
	h.pull("org/demo", "1.2")
	latestD := h.pull("org/demo", "latest")
	h.pull("org/multi", "1")
	srv := httptest.NewServer(h.ins.Handler())
	defer srv.Close()

	var repos struct{ Repositories []Repository }
	getJSON(t, srv.URL+"/berth/v1/repositories", 200, &repos)
	if len(repos.Repositories) != 2 || repos.Repositories[0].Repository != "org/demo" || len(repos.Repositories[0].Tags) != 2 {
		t.Fatalf("repositories %+v", repos)
	}
	if tg := repos.Repositories[0].Tags[0]; tg.Tag != "1.2" || tg.Digest != d12.String() || tg.Checked.IsZero() {
		t.Errorf("tag %+v", tg)
	}

	// By tag and by digest.
	var byTag, byDigest View
	getJSON(t, srv.URL+"/berth/v1/images/registry.test/org/demo:1.2", 200, &byTag)
	getJSON(t, srv.URL+"/berth/v1/images/registry.test/org/demo@"+d12.String(), 200, &byDigest)
	if byTag.Digest != d12.String() || byDigest.Digest != d12.String() || byTag.Image == nil || len(byTag.Image.Layers) != 3 {
		t.Fatalf("image by tag %+v", byTag.Record)
	}
	if byTag.Image.Labels["evil"] != "<script>alert(1)</script>" || byTag.Microscaling == nil || byTag.Microscaling.MaxContainers != "10" {
		t.Errorf("labels %v microscaling %+v", byTag.Image.Labels, byTag.Microscaling)
	}
	if byTag.Image.EnvNames != nil {
		t.Error("env names in the API without show_env_names")
	}
	var multi View
	getJSON(t, srv.URL+"/berth/v1/images/registry.test/org/multi:1", 200, &multi)
	if multi.Digest != idxD.String() || len(multi.Platforms) != 2 || multi.DownloadSize != unique || len(multi.Index.Attestations) != 1 {
		t.Errorf("index %+v", multi)
	}

	// Errors.
	getJSON(t, srv.URL+"/berth/v1/images/registry.test/org/demo:nope", 404, nil)
	getJSON(t, srv.URL+"/berth/v1/images/nowhere.test/org/demo:1", 404, nil)
	getJSON(t, srv.URL+"/berth/v1/images/justaname", 400, nil)
	getJSON(t, srv.URL+"/berth/v1/images/registry.test/org/demo@sha256:zz", 400, nil)

	// MicroBadger.
	var mb map[string]any
	getJSON(t, srv.URL+"/v1/images/org/demo", 200, &mb)
	for _, k := range []string{"ImageName", "LatestSHA", "LatestVersion", "Labels", "LayerCount", "DownloadSize", "Versions"} {
		if _, ok := mb[k]; !ok {
			t.Errorf("MicroBadger answer lacks %s", k)
		}
	}
	var mbi mbImage
	getJSON(t, srv.URL+"/v1/images/org/demo", 200, &mbi)
	if mbi.ImageName != "registry.test/org/demo" || mbi.LatestSHA != latestD.String() || mbi.ID != latestD.String() || mbi.LatestVersion != "latest" || mbi.LayerCount != 3 || mbi.DownloadSize <= 0 || mbi.UpdatedAt.IsZero() || mbi.LastUpdated.IsZero() {
		t.Errorf("MicroBadger %+v", mbi)
	}
	if len(mbi.Versions) != 2 {
		t.Fatalf("versions %+v", mbi.Versions)
	}
	for _, v := range mbi.Versions {
		if len(v.Tags) != 1 || v.Created.IsZero() || len(v.Layers) != 3 || v.Layers[1].Command != "RUN apk add --no-cache curl" || v.Layers[1].DownloadSize <= 0 || !strings.HasPrefix(v.Layers[0].BlobSum, "sha256:") {
			t.Errorf("version %+v", v)
		}
		if v.License == nil || v.License.Code != "MIT" || v.VersionControl == nil || v.VersionControl.URL != "https://git.example/demo.git" || v.VersionControl.Commit != "abc123" || v.VersionControl.Type != "git" {
			t.Errorf("license %+v vcs %+v", v.License, v.VersionControl)
		}
	}
	if mbi.Microscaling == nil || mbi.Microscaling.Priority != "3" || mbi.Labels["com.microscaling.is-scalable"] != "true" {
		t.Errorf("microscaling %+v", mbi.Microscaling)
	}
	getJSON(t, srv.URL+"/v1/images/org/unknown", 404, nil)
	// With a tag, the top-level fields describe that tag's version.
	var tagged mbImage
	getJSON(t, srv.URL+"/v1/images/org/demo:1.2", 200, &tagged)
	if tagged.ID != d12.String() || tagged.LatestSHA != latestD.String() || tagged.LatestVersion != "1.2" || len(tagged.Versions) != 2 {
		t.Errorf("MicroBadger by tag: %+v", tagged)
	}
	getJSON(t, srv.URL+"/v1/images/org/demo:nope", 404, nil)
	var ver mbVersion
	getJSON(t, srv.URL+"/v1/images/org/demo/version/"+d12.String(), 200, &ver)
	if ver.SHA != d12.String() || len(ver.Tags) != 1 || ver.Tags[0].Tag != "1.2" || len(ver.Layers) != 3 {
		t.Errorf("MicroBadger version: %+v", ver)
	}
	getJSON(t, srv.URL+"/v1/images/org/demo/version/sha256:zz", 400, nil)

	// Webhooks and scaler answer JSON even with nothing configured.
	var hooks struct {
		Webhooks   []map[string]any
		Deliveries []Delivery
	}
	getJSON(t, srv.URL+"/berth/v1/webhooks", 200, &hooks)
	var feed Feed
	getJSON(t, srv.URL+"/berth/v1/scaler", 200, &feed)
	if feed.FetchRate <= 0 || feed.Images == nil {
		t.Errorf("feed %+v", feed)
	}
}

// The scaler feed: a watched image this node lacks part of, and its cold
// start at the measured rate.
func TestScalerFeed(t *testing.T) {
	up := inProcessRegistry(t)
	d := up.push(t, "org/app:v1", build(t, dockerSpec(t)))
	h := newHarness(t, up, harnessOptions{config: func(c *config.Config) {
		c.Inspector.Watch = []config.Watch{{Repository: "registry.test/org/app", Tags: []string{"v1"}, Interval: config.Duration(time.Hour)}}
	}})
	h.pull("org/app", "v1")
	rec := h.record(d)
	f := h.ins.Feed()
	if len(f.Images) != 1 || f.Images[0].Image != "registry.test/org/app:v1" || !f.Images[0].Watched || !f.Images[0].Inspected {
		t.Fatalf("feed %+v", f)
	}
	total := rec.Image.ConfigSize + rec.Image.DownloadSize
	if f.Images[0].Bytes != total || f.Images[0].MissingBytes != 0 {
		t.Fatalf("bytes %d missing %d, want %d and 0", f.Images[0].Bytes, f.Images[0].MissingBytes, total)
	}
	// Drop a layer from the disk: it is missing now.
	l := rec.Image.Layers[1]
	h.local.DeleteBlob(storage.Key{Upstream: "registry.test", Digest: digest.Digest(l.Digest)})
	f = h.ins.Feed()
	if f.Images[0].MissingBytes != l.Size || f.MissingBytes != l.Size {
		t.Fatalf("missing %d, want %d", f.Images[0].MissingBytes, l.Size)
	}
	if f.FetchRateMeasured {
		// The pull was measured: cold start follows from it.
		if want := float64(l.Size) / f.FetchRate; f.Images[0].ColdStartSeconds != want {
			t.Errorf("cold start %v, want %v", f.Images[0].ColdStartSeconds, want)
		}
	} else if want := float64(l.Size) / assumedFetchRate; f.Images[0].ColdStartSeconds != want {
		t.Errorf("cold start %v, want %v at the assumed rate", f.Images[0].ColdStartSeconds, want)
	}
	if got := h.counter("berth_image_missing_bytes", "image", "registry.test/org/app:v1"); got != float64(l.Size) {
		t.Errorf("berth_image_missing_bytes = %v", got)
	}
	if h.counter("berth_image_cold_start_seconds", "image", "registry.test/org/app:v1") <= 0 {
		t.Error("berth_image_cold_start_seconds not set")
	}

	// A pinned image (its config pinned by a prefetch) is in the feed too.
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if err := h.eng.Prefetch(ctx, h.repo("org/app"), digest.Digest(rec.Image.ConfigDigest), time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	f = h.ins.Feed()
	if len(f.Images) != 2 || !f.Images[0].Pinned && !f.Images[1].Pinned {
		t.Fatalf("feed with a pin %+v", f.Images)
	}
}

// A host that read a watched image's manifest from the bucket defers its
// inspection to the host that fetched it from the upstream: until it reads
// the fleet's record its scaler feed has the image uninspected, with the
// sizes from the manifests on its disk and no microscaling labels; once an
// API request has read the record, inspected and with the labels.
func TestScalerFeedOnAHostThatDeferred(t *testing.T) {
	up := inProcessRegistry(t)
	d := up.push(t, "org/app:v1", build(t, dockerSpec(t)))
	watch := func(c *config.Config) {
		c.Inspector.Watch = []config.Watch{{Repository: "registry.test/org/app", Tags: []string{"v1"}, Interval: config.Duration(time.Hour)}}
	}
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: "a"})
	hb := bucket.Host("b")
	a := newHarness(t, up, harnessOptions{bucket: bucket, config: watch})
	b := newHarness(t, up, harnessOptions{bucket: hb, config: watch})
	a.pull("org/app", "v1")
	rec := a.record(d)
	eventually(t, "host a's record in the bucket", func() bool { return bucket.Requests("CreateObject") == 1 })
	b.pull("org/app", "v1")
	eventually(t, "the manifest left to the fleet", func() bool { return b.counter("berth_inspections_total", "result", "deferred") == 1 })
	// A layer missing from b's disk: the missing bytes come from the
	// manifest too.
	l := rec.Image.Layers[1]
	b.local.DeleteBlob(storage.Key{Upstream: "registry.test", Digest: digest.Digest(l.Digest)})

	srv := httptest.NewServer(b.ins.Handler())
	defer srv.Close()
	total := rec.Image.ConfigSize + rec.Image.DownloadSize
	var f Feed
	getJSON(t, srv.URL+"/berth/v1/scaler", 200, &f)
	if len(f.Images) != 1 {
		t.Fatalf("feed %+v", f)
	}
	fi := f.Images[0]
	if fi.Image != "registry.test/org/app:v1" || fi.Digest != d.String() || !fi.Watched || fi.Inspected || fi.Microscaling != nil {
		t.Errorf("before the fleet's record: %+v", fi)
	}
	if fi.Bytes != total || fi.MissingBytes != l.Size || f.MissingBytes != l.Size {
		t.Errorf("before the fleet's record: bytes %d missing %d (feed %d), want %d and %d", fi.Bytes, fi.MissingBytes, f.MissingBytes, total, l.Size)
	}
	if fi.Platform != "" {
		t.Errorf("platform %q before the config was read, want none", fi.Platform)
	}
	if n := hb.Requests("GetObject"); n != 0 {
		t.Errorf("the feed read the bucket %d times", n)
	}

	var v View
	getJSON(t, srv.URL+"/berth/v1/images/registry.test/org/app:v1", 200, &v)
	if v.Image == nil || hb.Requests("GetObject") != 1 || b.counter("berth_inspections_total", "result", "shared") != 1 {
		t.Fatalf("the API did not read the fleet's record: %+v, %d GETs", v.Record, hb.Requests("GetObject"))
	}
	getJSON(t, srv.URL+"/berth/v1/scaler", 200, &f)
	if len(f.Images) != 1 {
		t.Fatalf("feed %+v", f)
	}
	fi = f.Images[0]
	if !fi.Inspected || fi.Bytes != total || fi.MissingBytes != l.Size || fi.Platform != "linux/amd64" {
		t.Errorf("after the fleet's record: %+v, want inspected, %d bytes, %d missing", fi, total, l.Size)
	}
	if m := fi.Microscaling; m == nil || m.Priority != "3" || m.MaxContainers != "10" || m.IsScalable != "true" {
		t.Errorf("after the fleet's record: microscaling %+v", fi.Microscaling)
	}
	if b.counter("berth_inspections_total", "result", "ok") != 0 {
		t.Error("host b inspected the image itself")
	}
}

func TestFetchRateSample(t *testing.T) {
	s := newScaler(nil)
	now := s.lastTick
	step := func(d time.Duration, bytes int64, downloads int) {
		now = now.Add(d)
		s.cached(bytes)
		s.sample(now, downloads)
	}
	// 10 MiB arrive over a second of downloading, in quarter-second ticks.
	step(250*time.Millisecond, 0, 1)
	step(250*time.Millisecond, 0, 1)
	step(250*time.Millisecond, 0, 1)
	step(250*time.Millisecond, 10<<20, 0)
	if s.rate < 9<<20 || s.rate > 11<<20 {
		t.Fatalf("rate %.0f, want about 10 MiB/s", s.rate)
	}
	// Idle time does not dilute it.
	for range 40 {
		step(250*time.Millisecond, 0, 0)
	}
	if s.rate < 9<<20 || s.rate > 11<<20 {
		t.Fatalf("idle ticks changed the rate: %.0f", s.rate)
	}
	// A faster link moves it up.
	for range 200 {
		step(250*time.Millisecond, 10<<20, 1) // 40 MiB/s
	}
	if s.rate < 35<<20 {
		t.Fatalf("rate %.0f after a long fast stretch, want near 40 MiB/s", s.rate)
	}
}

// The pages render from the embedded templates, every label escaped.
func TestPagesEscape(t *testing.T) {
	up := inProcessRegistry(t)
	up.push(t, "org/demo:1", build(t, dockerSpec(t)))
	h := newHarness(t, up, harnessOptions{})
	h.pull("org/demo", "1")
	srv := httptest.NewServer(h.ins.Handler())
	defer srv.Close()
	for path, want := range map[string]string{
		"/ui/":                               "registry.test/org/demo",
		"/ui/image/registry.test/org/demo:1": "&lt;script&gt;alert(1)&lt;/script&gt;",
		"/ui/webhooks":                       "no webhook configured",
		"/ui/node":                           "inspect queue",
		"/ui/static/style.css":               "meter.bar",
		"/ui/static/favicon.svg":             "<svg",
	} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(string(body), want) {
			t.Errorf("GET %s: %d, want %q in:\n%s", path, resp.StatusCode, want, body)
		}
		if strings.HasPrefix(path, "/ui/image") && strings.Contains(string(body), "<script>") {
			t.Errorf("GET %s: a label's <script> is in the page unescaped", path)
		}
		if strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") && !strings.Contains(resp.Header.Get("Content-Security-Policy"), "default-src 'none'") {
			t.Errorf("GET %s: no Content-Security-Policy", path)
		}
	}
	resp, _ := http.Get(srv.URL + "/ui/image/registry.test/org/demo:nope")
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Errorf("a missing tag's page: %d", resp.StatusCode)
	}
}

package inspector

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/storage"
)

var buildTime = time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)

// dockerSpec is a Docker v2 image built the classic way: label-schema
// labels, instructions that make no layer, build arguments.
func dockerSpec(t testing.TB) imageSpec {
	return imageSpec{
		layers: []v1.Layer{layer(t, 3000, false), layer(t, 1000, false), layer(t, 2000, false)},
		history: []string{
			"/bin/sh -c #(nop) ADD file:5a1c in / ",
			"empty:/bin/sh -c #(nop)  LABEL org.label-schema.name=demo",
			"empty:/bin/sh -c #(nop)  ENV SECRET_TOKEN=hunter2",
			"|1 VERSION=1.2 /bin/sh -c apk add --no-cache curl",
			"empty:/bin/sh -c #(nop)  EXPOSE 8080/tcp",
			"RUN /bin/sh -c make install # buildkit",
			"empty:/bin/sh -c #(nop)  CMD [\"serve\"]",
		},
		labels: map[string]string{
			"org.label-schema.build-date":       "2024-05-06T07:08:09Z",
			"org.label-schema.vcs-url":          "https://git.example/demo.git",
			"org.label-schema.vcs-ref":          "abc123",
			"org.label-schema.name":             "demo",
			"org.label-schema.usage":            "https://docs.example/demo",
			"org.label-schema.schema-version":   "1.0",
			"org.label-schema.version":          "1.2",
			"org.opencontainers.image.licenses": "MIT",
			"com.microscaling.priority":         "3",
			"com.microscaling.min-containers":   "1",
			"com.microscaling.max-containers":   "10",
			"com.microscaling.max-delta":        "2",
			"com.microscaling.is-scalable":      "true",
			"evil":                              "<script>alert(1)</script>",
		},
		env:        []string{"PATH=/usr/bin", "SECRET_TOKEN=hunter2"},
		ports:      []string{"8080/tcp", "53/udp"},
		entrypoint: []string{"/demo"},
		cmd:        []string{"serve"},
		workdir:    "/srv",
		user:       "app",
		author:     "Demo Maintainers",
		created:    buildTime,
	}
}

func TestInspectDockerImage(t *testing.T) {
	eachRegistry(t, func(t *testing.T, up *testUpstream) {
		img := build(t, dockerSpec(t))
		d := up.push(t, "org/demo:1.2", img)
		h := newHarness(t, up, harnessOptions{})
		if got := h.pull("org/demo", "1.2"); got != d {
			t.Fatalf("pulled %s, pushed %s", got, d)
		}
		rec := h.record(d)
		if rec.Error != "" || rec.Kind != KindImage || rec.Image == nil {
			t.Fatalf("record: %+v", rec)
		}
		im := rec.Image
		if rec.MediaType != string(types.DockerManifestSchema2) {
			t.Errorf("media type %s", rec.MediaType)
		}
		if im.Platform() != "linux/amd64" || im.Author != "Demo Maintainers" || im.Created == nil || !im.Created.Equal(buildTime) {
			t.Errorf("platform %s, author %q, created %v", im.Platform(), im.Author, im.Created)
		}
		if !slices.Equal(im.Entrypoint, []string{"/demo"}) || !slices.Equal(im.Cmd, []string{"serve"}) || im.WorkingDir != "/srv" || im.User != "app" {
			t.Errorf("entrypoint %q cmd %q workdir %q user %q", im.Entrypoint, im.Cmd, im.WorkingDir, im.User)
		}
		if !slices.Equal(im.ExposedPorts, []string{"53/udp", "8080/tcp"}) {
			t.Errorf("ports %v", im.ExposedPorts)
		}
		// label-schema under OCI names.
		for k, want := range map[string]string{
			"org.opencontainers.image.created":       "2024-05-06T07:08:09Z",
			"org.opencontainers.image.source":        "https://git.example/demo.git",
			"org.opencontainers.image.revision":      "abc123",
			"org.opencontainers.image.title":         "demo",
			"org.opencontainers.image.documentation": "https://docs.example/demo",
			"org.opencontainers.image.licenses":      "MIT",
		} {
			if im.Annotations[k] != want {
				t.Errorf("annotation %s = %q, want %q", k, im.Annotations[k], want)
			}
		}
		// Three layers; empty history entries skipped when pairing.
		wantCmds := []string{"ADD file:5a1c in /", "RUN apk add --no-cache curl", "RUN make install"}
		var total int64
		for k, l := range im.Layers {
			if l.Command != wantCmds[k] {
				t.Errorf("layer %d command %q, want %q", k, l.Command, wantCmds[k])
			}
			if l.MediaType != string(types.DockerLayer) || l.Size <= 0 {
				t.Errorf("layer %d: %+v", k, l)
			}
			total += l.Size
		}
		if len(im.Layers) != 3 || im.DownloadSize != total {
			t.Errorf("%d layers, download size %d (sum %d)", len(im.Layers), im.DownloadSize, total)
		}
		wantDockerfile := []string{
			"ADD file:5a1c in /", "LABEL org.label-schema.name=demo", "ENV SECRET_TOKEN=hunter2",
			"RUN apk add --no-cache curl", "EXPOSE 8080/tcp", "RUN make install", `CMD ["serve"]`,
		}
		if !slices.Equal(im.Dockerfile, wantDockerfile) {
			t.Errorf("Dockerfile\n%q\nwant\n%q", im.Dockerfile, wantDockerfile)
		}
		// Environment: names only in the record, and not shown by default.
		if !slices.Equal(im.EnvNames, []string{"PATH", "SECRET_TOKEN"}) {
			t.Errorf("env names %v", im.EnvNames)
		}
		v := h.ins.view(rec)
		if v.Image.EnvNames != nil {
			t.Errorf("env names shown without inspector.show_env_names: %v", v.Image.EnvNames)
		}
		if rec.Image.EnvNames == nil {
			t.Error("view stripped the stored record's env names")
		}
		if m := v.Microscaling; m == nil || m.Priority != "3" || m.MinContainers != "1" || m.MaxContainers != "10" || m.MaxDelta != "2" || m.IsScalable != "true" {
			t.Errorf("microscaling %+v", v.Microscaling)
		}
		if h.counter("berth_inspections_total", "result", "ok") != 1 {
			t.Errorf("berth_inspections_total{ok} = %v", h.counter("berth_inspections_total", "result", "ok"))
		}
	})
}

func TestShowEnvNames(t *testing.T) {
	up := inProcessRegistry(t)
	d := up.push(t, "org/demo:1", build(t, dockerSpec(t)))
	h := newHarness(t, up, harnessOptions{config: func(c *config.Config) { c.Inspector.ShowEnvNames = true }})
	h.pull("org/demo", "1")
	v := h.ins.view(h.record(d))
	if !slices.Equal(v.Image.EnvNames, []string{"PATH", "SECRET_TOKEN"}) {
		t.Fatalf("env names %v", v.Image.EnvNames)
	}
	for _, s := range v.Image.EnvNames {
		if strings.Contains(s, "hunter2") {
			t.Fatal("an env value leaked")
		}
	}
}

func TestInspectOCIImage(t *testing.T) {
	eachRegistry(t, func(t *testing.T, up *testUpstream) {
		spec := imageSpec{
			oci:     true,
			layers:  []v1.Layer{layer(t, 1500, true), layer(t, 500, true)},
			history: []string{"COPY app /app # buildkit", "empty:ENTRYPOINT [\"/app\"]", "RUN /bin/sh -c chmod +x /app # buildkit"},
			labels: map[string]string{
				"org.opencontainers.image.title":   "from the label",
				"org.opencontainers.image.version": "2.0",
				"org.label-schema.name":            "from label-schema",
			},
			annotations: map[string]string{"org.opencontainers.image.title": "from the manifest"},
			os:          "linux", arch: "arm64", variant: "v8",
			created: buildTime,
		}
		d := up.push(t, "org/oci:2.0", build(t, spec))
		h := newHarness(t, up, harnessOptions{})
		h.pull("org/oci", "2.0")
		rec := h.record(d)
		if rec.Error != "" || rec.MediaType != string(types.OCIManifestSchema1) {
			t.Fatalf("record %+v", rec)
		}
		im := rec.Image
		if im.Platform() != "linux/arm64/v8" {
			t.Errorf("platform %s", im.Platform())
		}
		// The manifest's annotation wins over the OCI label, which wins over label-schema.
		if got := im.Annotations["org.opencontainers.image.title"]; got != "from the manifest" {
			t.Errorf("title %q", got)
		}
		if im.Annotations["org.opencontainers.image.version"] != "2.0" {
			t.Errorf("version %q", im.Annotations["org.opencontainers.image.version"])
		}
		if im.Layers[0].Command != "COPY app /app" || im.Layers[1].Command != "RUN chmod +x /app" || im.Layers[0].MediaType != string(types.OCILayer) {
			t.Errorf("layers %+v", im.Layers)
		}
		if !slices.Equal(im.Dockerfile, []string{"COPY app /app", `ENTRYPOINT ["/app"]`, "RUN chmod +x /app"}) {
			t.Errorf("Dockerfile %q", im.Dockerfile)
		}
	})
}

// multiPlatform is an index of two platforms that share their base layer
// and a BuildKit attestation manifest for the first.
func multiPlatform(t *testing.T) (v1.ImageIndex, v1.Image, v1.Image, int64) {
	base := layer(t, 4000, true)
	amd := build(t, imageSpec{oci: true, layers: []v1.Layer{base, layer(t, 1000, true)}, history: []string{"ADD base", "RUN amd"}, os: "linux", arch: "amd64", created: buildTime})
	arm := build(t, imageSpec{oci: true, layers: []v1.Layer{base, layer(t, 2000, true)}, history: []string{"ADD base", "RUN arm"}, os: "linux", arch: "arm64", variant: "v8", created: buildTime})
	att := build(t, imageSpec{oci: true, layers: []v1.Layer{layer(t, 300, true)}, os: "unknown", arch: "unknown"})
	amdD, _ := amd.Digest()
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	idx = mutate.AppendManifests(idx,
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}}},
		mutate.IndexAddendum{Add: att, Descriptor: v1.Descriptor{
			Platform:    &v1.Platform{OS: "unknown", Architecture: "unknown"},
			Annotations: map[string]string{"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": amdD.String()},
		}},
	)
	var unique int64
	for _, img := range []v1.Image{amd, arm} {
		ls, _ := img.Layers()
		for k, l := range ls {
			if img == arm && k == 0 {
				continue // the shared base, counted once
			}
			s, _ := l.Size()
			unique += s
		}
	}
	return idx, amd, arm, unique
}

func TestInspectIndexWithAttestations(t *testing.T) {
	eachRegistry(t, func(t *testing.T, up *testUpstream) {
		idx, amd, arm, unique := multiPlatform(t)
		d := up.pushIndex(t, "org/multi:1", idx)
		h := newHarness(t, up, harnessOptions{})
		h.pull("org/multi", "1") // the index and the first platform
		rec := h.record(d)
		if rec.Kind != KindIndex || rec.Index == nil || rec.Error != "" {
			t.Fatalf("record %+v", rec)
		}
		amdD, _ := amd.Digest()
		armD, _ := arm.Digest()
		if len(rec.Index.Platforms) != 2 || rec.Index.Platforms[0].Platform() != "linux/amd64" || rec.Index.Platforms[1].Platform() != "linux/arm64/v8" {
			t.Fatalf("platforms %+v", rec.Index.Platforms)
		}
		if len(rec.Index.Attestations) != 1 || rec.Index.Attestations[0].RefersTo != amdD.String() {
			t.Fatalf("attestations %+v", rec.Index.Attestations)
		}
		// In the background only what was pulled is read: the amd64 image.
		h.record(digest.Digest(amdD.String()))
		if _, ok := h.ins.store.get("registry.test", digest.Digest(armD.String())); ok {
			t.Error("the arm64 image was inspected in the background though no pull asked for it")
		}
		// Asked through the API, every platform is inspected, through the cache.
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		v, err := h.ins.Image(ctx, h.repo("org/multi"), "1")
		if err != nil {
			t.Fatal(err)
		}
		if len(v.Platforms) != 2 || v.Platforms[0].Image == nil || v.Platforms[1].Image == nil {
			t.Fatalf("view platforms %+v", v.Platforms)
		}
		if v.Platforms[1].Image.Layers[1].Command != "RUN arm" {
			t.Errorf("arm64 layers %+v", v.Platforms[1].Image.Layers)
		}
		if v.DownloadSize != unique {
			t.Errorf("index download size %d, want %d (the shared layer once)", v.DownloadSize, unique)
		}
		if !slices.Equal(v.Tags, []string{"1"}) {
			t.Errorf("tags %v", v.Tags)
		}
	})
}

func TestInspectBadConfigs(t *testing.T) {
	eachRegistry(t, func(t *testing.T, up *testUpstream) {
		huge := `{"architecture":"amd64","os":"linux","config":{"Labels":{"junk":"` + strings.Repeat("x", MaxConfigSize) + `"}}}`
		big := up.pushRaw(t, "org/bad:huge", []byte(huge))
		notJSON := up.pushRaw(t, "org/bad:text", []byte("this is not JSON\x00\x01"))
		h := newHarness(t, up, harnessOptions{})

		// Oversized: the manifest says so; the config is never read, in the
		// background or when asked.
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		if _, err := h.eng.Manifest(ctx, h.repo("org/bad"), "huge", nil); err != nil {
			t.Fatal(err)
		}
		rec := h.record(big)
		if !strings.Contains(rec.Error, "over the") || rec.Image == nil || len(rec.Image.Layers) != 1 {
			t.Fatalf("oversized config: %+v", rec)
		}
		if _, ok := h.local.HasBlob(storage.Key{Upstream: "registry.test", Digest: digest.FromString(huge)}); ok {
			t.Error("the oversized config was fetched")
		}
		v, err := h.ins.Image(ctx, h.repo("org/bad"), "huge")
		if err != nil || !strings.Contains(v.Error, "over the") {
			t.Fatalf("API on the oversized config: %v, %+v", err, v)
		}

		// Not JSON: read, refused, recorded.
		h.pull("org/bad", "text")
		rec = h.record(notJSON)
		if rec.Error != "config is not JSON" {
			t.Fatalf("non-JSON config: %q", rec.Error)
		}
		if h.counter("berth_inspections_total", "result", "error") != 2 {
			t.Errorf("berth_inspections_total{error} = %v", h.counter("berth_inspections_total", "result", "error"))
		}
	})
}

// A manifest whose config no pull has cached waits for it, then is
// inspected when a pull caches it; nothing is fetched for the inspector.
func TestInspectWaitsForConfig(t *testing.T) {
	up := inProcessRegistry(t)
	img := build(t, dockerSpec(t))
	d := up.push(t, "org/demo:1", img)
	h := newHarness(t, up, harnessOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if _, err := h.eng.Manifest(ctx, h.repo("org/demo"), "1", nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the manifest to wait for its config", func() bool { return h.ins.Waiting() == 1 })
	if _, ok := h.ins.store.get("registry.test", d); ok {
		t.Fatal("inspected without its config")
	}
	h.pull("org/demo", "1")
	if rec := h.record(d); rec.Image.Author != "Demo Maintainers" {
		t.Fatalf("record %+v", rec.Image)
	}
	eventually(t, "the wait list to empty", func() bool { return h.ins.Waiting() == 0 })
}

// The queue is bounded: when it is full, manifests are dropped and counted,
// and nothing waits.
func TestQueueDropsWhenFull(t *testing.T) {
	up := inProcessRegistry(t)
	h := newHarness(t, up, harnessOptions{noStart: true, config: func(c *config.Config) { c.Inspector.Queue = 2 }})
	repo := h.repo("org/x")
	start := time.Now()
	for k := range 10 {
		h.ins.enqueue(job{repo: repo, digest: digest.FromString(string(rune('a' + k)))})
	}
	h.ins.enqueue(job{repo: repo, digest: digest.FromString("a")}) // queued already: no drop
	if time.Since(start) > time.Second {
		t.Fatal("enqueue blocked")
	}
	if got := h.ins.QueueLen(); got != 2 {
		t.Errorf("queue holds %d, want 2", got)
	}
	if got := h.counter("berth_inspect_dropped_total"); got != 8 {
		t.Errorf("berth_inspect_dropped_total = %v, want 8", got)
	}
	if got := h.counter("berth_inspect_queue"); got != 2 {
		t.Errorf("berth_inspect_queue = %v, want 2", got)
	}
}

// With a bucket the fleet inspects each digest once: the host that fetched
// the manifest from the upstream inspects it and writes the record with a
// conditional write (no GET first); hosts that read the manifest from the
// bucket inspect nothing and send no request for the record until asked,
// then read it from the bucket.
func TestFleetInspectsOnce(t *testing.T) {
	up := inProcessRegistry(t)
	d := up.push(t, "org/demo:1", build(t, dockerSpec(t)))
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: "a"})
	hb, hc := bucket.Host("b"), bucket.Host("c")
	a := newHarness(t, up, harnessOptions{bucket: bucket})
	b := newHarness(t, up, harnessOptions{bucket: hb})
	c := newHarness(t, up, harnessOptions{bucket: hc})

	a.pull("org/demo", "1")
	ra := a.record(d)
	eventually(t, "host a's record in the bucket", func() bool { return bucket.Requests("CreateObject") == 1 })
	if n := bucket.Requests("GetObject") + bucket.Requests("PutObject"); n != 0 {
		t.Errorf("host a's background inspection sent %d other object requests", n)
	}

	b.pull("org/demo", "1")
	c.pull("org/demo", "1")
	for _, h := range []*harness{b, c} {
		eventually(t, "the manifest left to the fleet", func() bool { return h.counter("berth_inspections_total", "result", "deferred") == 1 })
	}
	for name, m := range map[string]*storage.Memory{"b": hb, "c": hc} {
		for _, op := range []string{"GetObject", "PutObject", "CreateObject"} {
			if n := m.Requests(op); n != 0 {
				t.Errorf("host %s sent %d %s requests for a manifest the fleet inspects", name, n, op)
			}
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	for name, h := range map[string]*harness{"b": b, "c": c} {
		v, err := h.ins.Image(ctx, h.repo("org/demo"), "1")
		if err != nil || v.Image == nil || v.Image.Author != "Demo Maintainers" {
			t.Fatalf("host %s: %v %+v", name, err, v)
		}
		if !v.Inspected.Equal(ra.Inspected) {
			t.Errorf("host %s has a record inspected at %v, host a's at %v", name, v.Inspected, ra.Inspected)
		}
		if got := h.counter("berth_inspections_total", "result", "shared"); got != 1 {
			t.Errorf("host %s: berth_inspections_total{shared} = %v, want 1", name, got)
		}
		if got := h.counter("berth_inspections_total", "result", "ok"); got != 0 {
			t.Errorf("host %s inspected it again: berth_inspections_total{ok} = %v", name, got)
		}
	}
	if got := hb.Requests("GetObject") + hc.Requests("GetObject"); got != 2 {
		t.Errorf("hosts b and c read the record %d times, want once each", got)
	}
	// Asked again, host b reads its own disk.
	if _, err := b.ins.Image(ctx, b.repo("org/demo"), "1"); err != nil || hb.Requests("GetObject") != 1 {
		t.Errorf("second look on host b: %v, %d GETs", err, hb.Requests("GetObject"))
	}
}

// Hosts that inspect the same digest at once (each fetched it from the
// upstream) race on the conditional write: one record stays in the
// bucket, the losers keep theirs on disk and fail nothing.
func TestFleetInspectionRace(t *testing.T) {
	up := inProcessRegistry(t)
	d := up.push(t, "org/demo:1", build(t, dockerSpec(t)))
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: "h0"})
	var hs []*harness
	for k := range 3 {
		var bk storage.Bucket = bucket
		if k > 0 {
			bk = bucket.Host(fmt.Sprintf("h%d", k))
		}
		hs = append(hs, newHarness(t, up, harnessOptions{bucket: bk, noStart: true}))
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	recs := make([]*Record, len(hs))
	errs := make(chan error, len(hs))
	for k, h := range hs {
		go func() {
			var err error
			recs[k], err = h.ins.inspectNow(ctx, h.repo("org/demo"), d, true, nil)
			errs <- err
		}()
	}
	for range hs {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	raw, err := bucket.GetObject(ctx, objectName("registry.test", d))
	if err != nil {
		t.Fatal(err)
	}
	var stored Record
	if err := json.Unmarshal(raw, &stored); err != nil {
		t.Fatal(err)
	}
	won := 0
	for k, h := range hs {
		if _, ok := h.ins.store.get("registry.test", d); !ok {
			t.Errorf("host %d kept no record on disk", k)
		}
		if recs[k].Inspected.Equal(stored.Inspected) {
			won++
		}
	}
	if won < 1 {
		t.Errorf("the bucket's record (inspected %v) is none of the hosts'", stored.Inspected)
	}
}

func TestDockerfileLine(t *testing.T) {
	for in, want := range map[string]string{
		"/bin/sh -c #(nop)  CMD [\"sh\"]":                    `CMD ["sh"]`,
		"/bin/sh -c #(nop) ADD file:abc in / ":               "ADD file:abc in /",
		"/bin/sh -c apk add x":                               "RUN apk add x",
		"|2 A=1 B=2 /bin/sh -c make":                         "RUN make",
		"RUN /bin/sh -c go build ./... # buildkit":           "RUN go build ./...",
		"ENV PATH=/usr/local/sbin:/usr/local/bin # buildkit": "ENV PATH=/usr/local/sbin:/usr/local/bin",
		"WORKDIR /src":                                       "WORKDIR /src",
		"":                                                   "",
	} {
		if got := dockerfileLine(in); got != want {
			t.Errorf("dockerfileLine(%q) = %q, want %q", in, got, want)
		}
	}
}

// BenchmarkInspect is the cost of one background inspection of a Docker
// image whose manifest and config are on disk: read, parse, store.
func BenchmarkInspect(b *testing.B) {
	up := inProcessRegistry(b)
	d := up.push(b, "org/demo:1", build(b, dockerSpec(b)))
	h := newHarness(b, up, harnessOptions{noStart: true})
	h.pull("org/demo", "1")
	repo := h.repo("org/demo")
	ctx := context.Background()
	cpu := func() time.Duration {
		var ru syscall.Rusage
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	b.ResetTimer()
	start := cpu()
	for b.Loop() {
		if _, err := h.ins.inspectNow(ctx, repo, d, false, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric((cpu()-start).Seconds()/float64(b.N), "cpu-s/op")
}

func TestJournalStaysBounded(t *testing.T) {
	p := filepath.Join(t.TempDir(), "j.jsonl")
	j := openJournal[int](p, 10)
	for k := range 35 {
		j.add(k)
	}
	if got := j.list(nil); len(got) != 10 || got[0] != 34 || got[9] != 25 {
		t.Fatalf("kept %v", got)
	}
	b, _ := os.ReadFile(p)
	if n := strings.Count(string(b), "\n"); n > 20 {
		t.Fatalf("%d lines on disk for 10 kept", n)
	}
	again := openJournal[int](p, 10)
	if got := again.list(nil); len(got) != 10 || got[0] != 34 {
		t.Fatalf("reopened: %v", got)
	}
}

// A host that deferred to the fleet, when the fetching host never wrote a
// record (here its inspector is not running): the /ui/ list's lookup asks
// the bucket once a minute at most; the API asks again, then inspects it
// itself and shares the record.
func TestFleetRecordMissing(t *testing.T) {
	up := inProcessRegistry(t)
	d := up.push(t, "org/demo:1", build(t, dockerSpec(t)))
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: "a"})
	hb := bucket.Host("b")
	a := newHarness(t, up, harnessOptions{bucket: bucket, noStart: true})
	b := newHarness(t, up, harnessOptions{bucket: hb})
	a.pull("org/demo", "1")
	b.pull("org/demo", "1")
	eventually(t, "the manifest left to the fleet", func() bool { return b.counter("berth_inspections_total", "result", "deferred") == 1 })

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	for range 3 {
		if _, ok := b.ins.lookup(ctx, "registry.test", d); ok {
			t.Fatal("lookup found a record nobody wrote")
		}
	}
	if n := hb.Requests("GetObject"); n != 1 {
		t.Errorf("three lookups sent %d GETs, want 1", n)
	}
	v, err := b.ins.Image(ctx, b.repo("org/demo"), "1")
	if err != nil || v.Image == nil {
		t.Fatalf("%v %+v", err, v)
	}
	if n := hb.Requests("GetObject"); n != 2 {
		t.Errorf("the API did not ask the bucket again: %d GETs", n)
	}
	if b.counter("berth_inspections_total", "result", "ok") != 1 || hb.Requests("CreateObject") != 1 {
		t.Errorf("host b inspected %v times and wrote %d records", b.counter("berth_inspections_total", "result", "ok"), hb.Requests("CreateObject"))
	}
}

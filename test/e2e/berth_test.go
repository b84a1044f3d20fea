package e2e

// End-to-end pulls through `berth serve` with real clients. The upstream is a
// distribution registry; docker.io is mapped to it, so images live there as
// library/NAME, as they do on Docker Hub.

import (
	"context"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// cacheSlack bounds what berth may fetch from the upstream beyond the image
// itself: /v2/ pings, HEADs and revalidation of tags, never a blob twice.
const cacheSlack = 32 << 10

func cranePullVerify(t *testing.T, ref string, want *PushedImage, extra ...string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "layout")
	args := append([]string{"pull", "--insecure", "--format=oci"}, extra...)
	Run(t, 2*time.Minute, nil, "crane", append(args, ref, dir)...)
	VerifyOCILayout(t, dir, want)
}

func skopeoCopyVerify(t *testing.T, ref string, want *PushedImage) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "dir")
	Run(t, 2*time.Minute, nil, "skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
		"docker://"+ref, "dir:"+dir)
	VerifyDirLayout(t, dir, want)
}

func TestBerthCraneAndSkopeoPull(t *testing.T) {
	testsupport.RequireTool(t, "crane")
	testsupport.RequireTool(t, "skopeo")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/alpine", "3", 256<<10, 3)
	idx := PushIndex(t, Docker, reg.Host, "library/multi", "1", 64<<10, 2)
	up := StartProxy(t, reg.Host)
	b := StartBerth(t, UpstreamArgs(reg.Host, up.URL)...)

	// First contact: every blob crosses from the upstream exactly once.
	cranePullVerify(t, b.Host+"/library/alpine:3", img)
	cold := up.UpstreamBytes()
	t.Logf("cold pull of %d image bytes took %d upstream bytes (ratio %.3f)", img.Bytes(), cold, float64(cold)/float64(img.Bytes()))
	if cold < img.Bytes() || cold > img.Bytes()+cacheSlack {
		t.Errorf("cold pull: upstream sent %d bytes for an image of %d", cold, img.Bytes())
	}

	// Every other way of naming the image is served from berth's cache.
	cranePullVerify(t, b.Host+"/library/alpine@"+img.Digest, img)
	cranePullVerify(t, b.Host+"/alpine:3", img) // single-component docker.io name
	skopeoCopyVerify(t, b.Host+"/library/alpine:3", img)
	skopeoCopyVerify(t, b.Host+"/library/alpine@"+img.Digest, img)
	time.Sleep(1100 * time.Millisecond) // past --tag-ttl: the tag is revalidated, the blobs are not fetched
	cranePullVerify(t, b.Host+"/library/alpine:3", img)
	if warm := up.UpstreamBytes() - cold; warm > cacheSlack {
		t.Errorf("cached pulls took %d more upstream bytes; blobs were fetched again", warm)
	}

	for ref, want := range map[string]string{
		b.Host + "/library/alpine:3": img.Digest,
		b.Host + "/alpine:3":         img.Digest,
		b.Host + "/library/multi:1":  idx.Digest,
	} {
		got := strings.TrimSpace(Run(t, time.Minute, nil, "crane", "digest", "--insecure", ref))
		if got != want {
			t.Errorf("crane digest %s = %s, want %s", ref, got, want)
		}
	}
	for _, pl := range idx.Platforms {
		cranePullVerify(t, b.Host+"/library/multi:1", idx.ForPlatform(pl.OS, pl.Architecture),
			"--platform="+pl.OS+"/"+pl.Architecture)
	}
	skopeoCopyVerify(t, b.Host+"/library/multi@"+idx.ForPlatform("linux", runtime.GOARCH).Digest,
		idx.ForPlatform("linux", runtime.GOARCH))
}

func TestBerthDockerPull(t *testing.T) {
	testsupport.RequireRoot(t)
	testsupport.RequireTool(t, "dockerd")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/dockimg", "1", 128<<10, 3)
	idx := PushIndex(t, Docker, reg.Host, "library/dockmulti", "1", 64<<10, 2)
	mirrored := PushImage(t, Docker, reg.Host, "library/mirrored", "1.0", 64<<10, 2)
	up := StartProxy(t, reg.Host)
	b := StartBerth(t, UpstreamArgs(reg.Host, up.URL)...)
	d := StartDockerd(t, DockerdOptions{Mirrors: []string{b.URL}})

	imageID := func(ref string) string {
		return strings.TrimSpace(d.Docker(t, time.Minute, "image", "inspect", "--format", "{{.Id}}", ref))
	}

	// As `docker pull localhost:5000/...` does on a berth host, with this
	// test's port. docker treats 127.0.0.0/8 as insecure, so plain HTTP works.
	ref := b.Host + "/library/dockimg:1"
	d.Docker(t, 3*time.Minute, "pull", ref)
	if id := imageID(ref); id != img.Config.Digest {
		t.Errorf("docker pull %s: image id %s, want %s", ref, id, img.Config.Digest)
	}
	// The quick start's spelling: localhost, which docker also treats as
	// insecure (it resolves into 127.0.0.0/8); any port works.
	_, port, _ := strings.Cut(b.Host, ":")
	ref = "localhost:" + port + "/library/dockimg:1"
	d.Docker(t, 3*time.Minute, "pull", ref)
	if id := imageID(ref); id != img.Config.Digest {
		t.Errorf("docker pull %s: image id %s, want %s", ref, id, img.Config.Digest)
	}
	ref = b.Host + "/dockmulti:1" // short name and an index: docker picks its platform
	d.Docker(t, 3*time.Minute, "pull", ref)
	if want := idx.ForPlatform("linux", runtime.GOARCH); imageID(ref) != want.Config.Digest {
		t.Errorf("docker pull %s: image id %s, want %s", ref, imageID(ref), want.Config.Digest)
	}

	// registry-mirrors: a plain `docker pull NAME:TAG` goes to berth. The
	// machine has no route to Docker Hub, so the pull succeeds only through
	// berth; the upstream counter shows berth fetched it.
	before := up.UpstreamBytes()
	d.Docker(t, 3*time.Minute, "pull", "mirrored:1.0")
	if id := imageID("mirrored:1.0"); id != mirrored.Config.Digest {
		t.Errorf("docker pull mirrored:1.0 via registry-mirrors: image id %s, want %s", id, mirrored.Config.Digest)
	}
	if got := up.UpstreamBytes() - before; got < mirrored.Bytes() {
		t.Errorf("docker pull via registry-mirrors: upstream sent %d bytes, image is %d; did it go through berth?", got, mirrored.Bytes())
	}
}

func TestBerthContainerdHostsMirror(t *testing.T) {
	testsupport.RequireRoot(t)
	testsupport.RequireTool(t, "containerd")
	testsupport.RequireTool(t, "ctr")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/ctrimg", "2", 128<<10, 3)
	idx := PushIndex(t, OCI, reg.Host, "team/app", "v1", 64<<10, 2)
	b := StartBerth(t, UpstreamArgs(reg.Host, reg.URL)...)
	rec := StartRecorder(t, b.URL)
	c := StartContainerd(t)
	hosts := HostsDir(t, reg.Host, reg.URL, rec.URL)

	check := func(ref string, want *PushedImage) {
		t.Helper()
		c.Ctr(t, 3*time.Minute, "images", "pull", "--hosts-dir", hosts, ref)
		ns := reg.Host
		for _, blob := range want.Blobs() {
			reqs := rec.Matching("/blobs/"+blob.Digest, ns)
			ok := false
			for _, r := range reqs {
				ok = ok || (r.Method == "GET" && r.Status == 200)
			}
			if !ok {
				t.Errorf("%s: berth did not serve blob %s with ?ns=%s; requests: %+v", ref, blob.Digest, ns, reqs)
			}
		}
		if reqs := rec.Matching("/manifests/", ns); len(reqs) == 0 {
			t.Errorf("%s: no manifest request reached berth with ?ns=%s", ref, ns)
		}
		for _, r := range rec.Requests() {
			if r.Status >= 400 {
				t.Errorf("%s: berth answered %s %s with %d", ref, r.Method, r.URI, r.Status)
			}
		}
	}
	check(reg.Host+"/library/ctrimg:2", img)
	out := c.Ctr(t, time.Minute, "images", "ls")
	if !strings.Contains(out, img.Digest) {
		t.Errorf("ctr images ls does not list %s:\n%s", img.Digest, out)
	}
	check(reg.Host+"/team/app:v1", idx.ForPlatform("linux", runtime.GOARCH))
	// ctr resolves the tag, then fetches the index and the platform's
	// manifest by digest.
	for _, d := range []string{idx.Digest, idx.ForPlatform("linux", runtime.GOARCH).Digest} {
		if reqs := rec.Matching("/manifests/"+d, reg.Host); len(reqs) == 0 {
			t.Errorf("manifest %s was not fetched through berth", d)
		}
	}
}

func TestBerthConformance(t *testing.T) {
	testsupport.RequireTool(t, "conformance")
	reg := StartRegistry(t)
	seed := SeedConformance(t, reg.Host, "conformance/repo1")
	b := StartBerth(t, UpstreamArgs(reg.Host, reg.URL)...)
	seed.Registry = b.Host
	seed.TagList = true
	// Cold: every answer is fetched from the upstream while being served.
	res := RunConformance(t, seed)
	t.Logf("cold run: %v", res.Counts)
	// Warm: the same content from berth's cache, tags revalidated (TTL 1s).
	time.Sleep(1100 * time.Millisecond)
	res = RunConformance(t, seed)
	t.Logf("warm run: %v", res.Counts)
}

// Health endpoints are what orchestrators probe; a running berth with a
// reachable upstream must be live and ready.
func TestBerthHealthEndpoints(t *testing.T) {
	reg := StartRegistry(t)
	b := StartBerth(t, UpstreamArgs(reg.Host, reg.URL)...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, p := range []string{"/healthz", "/readyz", "/v2/", "/metrics", "/status"} {
		if code := httpStatus(ctx, b.URL+p); code != 200 {
			t.Errorf("GET %s: %d, want 200", p, code)
		}
	}
}

// A stuck upstream must not stall pulls of what berth already holds: blobs
// and manifests by digest need no upstream at all, and a tag past its TTL is
// served stale once --stale-timeout passes.
func TestBerthServesCacheWhileUpstreamHangs(t *testing.T) {
	testsupport.RequireTool(t, "crane")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/steady", "1", 128<<10, 2)
	up := StartProxy(t, reg.Host)
	b := StartBerth(t, append(UpstreamArgs(reg.Host, up.URL), "--stale-timeout", "1s")...)
	cranePullVerify(t, b.Host+"/library/steady:1", img)

	up.Hang()
	t.Cleanup(up.Resume)
	time.Sleep(1100 * time.Millisecond) // past --tag-ttl
	for _, ref := range []string{b.Host + "/library/steady@" + img.Digest, b.Host + "/library/steady:1"} {
		start := time.Now()
		cranePullVerify(t, ref, img)
		// crane asks for the manifest more than once; each ask may wait the
		// stale timeout, none may wait for the upstream.
		if d := time.Since(start); d > 15*time.Second {
			t.Errorf("pull of %s with a hung upstream took %v", ref, d)
		}
	}
	if up.Connections() == 0 {
		t.Errorf("berth never tried the upstream for the expired tag")
	}
}

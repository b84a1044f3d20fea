package mirror

import (
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/storage"
)

func randomImage(t *testing.T) v1.Image {
	t.Helper()
	img, err := random.Image(512, 1)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// newTagFixture is a berth whose upstream holds a random image as org/app:v1.
func newTagFixture(t *testing.T) (up *fakeUpstream, h *harness, img v1.Image, d digest.Digest, path string) {
	t.Helper()
	up = newFakeUpstream(t)
	h = newHarness(t, up)
	img = randomImage(t)
	d = up.pushImage("org/app", "v1", img)
	return up, h, img, d, manifestPath("org/app", "v1")
}

func rawManifest(t *testing.T, m interface{ RawManifest() ([]byte, error) }) []byte {
	t.Helper()
	b, err := m.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkManifest checks a manifest response's headers, and its body unless HEAD.
func checkManifest(t *testing.T, r response, mediaType string, d digest.Digest, raw []byte) {
	t.Helper()
	what := r.Request.Method + " " + r.Request.URL.Path
	if r.StatusCode != http.StatusOK || r.readErr != nil {
		t.Fatalf("%s: status %d, %v, body %.300s", what, r.StatusCode, r.readErr, r.body)
	}
	if ct := r.Header.Get("Content-Type"); ct != mediaType {
		t.Errorf("%s: Content-Type %q, want %q", what, ct, mediaType)
	}
	if got := r.Header.Get("Docker-Content-Digest"); got != d.String() {
		t.Errorf("%s: Docker-Content-Digest %q, want %q", what, got, d)
	}
	if cl := r.Header.Get("Content-Length"); cl != strconv.Itoa(len(raw)) {
		t.Errorf("%s: Content-Length %q, want %d", what, cl, len(raw))
	}
	if r.Request.Method == http.MethodHead {
		if len(r.body) != 0 {
			t.Errorf("%s: HEAD answered with %d body bytes", what, len(r.body))
		}
		return
	}
	if string(r.body) != string(raw) {
		t.Errorf("%s: body differs from the upstream's manifest bytes", what)
	}
}

func TestManifestMediaTypesAndHeaders(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)

	docker := randomImage(t)
	oci := mutate.ConfigMediaType(mutate.MediaType(randomImage(t), types.OCIManifestSchema1), types.OCIConfigJSON)
	ociIndex, err := random.Index(256, 1, 2)
	if err != nil {
		t.Fatal(err)
	}
	dockerList := mutate.IndexMediaType(ociIndex, types.DockerManifestList)

	cases := []struct {
		name, tag string
		mt        types.MediaType
		raw       []byte
		d         digest.Digest
	}{
		{name: "docker", tag: "docker", mt: types.DockerManifestSchema2, raw: rawManifest(t, docker), d: up.pushImage("org/app", "docker", docker)},
		{name: "oci", tag: "oci", mt: types.OCIManifestSchema1, raw: rawManifest(t, oci), d: up.pushImage("org/app", "oci", oci)},
		{name: "oci-index", tag: "index", mt: types.OCIImageIndex, raw: rawManifest(t, ociIndex), d: up.pushIndex("org/app", "index", ociIndex)},
		{name: "docker-list", tag: "list", mt: types.DockerManifestList, raw: rawManifest(t, dockerList), d: up.pushIndex("org/app", "list", dockerList)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if digest.FromBytes(c.raw) != c.d {
				t.Fatal("test setup: pushed digest does not match raw manifest")
			}
			mt := string(c.mt)
			// HEAD first: nothing is cached, berth must fetch to answer.
			checkManifest(t, h.do("HEAD", manifestPath("org/app", c.tag)), mt, c.d, c.raw)
			checkManifest(t, h.get(manifestPath("org/app", c.tag)), mt, c.d, c.raw)
			checkManifest(t, h.do("HEAD", manifestPath("org/app", c.d.String())), mt, c.d, c.raw)
			checkManifest(t, h.get(manifestPath("org/app", c.d.String())), mt, c.d, c.raw)
			r := h.get(manifestPath("org/app", c.tag), "If-None-Match", `"`+c.d.String()+`"`)
			if r.StatusCode != http.StatusNotModified {
				t.Errorf("If-None-Match with the digest: %d, want 304", r.StatusCode)
			}
		})
	}
	// By digest, an uncached manifest is fetched once and then served from disk.
	img := randomImage(t)
	d := up.pushImage("org/other", "x", img)
	checkManifest(t, h.get(manifestPath("org/other", d.String())), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	checkManifest(t, h.get(manifestPath("org/other", d.String())), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	if n := up.count("GET", manifestPath("org/other", d.String())); n != 1 {
		t.Fatalf("manifest by digest fetched %d times, want 1", n)
	}
}

func TestManifestDigestMismatch(t *testing.T) {
	for _, byTag := range []bool{false, true} {
		t.Run(map[bool]string{false: "by digest", true: "by tag"}[byTag], func(t *testing.T) {
			up := newFakeUpstream(t)
			h := newHarness(t, up)
			img := randomImage(t)
			d := up.pushImage("org/app", "v1", img)
			ref := d.String()
			if byTag {
				ref = "v1"
			}
			path := manifestPath("org/app", ref)
			up.set("GET", path, corrupt())

			errorCode(t, h.get(path), http.StatusServiceUnavailable, "UNAVAILABLE")
			if _, err := h.local.GetManifest(storage.Key{Upstream: config.DockerHub, Digest: d}); !errors.Is(err, storage.ErrNotFound) {
				t.Fatalf("corrupt manifest cached (GetManifest: %v)", err)
			}
			if _, err := h.local.GetTag(config.DockerHub, "org/app", "v1"); !errors.Is(err, storage.ErrNotFound) {
				t.Fatalf("tag recorded from corrupt content (GetTag: %v)", err)
			}
			h.wantMetric("berth_digest_mismatches_total", nil, 1)
			up.clear("GET", path)
			checkManifest(t, h.get(path), string(types.DockerManifestSchema2), d, rawManifest(t, img))
			if n := up.count("GET", path); n != 2 {
				t.Fatalf("upstream GETs %d, want 2 (the corrupt one and a refetch)", n)
			}
		})
	}
}

func TestTagWithinTTLAsksUpstreamNothing(t *testing.T) {
	up, h, img, d, path := newTagFixture(t)
	checkManifest(t, h.get(path), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	up.resetCounts()
	for range 3 {
		checkManifest(t, h.get(path), string(types.DockerManifestSchema2), d, rawManifest(t, img))
		checkManifest(t, h.do("HEAD", path), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	}
	up.mu.Lock()
	defer up.mu.Unlock()
	if len(up.counts) != 0 {
		t.Fatalf("within the tag TTL berth asked the upstream: %v", up.counts)
	}
}

func TestTagRevalidatesWithHeadAfterTTL(t *testing.T) {
	up, h, img, d, path := newTagFixture(t)
	checkManifest(t, h.get(path), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	h.ageTag(config.DockerHub, "org/app", "v1")
	up.resetCounts()

	checkManifest(t, h.get(path), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	if head, get := up.count("HEAD", path), up.count("GET", path); head != 1 || get != 0 {
		t.Fatalf("revalidating an unchanged tag: %d HEADs, %d GETs; want 1 HEAD, no GET", head, get)
	}
	rec, err := h.local.GetTag(config.DockerHub, "org/app", "v1")
	if err != nil || time.Since(rec.Checked) > time.Minute {
		t.Fatalf("revalidation did not renew the tag record: %+v, %v", rec, err)
	}
	checkManifest(t, h.get(path), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	if head := up.count("HEAD", path); head != 1 {
		t.Fatalf("a revalidated tag was revalidated again within its TTL (%d HEADs)", head)
	}
}

func TestTagMovedUpstreamIsFollowedAfterTTL(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	old, moved := randomImage(t), randomImage(t)
	dOld := up.pushImage("org/app", "v1", old)
	path := manifestPath("org/app", "v1")
	checkManifest(t, h.get(path), string(types.DockerManifestSchema2), dOld, rawManifest(t, old))

	dNew := up.pushImage("org/app", "v1", moved)
	// Within the TTL berth trusts what it learnt.
	checkManifest(t, h.get(path), string(types.DockerManifestSchema2), dOld, rawManifest(t, old))
	h.ageTag(config.DockerHub, "org/app", "v1")
	checkManifest(t, h.get(path), string(types.DockerManifestSchema2), dNew, rawManifest(t, moved))
	if head, get := up.count("HEAD", path), up.count("GET", path); head != 1 || get != 1 {
		t.Fatalf("following a moved tag: %d HEADs, %d GETs; want 1 and 1", head, get)
	}
	rec, err := h.local.GetTag(config.DockerHub, "org/app", "v1")
	if err != nil || rec.Digest != dNew {
		t.Fatalf("tag record %+v, %v; want digest %s", rec, err, dNew)
	}
	// The old manifest stays reachable by digest.
	checkManifest(t, h.get(manifestPath("org/app", dOld.String())), string(types.DockerManifestSchema2), dOld, rawManifest(t, old))
}

func TestStaleIfError(t *testing.T) {
	for _, c := range []struct {
		name  string
		fault func(up *fakeUpstream) fault
	}{
		{"hang", func(up *fakeUpstream) fault { return up.hang() }},
		{"503", func(*fakeUpstream) fault { return status(http.StatusServiceUnavailable) }},
		{"500", func(*fakeUpstream) fault { return status(http.StatusInternalServerError) }},
		{"429", func(*fakeUpstream) fault { return status(http.StatusTooManyRequests, "Retry-After", "30") }},
	} {
		t.Run(c.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			h := newHarness(t, up)
			img := randomImage(t)
			d := up.pushImage("org/app", "v1", img)
			path := manifestPath("org/app", "v1")
			checkManifest(t, h.get(path), string(types.DockerManifestSchema2), d, rawManifest(t, img))
			h.ageTag(config.DockerHub, "org/app", "v1")
			up.set("*", path, c.fault(up))

			start := time.Now()
			r := h.get(path)
			elapsed := time.Since(start)
			checkManifest(t, r, string(types.DockerManifestSchema2), d, rawManifest(t, img))
			if r.Header.Get("Berth-Stale") != "true" || !strings.HasPrefix(r.Header.Get("Warning"), "110 ") {
				t.Fatalf("stale answer without Berth-Stale/Warning: %v", r.Header)
			}
			// The stale timeout is 300ms; a hung upstream must not hold the client longer.
			if elapsed > 2*time.Second {
				t.Fatalf("stale answer took %v with stale_timeout 300ms", elapsed)
			}
			h.wantMetric("berth_stale_serves_total", map[string]string{"upstream": config.DockerHub}, 1)
			// HEAD is served stale as well.
			r = h.do("HEAD", path)
			checkManifest(t, r, string(types.DockerManifestSchema2), d, rawManifest(t, img))
			if r.Header.Get("Berth-Stale") != "true" {
				t.Fatal("stale HEAD without Berth-Stale")
			}
		})
	}
}

// A tag the upstream says is gone is gone: no stale copy.
func TestTagDeletedUpstreamIsNotServedStale(t *testing.T) {
	up, h, img, d, path := newTagFixture(t)
	checkManifest(t, h.get(path), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	h.ageTag(config.DockerHub, "org/app", "v1")
	up.set("*", path, status(http.StatusNotFound))
	r := h.get(path)
	errorCode(t, r, http.StatusNotFound, "MANIFEST_UNKNOWN")
	if r.Header.Get("Berth-Stale") != "" {
		t.Fatal("404 answer marked stale")
	}
	h.wantMetric("berth_stale_serves_total", nil, 0)
}

func TestUncachedTagWithUpstreamDown(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	up.pushImage("org/app", "v1", randomImage(t))
	path := manifestPath("org/app", "v1")
	up.set("*", path, status(http.StatusServiceUnavailable))
	errorCode(t, h.get(path), http.StatusServiceUnavailable, "UNAVAILABLE")
	up.set("*", path, status(http.StatusBadGateway))
	errorCode(t, h.get(path), http.StatusServiceUnavailable, "UNAVAILABLE")
}

// When the disk refuses a manifest, the client must not get an empty 200.
func TestManifestThatCannotBeStored(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	img := randomImage(t)
	d := up.pushImage("org/app", "v1", img)
	// A file where the upstream's manifest directory belongs makes every
	// manifest write fail.
	if err := os.WriteFile(filepath.Join(h.root, "manifests", config.DockerHub), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{"v1", d.String()} {
		r := h.get(manifestPath("org/app", ref))
		if r.StatusCode == http.StatusOK {
			checkManifest(t, r, string(types.DockerManifestSchema2), d, rawManifest(t, img))
			continue
		}
		errorCode(t, r, http.StatusServiceUnavailable, "UNAVAILABLE")
	}
}

// A 200 that is not a manifest (a proxy's or captive portal's page, with no
// Docker-Content-Digest) must not be cached as the tag's manifest.
func TestNonManifestAnswerIsNotCached(t *testing.T) {
	up, h, img, d, path := newTagFixture(t)
	portal := func(w http.ResponseWriter, r *http.Request, _ http.Handler) {
		w.Header().Set("Content-Type", "text/html")
		w.Write([]byte("<html>please log in</html>"))
	}
	up.set("GET", path, portal)
	errorCode(t, h.get(path), http.StatusServiceUnavailable, "UNAVAILABLE")
	if _, err := h.local.GetTag(config.DockerHub, "org/app", "v1"); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("tag recorded from a non-manifest answer (GetTag: %v)", err)
	}
	up.clear("GET", path)
	checkManifest(t, h.get(path), string(types.DockerManifestSchema2), d, rawManifest(t, img))

	// With a cached copy, such an answer during revalidation means stale.
	h.ageTag(config.DockerHub, "org/app", "v1")
	up.set("HEAD", path, status(http.StatusOK))
	up.set("GET", path, portal)
	r := h.get(path)
	checkManifest(t, r, string(types.DockerManifestSchema2), d, rawManifest(t, img))
	if r.Header.Get("Berth-Stale") != "true" {
		t.Fatal("revalidation answered by a non-manifest page did not serve stale")
	}
}

// Many clients asking for one uncached manifest make one upstream request.
func TestManifestConcurrentClientsShareOneFetch(t *testing.T) {
	up := newFakeUpstream(t)
	img := randomImage(t)
	d := up.pushImage("org/app", "v1", img)
	for _, path := range []string{manifestPath("org/app", "v1"), manifestPath("org/app", d.String())} {
		h := newHarness(t, up) // a cold cache per kind of reference
		gate := make(chan struct{})
		up.set("GET", path, up.pauseAfter(10, gate, nil))
		const clients = 20
		results := make(chan response, clients)
		for range clients {
			go func() { results <- h.get(path) }()
		}
		// All clients are inside berth while the upstream holds the answer.
		eventually(t, "clients waiting in berth", func() bool { return h.active.Load() == clients })
		close(gate)
		for range clients {
			r, err := within(results, testTimeout)
			if err != nil {
				t.Fatal("client never answered")
			}
			checkManifest(t, r, string(types.DockerManifestSchema2), d, rawManifest(t, img))
		}
		if n := up.count("GET", path); n != 1 {
			t.Fatalf("%d clients made %d upstream GETs of %s, want 1", clients, n, path)
		}
		up.clear("GET", path)
	}
}

// Once one client has waited out the stale timeout on a stuck revalidation,
// the next ones get the stale answer at once instead of waiting again.
func TestStuckRevalidationServesStaleAtOnce(t *testing.T) {
	// A stale timeout far above any request's own time under load, so
	// "waited it again" and "answered at once" cannot be confused.
	const stale = 3 * time.Second
	up := newFakeUpstream(t)
	h := newHarness(t, up, func(s *setup) { s.cfg.StaleTimeout = config.Duration(stale) })
	img := randomImage(t)
	d := up.pushImage("org/app", "v1", img)
	path := manifestPath("org/app", "v1")
	checkManifest(t, h.get(path), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	h.ageTag(config.DockerHub, "org/app", "v1")
	up.set("*", path, up.hang())
	first := time.Now()
	checkManifest(t, h.get(path), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	if waited := time.Since(first); waited < stale*9/10 {
		t.Fatalf("first client got its answer after %v, before the %v stale timeout", waited, stale)
	}
	for i := 0; i < 3; i++ {
		start := time.Now()
		r := h.get(path)
		checkManifest(t, r, string(types.DockerManifestSchema2), d, rawManifest(t, img))
		if took := time.Since(start); took > stale/2 {
			t.Fatalf("request %d waited %v on a revalidation already known to be stuck", i, took)
		}
		if r.Header.Get("Berth-Stale") != "true" {
			t.Fatal("answer not marked stale")
		}
	}
}

package mirror

import (
	"encoding/json"
	"errors"
	"net/http"
	"regexp"
	"slices"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/storage"
)

func TestRoutingToUpstreams(t *testing.T) {
	up := newFakeUpstream(t)
	host := up.host
	img := randomImage(t)
	raw := rawManifest(t, img)
	d := up.pushImage("library/alpine", "3", img)
	up.pushImage("org/app", "1", img)
	up.pushImage("solo", "1", img)

	cases := []struct {
		path                 string
		upstreamPath         string // what berth must ask the upstream for
		cacheHost, repo, tag string // where berth must record the tag
	}{
		{"/v2/alpine/manifests/3", manifestPath("library/alpine", "3"), config.DockerHub, "library/alpine", "3"},
		{"/v2/library/alpine/manifests/3", manifestPath("library/alpine", "3"), config.DockerHub, "library/alpine", "3"},
		{"/v2/alpine/manifests/3?ns=docker.io", manifestPath("library/alpine", "3"), config.DockerHub, "library/alpine", "3"},
		{"/v2/alpine/manifests/3?ns=registry-1.docker.io", manifestPath("library/alpine", "3"), config.DockerHub, "library/alpine", "3"},
		{"/v2/alpine/manifests/3?ns=index.docker.io", manifestPath("library/alpine", "3"), config.DockerHub, "library/alpine", "3"},
		{"/v2/docker.io/alpine/manifests/3", manifestPath("library/alpine", "3"), config.DockerHub, "library/alpine", "3"},
		{"/v2/index.docker.io/library/alpine/manifests/3", manifestPath("library/alpine", "3"), config.DockerHub, "library/alpine", "3"},
		// Multi-component names on Docker Hub get no library/ prefix.
		{"/v2/org/app/manifests/1", manifestPath("org/app", "1"), config.DockerHub, "org/app", "1"},
		{"/v2/org/app/manifests/1?ns=docker.io", manifestPath("org/app", "1"), config.DockerHub, "org/app", "1"},
		// Other registries: containerd's ns= and CRI-O's host path.
		{"/v2/org/app/manifests/1?ns=" + host, manifestPath("org/app", "1"), host, "org/app", "1"},
		{"/v2/" + host + "/org/app/manifests/1", manifestPath("org/app", "1"), host, "org/app", "1"},
		// library/ is Docker Hub's convention only.
		{"/v2/solo/manifests/1?ns=" + host, manifestPath("solo", "1"), host, "solo", "1"},
		{"/v2/" + host + "/solo/manifests/1", manifestPath("solo", "1"), host, "solo", "1"},
	}
	for _, c := range cases {
		t.Run(c.path, func(t *testing.T) {
			h := newHarness(t, up) // a cold cache for each route
			up.resetCounts()
			checkManifest(t, h.get(c.path), string(types.DockerManifestSchema2), d, raw)
			if n := up.count("GET", c.upstreamPath); n != 1 {
				up.mu.Lock()
				t.Fatalf("upstream did not get GET %s once; it saw %v", c.upstreamPath, up.counts)
			}
			rec, err := h.local.GetTag(c.cacheHost, c.repo, c.tag)
			if err != nil || rec.Digest != d {
				t.Fatalf("tag not recorded under %s/%s:%s (%+v, %v)", c.cacheHost, c.repo, c.tag, rec, err)
			}
		})
	}
}

// The cache is keyed by registry and digest: the same digest reached
// through two registry names is two objects, fetched from each, because
// berth cannot know two registries hold the same content under the same
// access rules.
func TestCacheIsKeyedByUpstreamAndDigest(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	content := randomBytes(30, 50<<10)
	d := up.pushBlob("org/app", content)
	wantOK(t, h.get(blobPath("org/app", d)), content)
	wantOK(t, h.get(blobPath(h.upstreamHost()+"/org/app", d)), content)
	if n := up.count("GET", blobPath("org/app", d)); n != 2 {
		t.Fatalf("upstream GETs %d, want one per registry name (2)", n)
	}
	for _, host := range []string{config.DockerHub, h.upstreamHost()} {
		eventually(t, "blob cached under "+host, func() bool {
			_, ok := h.local.HasBlob(storage.Key{Upstream: host, Digest: d})
			return ok
		})
	}
	// Aliases and repositories share the registry's copy.
	wantOK(t, h.get(blobPath("library/other", d)+"?ns=index.docker.io"), content)
	wantOK(t, h.get(blobPath("team/tool", d)+"?ns="+h.upstreamHost()), content)
	if n := up.count("GET", blobPath("org/app", d)) + up.count("GET", blobPath("library/other", d)) + up.count("GET", blobPath("team/tool", d)); n != 2 {
		t.Fatalf("cached blob fetched again: %d upstream GETs in all", n)
	}
}

type tagListBody struct {
	Name string   `json:"name"`
	Tags []string `json:"tags"`
}

var linkNext = regexp.MustCompile(`^<([^>]+)>; rel="next"$`)

// tagPages follows berth's Link headers from path and returns each page.
func (h *harness) pages(path string) [][]string {
	h.t.Helper()
	var pages [][]string
	for path != "" && len(pages) < 20 {
		r := h.get(path)
		if r.StatusCode != 200 {
			h.t.Fatalf("GET %s: %d %s", path, r.StatusCode, r.body)
		}
		var body struct {
			Tags         *[]string `json:"tags"`
			Repositories *[]string `json:"repositories"`
		}
		if err := json.Unmarshal(r.body, &body); err != nil {
			h.t.Fatal(err)
		}
		page := body.Tags
		if page == nil {
			page = body.Repositories
		}
		if page == nil {
			h.t.Fatalf("GET %s: no list in %s", path, r.body)
		}
		pages = append(pages, *page)
		path = ""
		if link := r.Header.Get("Link"); link != "" {
			m := linkNext.FindStringSubmatch(link)
			if m == nil {
				h.t.Fatalf("Link %q is not <...>; rel=\"next\"", link)
			}
			path = m[1]
		}
	}
	return pages
}

func TestTagsListPaginatesWhateverTheUpstreamDoes(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	// An upstream that ignores n and last, pages on its own terms, sends
	// tags unsorted and repeats one across pages.
	upstreamPages := map[string]struct {
		tags []string
		next string
	}{
		"":  {[]string{"e", "b"}, "/v2/org/app/tags/list?page=2"},
		"2": {[]string{"a", "d"}, "/v2/org/app/tags/list?page=3"},
		"3": {[]string{"c", "b"}, ""},
	}
	up.set("GET", "/v2/org/app/tags/list", func(w http.ResponseWriter, r *http.Request, _ http.Handler) {
		p := upstreamPages[r.URL.Query().Get("page")]
		if p.next != "" {
			w.Header().Set("Link", `<`+p.next+`>; rel="next"`)
		}
		json.NewEncoder(w).Encode(tagListBody{Name: "org/app", Tags: p.tags})
	})

	all := []string{"a", "b", "c", "d", "e"}
	if got := h.pages("/v2/org/app/tags/list"); len(got) != 1 || !slices.Equal(got[0], all) {
		t.Fatalf("whole list: %q, want one page %q", got, all)
	}
	if got := h.pages("/v2/org/app/tags/list?n=2"); len(got) != 3 || !slices.Equal(got[0], all[:2]) || !slices.Equal(got[1], all[2:4]) || !slices.Equal(got[2], all[4:]) {
		t.Fatalf("n=2 pages: %q", got)
	}
	if got := h.pages("/v2/org/app/tags/list?last=c"); len(got) != 1 || !slices.Equal(got[0], []string{"d", "e"}) {
		t.Fatalf("last=c: %q", got)
	}
	if got := h.pages("/v2/org/app/tags/list?n=2&last=b"); len(got) != 2 || !slices.Equal(got[0], []string{"c", "d"}) {
		t.Fatalf("n=2&last=b: %q", got)
	}
	if got := h.pages("/v2/org/app/tags/list?n=0"); len(got) != 1 || len(got[0]) != 0 {
		t.Fatalf("n=0: %q", got)
	}
	if got := h.pages("/v2/org/app/tags/list?last=zzz"); len(got) != 1 || len(got[0]) != 0 {
		t.Fatalf("last past the end: %q", got)
	}
	// Links keep the name the client used, host prefix or ns included.
	for _, p := range []string{"/v2/" + h.upstreamHost() + "/org/app/tags/list?n=3", "/v2/org/app/tags/list?n=3&ns=" + h.upstreamHost()} {
		if got := h.pages(p); len(got) != 2 || !slices.Equal(got[0], all[:3]) || !slices.Equal(got[1], all[3:]) {
			t.Fatalf("%s pages: %q", p, got)
		}
	}
	r := h.get("/v2/org/app/tags/list")
	var body tagListBody
	json.Unmarshal(r.body, &body)
	if body.Name != "org/app" || r.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("tag list name %q, Content-Type %q", body.Name, r.Header.Get("Content-Type"))
	}
	// One walk of the upstream's pages per registry name, then the TTL holds.
	if n := up.count("GET", "/v2/org/app/tags/list"); n != 6 {
		t.Fatalf("upstream tag list requests %d, want 3 pages for each of 2 registry names", n)
	}
}

func TestTagsListFallsBackToCachedTags(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	img := randomImage(t)
	for _, tag := range []string{"y", "x", "z"} {
		up.pushImage("org/app", tag, img)
	}
	for _, tag := range []string{"y", "x"} {
		if r := h.get(manifestPath("org/app", tag)); r.StatusCode != 200 {
			t.Fatalf("pull %s: %d", tag, r.StatusCode)
		}
	}
	for _, f := range []fault{status(http.StatusServiceUnavailable), drop()} {
		up.set("GET", "/v2/org/app/tags/list", f)
		if got := h.pages("/v2/org/app/tags/list"); len(got) != 1 || !slices.Equal(got[0], []string{"x", "y"}) {
			t.Fatalf("tags with the upstream down: %q, want the cached x, y", got)
		}
	}
	// Nothing cached and the upstream does not know the repository.
	up.set("GET", "/v2/org/none/tags/list", status(http.StatusNotFound))
	errorCode(t, h.get("/v2/org/none/tags/list"), http.StatusNotFound, "NAME_UNKNOWN")
	// Nothing cached and the upstream down.
	up.set("GET", "/v2/org/down/tags/list", status(http.StatusServiceUnavailable))
	errorCode(t, h.get("/v2/org/down/tags/list"), http.StatusServiceUnavailable, "UNAVAILABLE")
}

func TestCatalogListsCachedRepositories(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	host := h.upstreamHost()
	img := randomImage(t)
	up.pushImage("library/alpine", "3", img)
	up.pushImage("org/app", "1", img)
	up.pushImage("team/tool", "1", img)
	if got := h.pages("/v2/_catalog"); len(got) != 1 || len(got[0]) != 0 {
		t.Fatalf("empty cache catalog: %q", got)
	}
	for _, p := range []string{"/v2/alpine/manifests/3", "/v2/org/app/manifests/1", "/v2/" + host + "/team/tool/manifests/1"} {
		if r := h.get(p); r.StatusCode != 200 {
			t.Fatalf("pull %s: %d", p, r.StatusCode)
		}
	}
	all := []string{host + "/team/tool", "library/alpine", "org/app"}
	if got := h.pages("/v2/_catalog"); len(got) != 1 || !slices.Equal(got[0], all) {
		t.Fatalf("catalog %q, want %q", got, all)
	}
	if got := h.pages("/v2/_catalog?n=2"); len(got) != 2 || !slices.Equal(got[0], all[:2]) || !slices.Equal(got[1], all[2:]) {
		t.Fatalf("catalog n=2 pages %q", got)
	}
	if got := h.pages("/v2/_catalog?last=library/alpine"); len(got) != 1 || !slices.Equal(got[0], all[2:]) {
		t.Fatalf("catalog last=library/alpine: %q", got)
	}
	if _, err := h.local.GetTag(config.DockerHub, "library/alpine", "3"); errors.Is(err, storage.ErrNotFound) {
		t.Fatal("test setup: tag not cached")
	}
}

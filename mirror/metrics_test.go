package mirror

import (
	"context"
	"net/http"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/config"
)

func TestMetricsFollowRequests(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	content := randomBytes(40, 70000)
	d := up.pushBlob("org/app", content)
	img := randomImage(t)
	up.pushImage("org/app", "v1", img)
	size := float64(len(content))

	expect := h.wantMetric

	wantOK(t, h.get(blobPath("org/app", d)), content)
	eventually(t, "blob cached", func() bool { _, ok := h.local.HasBlob(blobKey(d)); return ok })
	expect("berth_requests_total", map[string]string{"kind": "blob", "method": "GET", "code": "200"}, 1)
	expect("berth_bytes_served_total", map[string]string{"source": "upstream"}, size)
	expect("berth_bytes_served_total", map[string]string{"source": "local"}, 0)
	expect("berth_upstream_bytes_total", map[string]string{"upstream": config.DockerHub}, size)
	expect("berth_upstream_requests_total", map[string]string{"upstream": config.DockerHub, "op": "blob", "code": "200"}, 1)
	expect("berth_cache_lookups_total", map[string]string{"kind": "blob", "result": "miss"}, 1)
	expect("berth_cache_size_bytes", nil, size)
	expect("berth_cache_blobs", nil, 1)
	expect("berth_cache_budget_bytes", nil, 1<<30)

	wantOK(t, h.get(blobPath("org/app", d)), content)
	r := h.get(blobPath("org/app", d), "Range", "bytes=0-99")
	if r.StatusCode != http.StatusPartialContent {
		t.Fatalf("range: %d", r.StatusCode)
	}
	expect("berth_requests_total", map[string]string{"kind": "blob", "method": "GET", "code": "200"}, 2)
	expect("berth_requests_total", map[string]string{"kind": "blob", "method": "GET", "code": "206"}, 1)
	expect("berth_bytes_served_total", map[string]string{"source": "local"}, size+100)
	expect("berth_bytes_served_total", map[string]string{"source": "upstream"}, size)
	expect("berth_upstream_bytes_total", nil, size)
	expect("berth_cache_lookups_total", map[string]string{"kind": "blob", "result": "hit"}, 2)

	h.get(manifestPath("org/app", "v1"))
	h.get(manifestPath("org/app", "v1"))
	expect("berth_requests_total", map[string]string{"kind": "manifest", "method": "GET", "code": "200"}, 2)
	expect("berth_cache_lookups_total", map[string]string{"kind": "manifest", "result": "miss"}, 1)
	expect("berth_cache_lookups_total", map[string]string{"kind": "manifest", "result": "hit"}, 1)
	expect("berth_upstream_requests_total", map[string]string{"op": "manifest", "code": "200"}, 1)

	h.get("/v2/")
	h.get("/v2/org/app/tags/list")
	h.get("/v2/_catalog")
	h.do("DELETE", blobPath("org/app", d))
	h.do("POST", "/v2/org/app/blobs/uploads/")
	h.get("/v2/org/app/blobs/notadigest")
	expect("berth_requests_total", map[string]string{"kind": "base", "code": "200"}, 1)
	expect("berth_requests_total", map[string]string{"kind": "tags", "code": "200"}, 1)
	expect("berth_requests_total", map[string]string{"kind": "catalog", "code": "200"}, 1)
	expect("berth_requests_total", map[string]string{"kind": "blob", "method": "DELETE", "code": "405"}, 1)
	expect("berth_requests_total", map[string]string{"kind": "write", "method": "POST", "code": "405"}, 1)
	expect("berth_requests_total", map[string]string{"kind": "other", "code": "400"}, 1)
	expect("berth_inflight_fetches", nil, 0)

	up.set("GET", blobPath("org/app", digest.FromString("gone")), status(http.StatusServiceUnavailable))
	h.get(blobPath("org/app", digest.FromString("gone")))
	expect("berth_upstream_errors_total", map[string]string{"upstream": config.DockerHub, "op": "blob"}, 1)
	expect("berth_upstream_requests_total", map[string]string{"op": "blob", "code": "503"}, 1)

	h.local.SetBudget(10, 0.9, 0.5)
	expect("berth_evictions_total", nil, 1)
	expect("berth_evicted_bytes_total", nil, size)
	expect("berth_cache_size_bytes", nil, 0)
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var histogram bool
	for _, mf := range mfs {
		if mf.GetName() == "berth_request_duration_seconds" && len(mf.GetMetric()) > 0 {
			histogram = mf.GetMetric()[0].GetHistogram().GetSampleCount() > 0
		}
	}
	if !histogram {
		t.Error("berth_request_duration_seconds has no observations")
	}
}

func TestBaseEndpoint(t *testing.T) {
	h := newHarness(t, newFakeUpstream(t))
	r := h.get("/v2/")
	if r.StatusCode != 200 || string(r.body) != "{}" || r.Header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
		t.Fatalf("/v2/: %d %q %v", r.StatusCode, r.body, r.Header)
	}
	r = h.do("HEAD", "/v2/")
	if r.StatusCode != 200 || len(r.body) != 0 {
		t.Fatalf("HEAD /v2/: %d, %d bytes", r.StatusCode, len(r.body))
	}
}

func TestUpstreamUnreachableAtStart(t *testing.T) {
	up := newFakeUpstream(t)
	warm := newHarness(t, up)
	img := randomImage(t)
	d := up.pushImage("org/app", "v1", img)
	up.pushImage("org/app", "v2", img)
	content := randomBytes(41, 20000)
	bd := up.pushBlob("org/app", content)
	checkManifest(t, warm.get(manifestPath("org/app", "v1")), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	checkManifest(t, warm.get(manifestPath("org/app", "v2")), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	wantOK(t, warm.get(blobPath("org/app", bd)), content)
	eventually(t, "blob cached", func() bool { _, ok := warm.local.HasBlob(blobKey(bd)); return ok })
	warm.ageTag(config.DockerHub, "org/app", "v2")

	down := closedPortURL(t)
	h := newHarness(t, nil, func(s *setup) {
		s.root = warm.root
		s.cfg.Upstreams = map[string]config.Upstream{config.DockerHub: {URL: down}}
	})
	checkManifest(t, h.get(manifestPath("org/app", "v1")), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	checkManifest(t, h.get(manifestPath("org/app", d.String())), string(types.DockerManifestSchema2), d, rawManifest(t, img))
	wantOK(t, h.get(blobPath("org/app", bd)), content)
	r := h.get(manifestPath("org/app", "v2"))
	checkManifest(t, r, string(types.DockerManifestSchema2), d, rawManifest(t, img))
	if r.Header.Get("Berth-Stale") != "true" {
		t.Fatal("expired tag with the upstream unreachable not marked stale")
	}
	errorCode(t, h.get(manifestPath("org/app", "v3")), http.StatusServiceUnavailable, "UNAVAILABLE")
	errorCode(t, h.get(blobPath("org/app", digest.FromString("x"))), http.StatusServiceUnavailable, "UNAVAILABLE")
	if got := h.pages("/v2/org/app/tags/list"); len(got) != 1 || len(got[0]) != 2 {
		t.Fatalf("tags with the upstream unreachable: %q, want the 2 cached", got)
	}

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if err := h.eng.PingUpstream(config.DockerHub)(ctx); err == nil {
		t.Fatal("PingUpstream of a closed port reported healthy")
	}
	if err := h.eng.PingUpstream("ghcr.io")(ctx); err == nil {
		t.Fatal("PingUpstream of an unconfigured registry reported healthy")
	}
	if err := warm.eng.PingUpstream(config.DockerHub)(ctx); err != nil {
		t.Fatalf("PingUpstream of a live registry: %v", err)
	}
	up.set("GET", "/v2/", status(http.StatusServiceUnavailable))
	if err := warm.eng.PingUpstream(config.DockerHub)(ctx); err == nil {
		t.Fatal("PingUpstream of a registry answering 503 reported healthy")
	}
	up.set("GET", "/v2/", status(http.StatusUnauthorized, "WWW-Authenticate", `Bearer realm="x"`))
	if err := warm.eng.PingUpstream(config.DockerHub)(ctx); err != nil {
		t.Fatalf("PingUpstream of a registry that wants a token: %v", err)
	}
}

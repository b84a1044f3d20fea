package mirror

import (
	"net/http"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

func TestErrorCodes(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	img := randomImage(t)
	up.pushImage("org/app", "v1", img)
	d := up.pushBlob("org/app", randomBytes(20, 1000))
	missing := digest.FromString("nothing has this digest")

	cases := []struct {
		method, path string
		status       int
		code         string
	}{
		// Registries berth is not configured for: never forwarded anywhere.
		{"GET", "/v2/org/app/manifests/v1?ns=ghcr.io", 404, "NAME_UNKNOWN"},
		{"GET", "/v2/ghcr.io/org/app/manifests/v1", 404, "NAME_UNKNOWN"},
		{"GET", "/v2/quay.io/org/app/blobs/" + d.String(), 404, "NAME_UNKNOWN"},
		{"GET", "/v2/org/app/tags/list?ns=example.com", 404, "NAME_UNKNOWN"},
		{"GET", "/v2/nothing/here", 404, "NAME_UNKNOWN"},

		{"GET", "/v2/org/app/manifests/nosuchtag", 404, "MANIFEST_UNKNOWN"},
		{"GET", "/v2/org/app/manifests/" + missing.String(), 404, "MANIFEST_UNKNOWN"},
		{"GET", "/v2/org/norepo/manifests/v1", 404, "MANIFEST_UNKNOWN"},
		{"GET", "/v2/org/app/blobs/" + missing.String(), 404, "BLOB_UNKNOWN"},

		{"GET", "/v2/org/app/blobs/sha256:abc", 400, "DIGEST_INVALID"},
		{"GET", "/v2/org/app/blobs/notadigest", 400, "DIGEST_INVALID"},
		{"GET", "/v2/org/app/blobs/sha256:" + strings.ToUpper(d.Encoded()), 400, "DIGEST_INVALID"},
		{"GET", "/v2/org/app/manifests/sha256:xyz", 400, "DIGEST_INVALID"},
		{"GET", "/v2/org/app/manifests/md5:0123456789abcdef0123456789abcdef", 400, "DIGEST_INVALID"},

		{"GET", "/v2/Foo/manifests/latest", 400, "NAME_INVALID"},
		{"GET", "/v2/org/App/manifests/latest", 400, "NAME_INVALID"},
		{"GET", "/v2/org/app-/blobs/" + d.String(), 400, "NAME_INVALID"},

		{"GET", "/v2/org/app/manifests/-bad", 400, "TAG_INVALID"},
		{"GET", "/v2/org/app/manifests/" + strings.Repeat("t", 129), 400, "TAG_INVALID"},

		{"PUT", "/v2/org/app/manifests/v1", 405, "UNSUPPORTED"},
		{"DELETE", "/v2/org/app/manifests/v1", 405, "UNSUPPORTED"},
		{"DELETE", "/v2/org/app/manifests/" + missing.String(), 405, "UNSUPPORTED"},
		{"DELETE", "/v2/org/app/blobs/" + d.String(), 405, "UNSUPPORTED"},
		{"POST", "/v2/org/app/blobs/uploads/", 405, "UNSUPPORTED"},
		{"POST", "/v2/org/app/blobs/uploads/?mount=" + d.String() + "&from=org/other", 405, "UNSUPPORTED"},
		{"PATCH", "/v2/org/app/blobs/uploads/3f2c1d9e-upload", 405, "UNSUPPORTED"},
		{"PUT", "/v2/org/app/blobs/uploads/3f2c1d9e-upload?digest=" + d.String(), 405, "UNSUPPORTED"},
		{"GET", "/v2/org/app/blobs/uploads/3f2c1d9e-upload", 405, "UNSUPPORTED"},
		{"DELETE", "/v2/org/app/blobs/uploads/3f2c1d9e-upload", 405, "UNSUPPORTED"},
		{"POST", "/v2/org/app/tags/list", 405, "UNSUPPORTED"},

		{"GET", "/v2/org/app/tags/list?n=abc", 400, "PAGINATION_NUMBER_INVALID"},
		{"GET", "/v2/org/app/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"},
		{"GET", "/v2/_catalog?n=abc", 400, "PAGINATION_NUMBER_INVALID"},
	}
	for _, c := range cases {
		t.Run(c.method+" "+c.path, func(t *testing.T) {
			r := h.do(c.method, c.path)
			errorCode(t, r, c.status, c.code)
			if c.status == http.StatusMethodNotAllowed && r.Header.Get("Allow") != "GET, HEAD" {
				t.Errorf("405 without Allow: GET, HEAD (got %q)", r.Header.Get("Allow"))
			}
			if r.Header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
				t.Errorf("no Docker-Distribution-API-Version header")
			}
		})
	}
	// Requests berth refuses on its own never reach the upstream.
	for key := range up.counts {
		if strings.Contains(key, "ghcr") || strings.Contains(key, "quay") || strings.Contains(key, "uploads") ||
			strings.HasPrefix(key, "PUT ") || strings.HasPrefix(key, "DELETE ") || strings.HasPrefix(key, "POST ") || strings.HasPrefix(key, "PATCH ") {
			t.Errorf("upstream received %s", key)
		}
	}
}

// A first path component without a dot or colon is part of the repository
// name, not a registry, so an upper-case one is an invalid name like any
// other and must not be passed on.
func TestUpperCaseFirstComponentIsNameInvalid(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	for _, p := range []string{"/v2/Org/app/manifests/v1", "/v2/Org/app/tags/list", "/v2/Org/app/blobs/" + digest.FromString("x").String()} {
		errorCode(t, h.get(p), 400, "NAME_INVALID")
	}
	up.mu.Lock()
	defer up.mu.Unlock()
	for key := range up.counts {
		if strings.Contains(key, "Org") {
			t.Errorf("invalid name forwarded upstream: %s", key)
		}
	}
}

func TestUpstreamRateLimitWithNothingCached(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	up.pushImage("org/app", "v1", randomImage(t))
	d := up.pushBlob("org/app", randomBytes(21, 1000))
	up.set("*", manifestPath("org/app", "v1"), status(http.StatusTooManyRequests, "Retry-After", "42"))
	up.set("*", blobPath("org/app", d), status(http.StatusTooManyRequests, "Retry-After", "17"))

	for _, c := range []struct{ method, path, retry string }{
		{"GET", manifestPath("org/app", "v1"), "42"},
		{"HEAD", manifestPath("org/app", "v1"), "42"},
		{"GET", blobPath("org/app", d), "17"},
		{"HEAD", blobPath("org/app", d), "17"},
	} {
		r := h.do(c.method, c.path)
		errorCode(t, r, http.StatusTooManyRequests, "TOOMANYREQUESTS")
		if got := r.Header.Get("Retry-After"); got != c.retry {
			t.Errorf("%s %s: Retry-After %q, want the upstream's %q", c.method, c.path, got, c.retry)
		}
	}
}

func TestUpstreamDeniedIsDenied(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	up.pushImage("org/app", "v1", randomImage(t))
	up.set("*", manifestPath("org/app", "v1"), status(http.StatusForbidden))
	errorCode(t, h.get(manifestPath("org/app", "v1")), http.StatusForbidden, "DENIED")
}

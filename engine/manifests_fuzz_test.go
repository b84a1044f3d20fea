package engine

// Fuzz target for the media type berth stores a manifest under, from the
// upstream's Content-Type and the manifest's own mediaType field.

import (
	"encoding/json"
	"testing"
)

// FuzzManifestMediaType: any Content-Type and body. No panic; a body that
// names its mediaType gets exactly that; otherwise the answer is never empty
// and never the generic JSON or text types.
func FuzzManifestMediaType(f *testing.F) {
	for _, s := range []struct{ header, body string }{
		{"application/vnd.docker.distribution.manifest.v2+json", `{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}`},
		{"application/vnd.oci.image.index.v1+json", `{"schemaVersion":2,"manifests":[]}`},
		{"application/json; charset=utf-8", `{"schemaVersion":2}`},
		{"text/plain", `{"mediaType":""}`},
		{"", `{"mediaType":7}`},
		{"application/vnd.oci.image.manifest.v1+json; q=0.5", `not json`},
		{";;;", `{"mediaType":"x/y","mediaType":"a/b"}`},
		{"multipart/mixed; boundary=\"", `[]`},
	} {
		f.Add(s.header, []byte(s.body))
	}
	f.Fuzz(func(t *testing.T, header string, body []byte) {
		mt := manifestMediaType(header, body)
		var probe struct {
			MediaType string `json:"mediaType"`
		}
		if json.Unmarshal(body, &probe) == nil && probe.MediaType != "" {
			if mt != probe.MediaType {
				t.Fatalf("manifestMediaType(%q, %q) = %q, but the body says %q", header, body, mt, probe.MediaType)
			}
			return
		}
		if mt == "" || mt == "application/json" || mt == "text/plain" {
			t.Fatalf("manifestMediaType(%q, %q) = %q", header, body, mt)
		}
	})
}

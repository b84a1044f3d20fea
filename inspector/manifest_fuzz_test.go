package inspector

// Fuzz target for the manifest, index and config parsing the inspector does
// on whatever an upstream served (go-containerregistry's v1.ParseManifest,
// v1.ParseIndexManifest and v1.ParseConfigFile under berth's own checks).

import (
	"testing"
)

// FuzzParseManifest feeds any bytes, as a manifest of any media type and as
// an image configuration, through what inspect does with them. No panic; an
// image or index is only ever produced without an error.
func FuzzParseManifest(f *testing.F) {
	for _, s := range []struct{ mt, body, config string }{
		{"application/vnd.oci.image.manifest.v1+json",
			`{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:` + sixtyFour("a") + `","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:` + sixtyFour("b") + `","size":10}],"subject":{"digest":"sha256:` + sixtyFour("c") + `","size":1}}`,
			`{"os":"linux","architecture":"amd64","created":"2025-03-01T12:00:00Z","config":{"Labels":{"a":"b"}},"history":[{"created_by":"/bin/sh -c #(nop) CMD [\"sh\"]"}]}`},
		{"application/vnd.oci.image.index.v1+json",
			`{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:` + sixtyFour("d") + `","size":5,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},{"digest":"sha256:` + sixtyFour("e") + `","size":1,"annotations":{"vnd.docker.reference.type":"attestation-manifest","vnd.docker.reference.digest":"sha256:` + sixtyFour("d") + `"}}]}`,
			`{}`},
		{"application/vnd.docker.distribution.manifest.list.v2+json", `{"schemaVersion":2,"manifests":null}`, `null`},
		{"application/vnd.docker.distribution.manifest.v1+json", `{"schemaVersion":1}`, `[]`},
		{"", `{"config":{"digest":"sha256:zz","size":-1}}`, `{"created":"yesterday"}`},
		{"", `{"manifests":[{"digest":"md5:x","platform":null}]}`, `{"os":7}`},
		{"text/plain", `not json`, `not json`},
	} {
		f.Add(s.mt, []byte(s.body), []byte(s.config))
	}
	f.Fuzz(func(t *testing.T, mediaType string, content, config []byte) {
		// Large inputs only make each run slow: the size limits themselves
		// are unit-tested (an oversized config is recorded as an error).
		if len(content) > 64<<10 || len(config) > 64<<10 {
			return
		}
		kind, err := kindOf(content, mediaType)
		if err != nil {
			return
		}
		switch kind {
		case KindIndex:
			idx, err := parseIndex(content)
			if err == nil && idx == nil {
				t.Fatal("parseIndex: nil index without an error")
			}
		case KindImage:
			m, err := parseManifest(content)
			if err != nil {
				return
			}
			if m == nil {
				t.Fatal("parseManifest: nil manifest without an error")
			}
			img := imageFromManifest(m)
			if len(config) <= MaxConfigSize {
				_ = applyConfig(img, m, config)
			}
		default:
			t.Fatalf("kindOf(%q) = %q", mediaType, kind)
		}
	})
}

func sixtyFour(c string) string {
	out := ""
	for range 64 {
		out += c
	}
	return out
}

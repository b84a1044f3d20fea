package coordinator

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/engine"
)

// Media types a node knows how to walk.
const (
	mtOCIIndex       = "application/vnd.oci.image.index.v1+json"
	mtOCIManifest    = "application/vnd.oci.image.manifest.v1+json"
	mtDockerList     = "application/vnd.docker.distribution.manifest.list.v2+json"
	mtDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
)

// IsIndex reports whether mediaType is a multi-platform index.
func IsIndex(mediaType string) bool { return mediaType == mtOCIIndex || mediaType == mtDockerList }

// IsImageManifest reports whether mediaType is a single-platform manifest.
func IsImageManifest(mediaType string) bool {
	return mediaType == mtOCIManifest || mediaType == mtDockerManifest
}

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      digest.Digest     `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *struct {
		OS           string `json:"os"`
		Architecture string `json:"architecture"`
		Variant      string `json:"variant,omitempty"`
	} `json:"platform,omitempty"`
}

type manifestDoc struct {
	MediaType string       `json:"mediaType"`
	Config    descriptor   `json:"config"`
	Layers    []descriptor `json:"layers"`
	Manifests []descriptor `json:"manifests"`
}

// IsAttestation reports whether an index entry is a build attestation
// (BuildKit's provenance and SBOM manifests), which no runtime pulls.
func (d descriptor) IsAttestation() bool {
	if d.Annotations["vnd.docker.reference.type"] == "attestation-manifest" {
		return true
	}
	return d.Platform != nil && d.Platform.OS == "unknown" && d.Platform.Architecture == "unknown"
}

// NodePlatform is this process's platform as os/arch[/variant].
func NodePlatform() string {
	p := runtime.GOOS + "/" + runtime.GOARCH
	if runtime.GOARCH == "arm" {
		p += "/v7"
	}
	return p
}

// platformMatches: want is os/arch or os/arch/variant; an entry without a
// variant matches a want with one only for arm64 (v8 is implied).
func platformMatches(want, os, arch, variant string) bool {
	parts := strings.Split(want, "/")
	if len(parts) < 2 || parts[0] != os || parts[1] != arch {
		return false
	}
	if len(parts) == 3 && variant != "" && parts[2] != variant {
		return false
	}
	return true
}

// resolvedImage is an image walked down to its blobs.
type resolvedImage struct {
	repo      engine.Repo
	platforms []string
	blobs     []digest.Digest
	sizes     map[digest.Digest]int64 // from the manifests' descriptors
}

// walkImage fetches the image's manifest (through the engine: disk,
// bucket, upstream) and, for an index, the manifests of the platforms
// asked for, attestations skipped, and lists their config and layer blobs.
func walkImage(ctx context.Context, eng *engine.Engine, img Image, platforms []string) (*resolvedImage, error) {
	registry, name, err := SplitRepository(img.Repository, eng.DefaultUpstream())
	if err != nil {
		return nil, err
	}
	if err := img.Digest.Validate(); err != nil {
		return nil, &engine.Error{Kind: engine.KindInvalidReference, Msg: fmt.Sprintf("%s: digest %q: %v", img.Repository, img.Digest, err)}
	}
	repo, err := eng.Resolve(registry, name)
	if err != nil {
		return nil, err
	}
	top, err := eng.Manifest(ctx, repo, img.Digest.String(), nil)
	if err != nil {
		return nil, err
	}
	out := &resolvedImage{repo: repo, sizes: map[digest.Digest]int64{}}
	seen := map[digest.Digest]bool{}
	add := func(d descriptor) {
		if !seen[d.Digest] {
			seen[d.Digest] = true
			out.blobs = append(out.blobs, d.Digest)
			out.sizes[d.Digest] = d.Size
		}
	}
	addManifest := func(m engine.Manifest) error {
		var doc manifestDoc
		if err := json.Unmarshal(m.Content, &doc); err != nil {
			return &engine.Error{Kind: engine.KindUnsupported, Msg: fmt.Sprintf("%s@%s: manifest is not JSON: %v", img.Repository, m.Digest, err)}
		}
		mt := m.MediaType
		if mt == "" {
			mt = doc.MediaType
		}
		if !IsImageManifest(mt) {
			return &engine.Error{Kind: engine.KindUnsupported, Msg: fmt.Sprintf("%s@%s: unsupported manifest media type %q", img.Repository, m.Digest, mt)}
		}
		if doc.Config.Digest != "" {
			add(doc.Config)
		}
		for _, l := range doc.Layers {
			add(l)
		}
		return nil
	}
	var doc manifestDoc
	_ = json.Unmarshal(top.Content, &doc)
	mt := top.MediaType
	if mt == "" {
		mt = doc.MediaType
	}
	if !IsIndex(mt) {
		return out, addManifest(top)
	}
	if len(platforms) == 0 {
		platforms = []string{NodePlatform()}
	}
	for _, want := range platforms {
		found := false
		for _, d := range doc.Manifests {
			if d.IsAttestation() || d.Platform == nil {
				continue
			}
			if !platformMatches(want, d.Platform.OS, d.Platform.Architecture, d.Platform.Variant) {
				continue
			}
			child, err := eng.Manifest(ctx, repo, d.Digest.String(), nil)
			if err != nil {
				return nil, err
			}
			if err := addManifest(child); err != nil {
				return nil, err
			}
			found = true
			break
		}
		if found {
			out.platforms = append(out.platforms, want)
		}
	}
	if len(out.platforms) == 0 {
		var have []string
		for _, d := range doc.Manifests {
			if d.Platform != nil && !d.IsAttestation() {
				have = append(have, d.Platform.OS+"/"+d.Platform.Architecture)
			}
		}
		return nil, &engine.Error{Kind: engine.KindNotFound, Msg: fmt.Sprintf("%s@%s: no manifest for platform %s (the index has %s)", img.Repository, img.Digest, strings.Join(platforms, ", "), strings.Join(have, ", "))}
	}
	return out, nil
}

// SplitRepository splits "host/path" into the registry and the repository
// name: the first component is a registry when it has a dot or a colon or
// is localhost, as Docker decides; otherwise the registry is def.
func SplitRepository(repository, def string) (registry, name string, err error) {
	if repository == "" {
		return "", "", &engine.Error{Kind: engine.KindInvalidReference, Msg: "empty repository"}
	}
	first, rest, ok := strings.Cut(repository, "/")
	if ok && (strings.ContainsAny(first, ".:") || first == "localhost") {
		return first, rest, nil
	}
	return def, repository, nil
}

package inspector

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// MaxConfigSize bounds an image configuration berth reads: a larger one is
// recorded as an inspection error and never read.
const MaxConfigSize = 8 << 20

// recordVersion is the layout of Record; a stored record of another
// version is inspected again.
const recordVersion = 1

// Kinds of manifest.
const (
	KindImage = "image"
	KindIndex = "index"
)

// Record is what berth learnt by inspecting one manifest, stored by digest
// next to the cache and in the fleet's bucket.
type Record struct {
	Version    int       `json:"version"`
	Upstream   string    `json:"upstream"`
	Repository string    `json:"repository"` // where the manifest was first seen
	Digest     string    `json:"digest"`
	MediaType  string    `json:"mediaType"`
	Kind       string    `json:"kind"` // image or index
	Inspected  time.Time `json:"inspected"`
	// Error says why the manifest could not be inspected (a config over
	// 8 MiB, a config that is not JSON, ...); what could be read is kept.
	Error string `json:"error,omitempty"`
	Image *Image `json:"image,omitempty"`
	Index *Index `json:"index,omitempty"`
}

// Image is one platform's image: its manifest and configuration.
type Image struct {
	ConfigDigest string            `json:"configDigest"`
	ConfigSize   int64             `json:"configSize"`
	OS           string            `json:"os,omitempty"`
	Architecture string            `json:"architecture,omitempty"`
	Variant      string            `json:"variant,omitempty"`
	OSVersion    string            `json:"osVersion,omitempty"`
	Created      *time.Time        `json:"created,omitempty"`
	Author       string            `json:"author,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
	// Annotations are the image's OCI annotations: the manifest's own,
	// over org.opencontainers.image.* labels, over label-schema.org labels
	// under their OCI names (build-date becomes created, vcs-url source, ...).
	Annotations  map[string]string `json:"annotations,omitempty"`
	Entrypoint   []string          `json:"entrypoint,omitempty"`
	Cmd          []string          `json:"cmd,omitempty"`
	ExposedPorts []string          `json:"exposedPorts,omitempty"`
	WorkingDir   string            `json:"workingDir,omitempty"`
	User         string            `json:"user,omitempty"`
	// EnvNames are the names of the environment variables, never their
	// values; the API shows them only with inspector.show_env_names.
	EnvNames     []string `json:"envNames,omitempty"`
	Layers       []Layer  `json:"layers"`
	Dockerfile   []string `json:"dockerfile,omitempty"`
	DownloadSize int64    `json:"downloadSize"` // the compressed layers
	// Subject is the manifest an artifact (a signature, an attestation) refers to.
	Subject string `json:"subject,omitempty"`
}

// Layer is one filesystem layer and the build step that made it.
type Layer struct {
	Digest    string     `json:"digest"`
	MediaType string     `json:"mediaType"`
	Size      int64      `json:"size"`
	Command   string     `json:"command,omitempty"`
	Created   *time.Time `json:"created,omitempty"`
}

// Index is a multi-platform index: its platforms and, apart, the
// attestation manifests BuildKit adds to it.
type Index struct {
	Annotations  map[string]string `json:"annotations,omitempty"`
	Platforms    []Entry           `json:"platforms"`
	Attestations []Entry           `json:"attestations,omitempty"`
}

// Entry is one manifest an index lists.
type Entry struct {
	Digest       string            `json:"digest"`
	MediaType    string            `json:"mediaType"`
	Size         int64             `json:"size"`
	OS           string            `json:"os,omitempty"`
	Architecture string            `json:"architecture,omitempty"`
	Variant      string            `json:"variant,omitempty"`
	OSVersion    string            `json:"osVersion,omitempty"`
	RefersTo     string            `json:"refersTo,omitempty"` // an attestation's image
	Annotations  map[string]string `json:"annotations,omitempty"`
}

// Platform names an entry the way people write it: linux/arm64/v8.
func (e Entry) Platform() string { return platformString(e.OS, e.Architecture, e.Variant) }

// Platform names the image's platform: linux/amd64.
func (i *Image) Platform() string { return platformString(i.OS, i.Architecture, i.Variant) }

func platformString(os, arch, variant string) string {
	s := os + "/" + arch
	if variant != "" {
		s += "/" + variant
	}
	if s == "/" {
		return "unknown"
	}
	return s
}

const (
	attestationType = "attestation-manifest"
	refTypeKey      = "vnd.docker.reference.type"
	refDigestKey    = "vnd.docker.reference.digest"
)

// labelSchema maps label-schema.org labels to the OCI annotations that
// replaced them.
var labelSchema = map[string]string{
	"org.label-schema.build-date":  "org.opencontainers.image.created",
	"org.label-schema.vcs-url":     "org.opencontainers.image.source",
	"org.label-schema.vcs-ref":     "org.opencontainers.image.revision",
	"org.label-schema.name":        "org.opencontainers.image.title",
	"org.label-schema.usage":       "org.opencontainers.image.documentation",
	"org.label-schema.description": "org.opencontainers.image.description",
	"org.label-schema.url":         "org.opencontainers.image.url",
	"org.label-schema.vendor":      "org.opencontainers.image.vendor",
	"org.label-schema.version":     "org.opencontainers.image.version",
	"org.label-schema.license":     "org.opencontainers.image.licenses",
}

// manifestProbe reads what every manifest kind shares.
type manifestProbe struct {
	SchemaVersion int             `json:"schemaVersion"`
	MediaType     string          `json:"mediaType"`
	Manifests     json.RawMessage `json:"manifests"`
	Config        json.RawMessage `json:"config"`
}

// kindOf says whether content is an image manifest or an index.
func kindOf(content []byte, mediaType string) (string, error) {
	var p manifestProbe
	if err := json.Unmarshal(content, &p); err != nil {
		return "", fmt.Errorf("manifest is not JSON: %v", err)
	}
	if p.SchemaVersion == 1 {
		return "", errors.New("schema 1 manifests are not inspected")
	}
	switch {
	case strings.Contains(mediaType, "manifest.list") || strings.Contains(mediaType, "image.index") || p.Manifests != nil:
		return KindIndex, nil
	case p.Config != nil:
		return KindImage, nil
	}
	return "", fmt.Errorf("unknown manifest type %q", mediaType)
}

// parseIndex reads an index: platforms, attestations listed apart.
func parseIndex(content []byte) (*Index, error) {
	im, err := v1.ParseIndexManifest(bytes.NewReader(content))
	if err != nil {
		return nil, fmt.Errorf("index: %v", err)
	}
	out := &Index{Annotations: im.Annotations, Platforms: []Entry{}}
	for _, d := range im.Manifests {
		e := Entry{Digest: d.Digest.String(), MediaType: string(d.MediaType), Size: d.Size, Annotations: d.Annotations}
		if d.Platform != nil {
			e.OS, e.Architecture, e.Variant, e.OSVersion = d.Platform.OS, d.Platform.Architecture, d.Platform.Variant, d.Platform.OSVersion
		}
		if d.Annotations[refTypeKey] == attestationType {
			e.RefersTo = d.Annotations[refDigestKey]
			out.Attestations = append(out.Attestations, e)
			continue
		}
		out.Platforms = append(out.Platforms, e)
	}
	return out, nil
}

// parseManifest reads an image manifest; the config is read by parseConfig.
func parseManifest(content []byte) (*v1.Manifest, error) {
	m, err := v1.ParseManifest(bytes.NewReader(content))
	if err != nil {
		return nil, fmt.Errorf("manifest: %v", err)
	}
	return m, nil
}

// imageFromManifest fills what the manifest alone tells.
func imageFromManifest(m *v1.Manifest) *Image {
	img := &Image{ConfigDigest: m.Config.Digest.String(), ConfigSize: m.Config.Size, Layers: []Layer{}}
	for _, l := range m.Layers {
		img.Layers = append(img.Layers, Layer{Digest: l.Digest.String(), MediaType: string(l.MediaType), Size: l.Size})
		img.DownloadSize += l.Size
	}
	if m.Subject != nil {
		img.Subject = m.Subject.Digest.String()
	}
	img.Annotations = mergeAnnotations(nil, m.Annotations)
	return img
}

// applyConfig adds what the image's configuration tells. A config that is
// not JSON is an error and leaves img as the manifest made it.
func applyConfig(img *Image, m *v1.Manifest, raw []byte) error {
	if !json.Valid(raw) {
		return errors.New("config is not JSON")
	}
	cf, err := v1.ParseConfigFile(bytes.NewReader(raw))
	if err != nil {
		return fmt.Errorf("config: %v", err)
	}
	img.OS, img.Architecture, img.Variant, img.OSVersion = cf.OS, cf.Architecture, cf.Variant, cf.OSVersion
	if !cf.Created.IsZero() {
		t := cf.Created.UTC()
		img.Created = &t
	}
	img.Author = cf.Author
	c := cf.Config
	img.Labels = c.Labels
	img.Entrypoint, img.Cmd = c.Entrypoint, c.Cmd
	img.WorkingDir, img.User = c.WorkingDir, c.User
	for p := range c.ExposedPorts {
		img.ExposedPorts = append(img.ExposedPorts, p)
	}
	sort.Strings(img.ExposedPorts)
	for _, e := range c.Env {
		name, _, _ := strings.Cut(e, "=")
		img.EnvNames = append(img.EnvNames, name)
	}
	// Annotations: label-schema under OCI names, then OCI labels, then
	// the manifest's own annotations.
	ann := map[string]string{}
	for k, v := range c.Labels {
		if oci, ok := labelSchema[k]; ok {
			ann[oci] = v
		}
	}
	for k, v := range c.Labels {
		if strings.HasPrefix(k, "org.opencontainers.image.") {
			ann[k] = v
		}
	}
	img.Annotations = mergeAnnotations(ann, m.Annotations)

	// History: each entry that made a layer goes with the next layer;
	// empty layers (ENV, CMD, ...) make only Dockerfile lines.
	li := 0
	for _, h := range cf.History {
		line := dockerfileLine(h.CreatedBy)
		if line != "" {
			img.Dockerfile = append(img.Dockerfile, line)
		}
		if h.EmptyLayer {
			continue
		}
		if li < len(img.Layers) {
			img.Layers[li].Command = line
			if !h.Created.IsZero() {
				t := h.Created.UTC()
				img.Layers[li].Created = &t
			}
		}
		li++
	}
	return nil
}

func mergeAnnotations(base, over map[string]string) map[string]string {
	if len(base) == 0 && len(over) == 0 {
		return nil
	}
	out := map[string]string{}
	for k, v := range base {
		out[k] = v
	}
	for k, v := range over {
		out[k] = v
	}
	return out
}

// dockerfileLine turns a history entry's created_by into the Dockerfile
// instruction that made it: the classic builder's "/bin/sh -c #(nop) CMD
// [...]" and "/bin/sh -c apk add ..." and BuildKit's "RUN /bin/sh -c ...
// # buildkit" alike.
func dockerfileLine(createdBy string) string {
	s := strings.TrimSpace(createdBy)
	if s == "" {
		return ""
	}
	s = strings.TrimSpace(strings.TrimSuffix(s, "# buildkit"))
	// Build arguments of the classic builder: "|2 A=1 B=2 /bin/sh -c ...".
	if strings.HasPrefix(s, "|") {
		if i := strings.Index(s, "/bin/sh -c "); i > 0 {
			s = s[i:]
		}
	}
	switch {
	case strings.HasPrefix(s, "/bin/sh -c #(nop)"):
		return strings.TrimSpace(strings.TrimPrefix(s, "/bin/sh -c #(nop)"))
	case strings.HasPrefix(s, "/bin/sh -c "):
		return "RUN " + strings.TrimSpace(strings.TrimPrefix(s, "/bin/sh -c "))
	case strings.HasPrefix(s, "RUN /bin/sh -c "):
		return "RUN " + strings.TrimSpace(strings.TrimPrefix(s, "RUN /bin/sh -c "))
	}
	return s
}

// Microscaling is what Microscaling read from image labels to scale a
// service (com.microscaling.*); empty fields were not labelled.
type Microscaling struct {
	Priority      string `json:"priority,omitempty"`
	MinContainers string `json:"minContainers,omitempty"`
	MaxContainers string `json:"maxContainers,omitempty"`
	MaxDelta      string `json:"maxDelta,omitempty"`
	IsScalable    string `json:"isScalable,omitempty"`
}

// microscaling reads the com.microscaling.* labels; nil without any.
func microscaling(labels map[string]string) *Microscaling {
	m := Microscaling{
		Priority:      labels["com.microscaling.priority"],
		MinContainers: labels["com.microscaling.min-containers"],
		MaxContainers: labels["com.microscaling.max-containers"],
		MaxDelta:      labels["com.microscaling.max-delta"],
		IsScalable:    labels["com.microscaling.is-scalable"],
	}
	if m == (Microscaling{}) {
		return nil
	}
	return &m
}

package e2e

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Blob is one content-addressed blob of a pushed image.
type Blob struct {
	Digest string
	Size   int64
}

// PushedImage describes an image pushed with PushImage.
type PushedImage struct {
	Repo      string // repository inside the registry, e.g. library/alpine
	Tag       string // empty for images pushed only as part of an index
	Digest    string // manifest digest
	MediaType string
	Manifest  []byte
	Config    Blob
	Layers    []Blob
	Image     v1.Image
}

// Blobs lists the config and the layers.
func (p *PushedImage) Blobs() []Blob {
	return append([]Blob{p.Config}, p.Layers...)
}

// Bytes is what a client downloads for this image: manifest, config and the
// compressed layers. It is the denominator of "upstream bytes ÷ image bytes".
func (p *PushedImage) Bytes() int64 {
	n := int64(len(p.Manifest))
	for _, b := range p.Blobs() {
		n += b.Size
	}
	return n
}

// PushedIndex describes a multi-platform index pushed with PushIndex.
type PushedIndex struct {
	Repo      string
	Tag       string
	Digest    string
	MediaType string
	Manifest  []byte
	Images    []*PushedImage // in the index's order, one per platform
	Platforms []v1.Platform
}

// Bytes is the index manifest plus every child image in full.
func (p *PushedIndex) Bytes() int64 {
	n := int64(len(p.Manifest))
	for _, img := range p.Images {
		n += img.Bytes()
	}
	return n
}

// ForPlatform returns the child image for GOOS/GOARCH of this machine, which
// is what docker, ctr and crane pick from an index by default.
func (p *PushedIndex) ForPlatform(os, arch string) *PushedImage {
	for i, pl := range p.Platforms {
		if pl.OS == os && pl.Architecture == arch {
			return p.Images[i]
		}
	}
	return nil
}

// Format chooses the media types of generated images and indexes.
type Format int

const (
	// Docker is what docker build pushes: schema 2 manifests, manifest lists.
	Docker Format = iota
	// OCI is image-spec manifests and indexes; the conformance suite asks
	// only for these.
	OCI
)

// RandomImage makes an image of `layers` layers with `layerSize` random bytes
// each, for os/arch (docker refuses to pull images whose config names no
// platform, so one is always set).
func RandomImage(t testing.TB, format Format, layerSize int64, layers int, os, arch string) v1.Image {
	t.Helper()
	base, layerType := empty.Image, types.DockerLayer
	if format == OCI {
		base = mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
		layerType = types.OCILayer
	}
	adds := make([]mutate.Addendum, 0, layers)
	for range layers {
		l, err := random.Layer(layerSize, layerType)
		if err != nil {
			t.Fatalf("random layer: %v", err)
		}
		adds = append(adds, mutate.Addendum{Layer: l, History: v1.History{CreatedBy: "berth e2e random layer"}})
	}
	img, err := mutate.Append(base, adds...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = os, arch
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func describeImage(t testing.TB, img v1.Image) *PushedImage {
	t.Helper()
	dig, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	mt, err := img.MediaType()
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	p := &PushedImage{
		Digest:    dig.String(),
		MediaType: string(mt),
		Manifest:  raw,
		Config:    Blob{Digest: m.Config.Digest.String(), Size: m.Config.Size},
		Image:     img,
	}
	for _, l := range m.Layers {
		p.Layers = append(p.Layers, Blob{Digest: l.Digest.String(), Size: l.Size})
	}
	return p
}

func pushRef(t testing.TB, host, repo, tagOrDigest string) name.Reference {
	t.Helper()
	sep := ":"
	if len(tagOrDigest) > 7 && tagOrDigest[:7] == "sha256:" {
		sep = "@"
	}
	ref, err := name.ParseReference(host+"/"+repo+sep+tagOrDigest, name.Insecure)
	if err != nil {
		t.Fatalf("reference %s/%s%s%s: %v", host, repo, sep, tagOrDigest, err)
	}
	return ref
}

// PushImage pushes a random image in format for this machine's platform to
// host/repo:tag (plain HTTP, as every registry in these tests is on loopback).
func PushImage(t testing.TB, format Format, host, repo, tag string, layerSize int64, layers int) *PushedImage {
	t.Helper()
	img := RandomImage(t, format, layerSize, layers, "linux", runtime.GOARCH)
	p := describeImage(t, img)
	p.Repo, p.Tag = repo, tag
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := remote.Write(pushRef(t, host, repo, tag), img, remote.WithContext(ctx)); err != nil {
		t.Fatalf("pushing %s/%s:%s: %v", host, repo, tag, err)
	}
	return p
}

// PushIndex pushes an index (a manifest list for Docker) with one random
// image per platform (linux/amd64 and linux/arm64 unless platforms are
// given) to host/repo:tag.
func PushIndex(t testing.TB, format Format, host, repo, tag string, layerSize int64, layers int, platforms ...v1.Platform) *PushedIndex {
	t.Helper()
	if len(platforms) == 0 {
		platforms = []v1.Platform{{OS: "linux", Architecture: "amd64"}, {OS: "linux", Architecture: "arm64"}}
	}
	mt := types.DockerManifestList
	if format == OCI {
		mt = types.OCIImageIndex
	}
	idx := mutate.IndexMediaType(empty.Index, mt)
	p := &PushedIndex{Repo: repo, Tag: tag, Platforms: platforms}
	for _, pl := range platforms {
		img := RandomImage(t, format, layerSize, layers, pl.OS, pl.Architecture)
		child := describeImage(t, img)
		child.Repo = repo
		p.Images = append(p.Images, child)
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add:        img,
			Descriptor: v1.Descriptor{Platform: &pl},
		})
	}
	dig, err := idx.Digest()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := idx.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	p.Digest, p.Manifest, p.MediaType = dig.String(), raw, string(mt)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := remote.WriteIndex(pushRef(t, host, repo, tag), idx, remote.WithContext(ctx)); err != nil {
		t.Fatalf("pushing index %s/%s:%s: %v", host, repo, tag, err)
	}
	return p
}

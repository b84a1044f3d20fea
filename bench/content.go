package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Repositories and tag the benchmark pushes to the upstream.
const (
	imageRepo   = "bench/app"
	imageTag    = "v1"
	bigRepo     = "bench/big"
	bigBlobFile = "blob" // the big blob's name under nginx's root
)

// testImage is what the pull scenarios fetch: its manifest digest and the
// bytes one complete pull moves (manifest, config and layers).
type testImage struct {
	digest v1.Hash
	bytes  int64
	blobs  int
}

// randomReader is a fast non-cryptographic source; the content only has to
// be incompressible and distinct per run.
func randomReader(seed uint64) io.Reader {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	return rand.NewChaCha8(key)
}

// layerTar is a real uncompressed layer: one file of size random bytes.
func layerTar(i int, size int64, seed uint64) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(int(size) + 4096)
	tw := tar.NewWriter(&buf)
	hdr := &tar.Header{Name: fmt.Sprintf("data/layer-%d.bin", i), Mode: 0o644, Size: size, ModTime: time.Unix(0, 0)}
	if err := tw.WriteHeader(hdr); err != nil {
		return nil, err
	}
	if _, err := io.CopyN(tw, randomReader(seed), size); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// pushImage builds an OCI image of n random layers from seed and pushes it
// straight to the upstream registry as repo:imageTag, bypassing the
// throttled link. Images pushed with different seeds share no layer.
func pushImage(ctx context.Context, upstream, repo string, layers int, layerSize int64, seed uint64) (testImage, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	var ls []v1.Layer
	for i := range layers {
		data, err := layerTar(i, layerSize, seed+uint64(i))
		if err != nil {
			return testImage{}, err
		}
		ls = append(ls, static.NewLayer(data, types.OCIUncompressedLayer))
	}
	img, err := mutate.AppendLayers(img, ls...)
	if err != nil {
		return testImage{}, err
	}
	ref, err := name.ParseReference(upstream+"/"+repo+":"+imageTag, name.Insecure)
	if err != nil {
		return testImage{}, err
	}
	if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
		return testImage{}, fmt.Errorf("pushing %s: %w", repo, err)
	}
	raw, err := img.RawManifest()
	if err != nil {
		return testImage{}, err
	}
	m, err := img.Manifest()
	if err != nil {
		return testImage{}, err
	}
	d, err := img.Digest()
	if err != nil {
		return testImage{}, err
	}
	total := int64(len(raw)) + m.Config.Size
	for _, l := range m.Layers {
		total += l.Size
	}
	return testImage{digest: d, bytes: total, blobs: len(m.Layers) + 1}, nil
}

// bigBlob is the large blob of the serving scenarios, kept in a file so that
// nginx can serve the very same bytes.
type bigBlob struct {
	path   string
	digest string
	size   int64
}

func makeBigBlob(dir string, size int64) (bigBlob, error) {
	path := filepath.Join(dir, bigBlobFile)
	f, err := os.Create(path)
	if err != nil {
		return bigBlob{}, err
	}
	h := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(f, h), randomReader(uint64(time.Now().UnixNano())), size); err != nil {
		f.Close()
		return bigBlob{}, err
	}
	if err := f.Close(); err != nil {
		return bigBlob{}, err
	}
	return bigBlob{path: path, digest: "sha256:" + hex.EncodeToString(h.Sum(nil)), size: size}, nil
}

// pushBlob uploads the file monolithically (POST, then PUT with the digest),
// streaming it from disk.
func pushBlob(ctx context.Context, upstreamURL, repo string, b bigBlob) error {
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, upstreamURL+"/v2/"+repo+"/blobs/uploads/", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		return fmt.Errorf("starting blob upload: %s", resp.Status)
	}
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		return err
	}
	base, _ := url.Parse(upstreamURL)
	loc = base.ResolveReference(loc)
	q := loc.Query()
	q.Set("digest", b.digest)
	loc.RawQuery = q.Encode()
	f, err := os.Open(b.path)
	if err != nil {
		return err
	}
	defer f.Close()
	req, _ = http.NewRequestWithContext(ctx, http.MethodPut, loc.String(), f)
	req.ContentLength = b.size
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("Content-Length", strconv.FormatInt(b.size, 10))
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("uploading blob: %s", resp.Status)
	}
	return nil
}

package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// VerifyOCILayout checks that an OCI image layout (as written by
// `crane pull --format=oci` or `skopeo copy ... oci:DIR`) holds want: the
// manifest, the config and every layer, each file hashing to its digest and
// of the expected size. It is independent of the client's own verification.
func VerifyOCILayout(t testing.TB, dir string, want *PushedImage) {
	t.Helper()
	var idx struct {
		Manifests []struct {
			Digest string `json:"digest"`
		} `json:"manifests"`
	}
	b, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil {
		t.Fatalf("layout %s: %v", dir, err)
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		t.Fatalf("layout %s index.json: %v", dir, err)
	}
	found := false
	for _, m := range idx.Manifests {
		found = found || m.Digest == want.Digest
	}
	if !found {
		t.Errorf("layout %s: index.json does not name manifest %s: %s", dir, want.Digest, b)
	}
	verifyBlobFile(t, dir, Blob{Digest: want.Digest, Size: int64(len(want.Manifest))})
	for _, blob := range want.Blobs() {
		verifyBlobFile(t, dir, blob)
	}
}

func verifyBlobFile(t testing.TB, dir string, want Blob) {
	t.Helper()
	algo, hexDigest, ok := strings.Cut(want.Digest, ":")
	if !ok || algo != "sha256" {
		t.Fatalf("unexpected digest %q", want.Digest)
	}
	verifyFile(t, filepath.Join(dir, "blobs", algo, hexDigest), want)
}

// verifyFile checks that path holds exactly the blob want.
func verifyFile(t testing.TB, path string, want Blob) {
	t.Helper()
	_, hexDigest, _ := strings.Cut(want.Digest, ":")
	f, err := os.Open(path)
	if err != nil {
		t.Errorf("blob %s missing: %v", want.Digest, err)
		return
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		t.Errorf("reading blob %s: %v", want.Digest, err)
		return
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != hexDigest {
		t.Errorf("blob %s has content hashing to sha256:%s", want.Digest, got)
	}
	if n != want.Size {
		t.Errorf("blob %s is %d bytes, want %d", want.Digest, n, want.Size)
	}
}

// VerifyDirLayout checks a `skopeo copy ... dir:DIR` copy of want: the
// manifest byte for byte (so its digest is the pushed one) and every blob,
// stored under its hex digest, hashing to that digest.
func VerifyDirLayout(t testing.TB, dir string, want *PushedImage) {
	t.Helper()
	m, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		t.Fatalf("dir copy %s: %v", dir, err)
	}
	if got := "sha256:" + hex.EncodeToString(sha256Sum(m)); got != want.Digest {
		t.Errorf("dir copy %s: manifest digest %s, want %s", dir, got, want.Digest)
	}
	for _, blob := range want.Blobs() {
		_, hexDigest, _ := strings.Cut(blob.Digest, ":")
		verifyFile(t, filepath.Join(dir, hexDigest), blob)
	}
}

func sha256Sum(b []byte) []byte {
	h := sha256.Sum256(b)
	return h[:]
}

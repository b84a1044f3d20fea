package engine

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/berth-dev/berth/storage"
)

// smallDisk mounts a tmpfs of size bytes for the test: a real filesystem
// that really fills up.
func smallDisk(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("mounting a small tmpfs needs root, and CI=true allows no skip")
		}
		t.Skip("mounting a small tmpfs needs root")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

// A disk that fills in the middle of a download does not cut the callers
// streaming it: what is on disk stays readable, the rest is relayed, the
// blob is still verified, and nothing is kept.
func TestDiskFillingMidDownloadRelaysTheRest(t *testing.T) {
	dir := smallDisk(t, "72m")
	u := newUpstreamFake(t)
	content := randomBytes(60, 100<<20)
	d := u.pushBlob("org/app", content)
	// No Content-Length: the disk check at the start cannot know the size.
	u.set("GET", blobPath("org/app", d), func(w http.ResponseWriter, r *http.Request) {
		rec := httptest.NewRecorder()
		u.reg.ServeHTTP(rec, r)
		w.Header().Del("Content-Length")
		w.WriteHeader(rec.Code)
		body := rec.Body.Bytes()
		for len(body) > 0 {
			n := min(1<<20, len(body))
			w.Write(body[:n])
			w.(http.Flusher).Flush()
			body = body[n:]
		}
	})
	local, err := storage.OpenLocal(dir, storage.LocalOptions{Budget: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	e := newTestEngine(t, u, nil)
	e.Engine.local = local // the engine's tiers over the small disk
	e.local = local
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()
			b, err := e.Blob(ctx, e.repo, d)
			if err != nil {
				t.Errorf("blob: %v", err)
				return
			}
			defer b.Close()
			got, err := io.ReadAll(b)
			if err != nil || !bytes.Equal(got, content) {
				t.Errorf("read %d of %d bytes: %v", len(got), len(content), err)
			}
		}()
	}
	wg.Wait()
	if n := u.count("GET", blobPath("org/app", d)); n != 1 {
		t.Fatalf("upstream GETs %d, want 1", n)
	}
	if _, ok := local.HasBlob(storage.Key{Upstream: "upstream.test", Digest: d}); ok {
		t.Fatal("a blob the disk had no room for is cached")
	}
	if n := e.counter(e.metrics.passthrough); n != 1 {
		t.Fatalf("relays %v, want 1", n)
	}
	eventually(t, "tmp/ empty", func() bool {
		ents, _ := os.ReadDir(dir + "/tmp")
		return len(ents) == 0
	})
}

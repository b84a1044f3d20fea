package e2e

import (
	"context"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// faultyUpstream stands in front of the real registry and breaks the first
// GET of every layer after `after` bytes, the way a flaky load balancer or
// CDN does; later GETs, ranged or not, go through (as mode allows).
type faultyUpstream struct {
	URL   string
	mode  string // stall, reset, ignore-range, wrong-after
	after int64
	stop  chan struct{}

	mu   sync.Mutex
	gets map[string]int // blob path -> GETs
}

func startFaultyUpstream(t *testing.T, registryHost, mode string, after int64, large int64) *faultyUpstream {
	t.Helper()
	target, _ := url.Parse("http://" + registryHost)
	f := &faultyUpstream{mode: mode, after: after, stop: make(chan struct{}), gets: map[string]int{}}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.FlushInterval = -1
	rp.ModifyResponse = func(resp *http.Response) error {
		r := resp.Request
		if r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/") || resp.ContentLength < large {
			return nil
		}
		f.mu.Lock()
		n := f.gets[r.URL.Path]
		f.gets[r.URL.Path]++
		f.mu.Unlock()
		switch {
		case n == 0 && (mode == "stall" || mode == "reset" || mode == "ignore-range" || mode == "wrong-after"):
			resp.Body = &faultyBody{rc: resp.Body, left: after, stall: mode == "stall", stop: f.stop, ctx: r.Context()}
		case n > 0 && mode == "wrong-after":
			resp.Body = &flipBody{rc: resp.Body}
		}
		return nil
	}
	f.URL = "http://" + testsupport.ServeLoopback(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if mode == "ignore-range" {
			r.Header.Del("Range") // the registry then answers 200 from the start
		}
		rp.ServeHTTP(w, r)
	}))
	// Registered after the server's: runs first, so stalled handlers return
	// before the server waits for them.
	t.Cleanup(func() { close(f.stop) })
	return f
}

func (f *faultyUpstream) blobGETs(dgst string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	for p, n := range f.gets {
		if strings.HasSuffix(p, dgst) {
			return n
		}
	}
	return 0
}

// faultyBody passes left bytes on, then stalls (until the request or the
// test ends) or fails, which makes the proxy cut the connection.
type faultyBody struct {
	rc    io.ReadCloser
	left  int64
	stall bool
	stop  chan struct{}
	ctx   context.Context
}

func (b *faultyBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		if b.stall {
			select {
			case <-b.stop:
			case <-b.ctx.Done():
			}
		}
		return 0, io.ErrUnexpectedEOF
	}
	n, err := b.rc.Read(p[:min(int64(len(p)), b.left)])
	b.left -= int64(n)
	return n, err
}

func (b *faultyBody) Close() error { return b.rc.Close() }

// flipBody sends the right length of the wrong bytes.
type flipBody struct{ rc io.ReadCloser }

func (b *flipBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	for i := range n {
		p[i] ^= 0x5a
	}
	return n, err
}

func (b *flipBody) Close() error { return b.rc.Close() }

// An upstream whose blob downloads stall, reset or ignore Range after the
// first MiB: concurrent crane pulls through berth complete with the right
// bytes, each layer asked of the upstream once more from where it broke.
func TestResumeCranePulls(t *testing.T) {
	testsupport.RequireTool(t, "crane")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/flaky", "1", 4<<20, 3)
	for _, mode := range []string{"stall", "reset", "ignore-range"} {
		t.Run(mode, func(t *testing.T) {
			up := startFaultyUpstream(t, reg.Host, mode, 1<<20, 1<<20)
			b := StartBerth(t, append(UpstreamArgs(reg.Host, up.URL), "--source-idle-timeout", "1s")...)
			start := time.Now()
			var wg sync.WaitGroup
			for range 3 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					cranePullVerify(t, b.Host+"/library/flaky:1", img)
				}()
			}
			wg.Wait()
			t.Logf("%s: 3 pulls in %v", mode, time.Since(start))
			for _, l := range img.Layers {
				if n := up.blobGETs(l.Digest); n != 2 {
					t.Errorf("layer %s: %d upstream GETs, want 2 (one broken, one resumed)", l.Digest, n)
				}
			}
			if n := metric(t, b, "berth_resumes_total"); n != float64(len(img.Layers)) {
				t.Errorf("berth_resumes_total %v, want %d", n, len(img.Layers))
			}
		})
	}
}

// Wrong bytes after the resume point fail the pull cleanly: berth keeps
// nothing of those layers and no client gets a whole wrong blob.
func TestResumeWrongBytesFailCleanly(t *testing.T) {
	testsupport.RequireTool(t, "crane")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/flaky", "1", 4<<20, 2)
	up := startFaultyUpstream(t, reg.Host, "wrong-after", 1<<20, 1<<20)
	b := StartBerth(t, UpstreamArgs(reg.Host, up.URL)...)
	dir := filepath.Join(t.TempDir(), "layout")
	if out, err := RunErr(2*time.Minute, nil, "crane", "pull", "--insecure", "--format=oci", b.Host+"/library/flaky:1", dir); err == nil {
		t.Fatalf("pull of corrupt content succeeded: %s", out)
	}
	for _, l := range img.Layers {
		enc := strings.TrimPrefix(l.Digest, "sha256:")
		matches, _ := filepath.Glob(filepath.Join(b.Data, "blobs", "*", "sha256", enc))
		if len(matches) > 0 {
			t.Errorf("layer %s kept after wrong bytes", l.Digest)
		}
	}
	if n := metric(t, b, "berth_digest_mismatches_total"); n == 0 {
		t.Error("no digest mismatch counted")
	}
	ents, _ := os.ReadDir(filepath.Join(b.Data, "tmp"))
	if len(ents) != 0 {
		t.Errorf("tmp/ holds %d files after failed downloads", len(ents))
	}
}

// docker pull through berth from an upstream that stalls mid-layer.
func TestResumeDockerPull(t *testing.T) {
	testsupport.RequireRoot(t)
	testsupport.RequireTool(t, "dockerd")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/flakydock", "1", 4<<20, 2)
	up := startFaultyUpstream(t, reg.Host, "stall", 1<<20, 1<<20)
	b := StartBerth(t, append(UpstreamArgs(reg.Host, up.URL), "--source-idle-timeout", "1s")...)
	d := StartDockerd(t, DockerdOptions{})
	ref := b.Host + "/library/flakydock:1"
	d.Docker(t, 3*time.Minute, "pull", ref)
	if id := strings.TrimSpace(d.Docker(t, time.Minute, "image", "inspect", "--format", "{{.Id}}", ref)); id != img.Config.Digest {
		t.Errorf("docker pull %s: image id %s, want %s", ref, id, img.Config.Digest)
	}
	for _, l := range img.Layers {
		if n := up.blobGETs(l.Digest); n != 2 {
			t.Errorf("layer %s: %d upstream GETs, want 2", l.Digest, n)
		}
	}
}

package engine

import (
	"bytes"
	"context"
	"errors"
	"github.com/berth-dev/berth/config"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/storage"
)

// flaky answers a blob's first GET badly (bad writes what it likes of the
// body, then returns), and every later GET well, with Range as a registry
// would. rangeOK false makes later GETs ignore Range (200 from the start);
// mutate changes what later GETs send.
func (u *upstreamFake) flaky(content []byte, bad func(w http.ResponseWriter, body []byte), rangeOK bool, mutate func([]byte) []byte) http.HandlerFunc {
	var calls atomic.Int32
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Docker-Content-Digest", digest.FromBytes(content).String())
		w.Header().Set("Content-Type", "application/octet-stream")
		if calls.Add(1) == 1 {
			w.Header().Set("Content-Length", strconv.Itoa(len(content)))
			w.WriteHeader(http.StatusOK)
			bad(w, content)
			return
		}
		body := content
		if mutate != nil {
			body = mutate(bytes.Clone(content))
		}
		if !rangeOK {
			r.Header.Del("Range")
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(body))
	}
}

// stallAfter sends n bytes, then nothing, holding the connection open.
func (u *upstreamFake) stallAfter(n int) func(http.ResponseWriter, []byte) {
	return func(w http.ResponseWriter, body []byte) {
		w.Write(body[:n])
		w.(http.Flusher).Flush()
		<-u.stop
	}
}

// resetAfter sends n bytes, then cuts the connection.
func resetAfter(n int) func(http.ResponseWriter, []byte) {
	return func(w http.ResponseWriter, body []byte) {
		w.Write(body[:n])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	}
}

// readAll reads blob d on n concurrent callers and returns what each got.
func (e *testEngine) readAll(t *testing.T, d digest.Digest, n int) ([][]byte, []error) {
	t.Helper()
	got, errs := make([][]byte, n), make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i], errs[i] = e.read(t, d)
		}()
	}
	wg.Wait()
	return got, errs
}

func TestResume(t *testing.T) {
	const size = 3 << 20
	cases := []struct {
		name    string
		bad     func(u *upstreamFake) func(http.ResponseWriter, []byte)
		rangeOK bool
		reason  string
	}{
		{"stall", func(u *upstreamFake) func(http.ResponseWriter, []byte) { return u.stallAfter(1 << 20) }, true, "stall"},
		{"reset", func(*upstreamFake) func(http.ResponseWriter, []byte) { return resetAfter(1 << 20) }, true, "error"},
		{"ignores range", func(*upstreamFake) func(http.ResponseWriter, []byte) { return resetAfter(1 << 20) }, false, "error"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			u := newUpstreamFake(t)
			content := randomBytes(int64(70+i), size)
			d := u.pushBlob("org/app", content)
			u.set("GET", blobPath("org/app", d), u.flaky(content, c.bad(u), c.rangeOK, nil))
			e := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.SourceIdleTimeout = 300 * time.Millisecond })
			got, errs := e.readAll(t, d, 3)
			for i := range got {
				if errs[i] != nil || !bytes.Equal(got[i], content) {
					t.Fatalf("reader %d: %d bytes, %v", i, len(got[i]), errs[i])
				}
			}
			if n := u.count("GET", blobPath("org/app", d)); n != 2 {
				t.Fatalf("upstream GETs %d, want 2 (one resume)", n)
			}
			if n := e.counter(e.metrics.resumes.WithLabelValues("upstream", c.reason)); n != 1 {
				t.Fatalf("resumes{upstream,%s} %v, want 1", c.reason, n)
			}
			wantRe := 0.0
			if !c.rangeOK {
				wantRe = 1 << 20
			}
			if n := e.counter(e.metrics.rerequested.WithLabelValues("upstream")); n != wantRe {
				t.Fatalf("re-requested bytes %v, want %v", n, wantRe)
			}
			if _, ok := e.local.HasBlob(storage.Key{Upstream: "upstream.test", Digest: d}); !ok {
				t.Fatal("resumed blob not cached")
			}
		})
	}
}

// A source whose bytes after the resume point are wrong fails the download
// cleanly: no reader gets the whole body, nothing is kept.
func TestResumeWithWrongBytesFailsCleanly(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(80, 2<<20)
	d := u.pushBlob("org/app", content)
	u.set("GET", blobPath("org/app", d), u.flaky(content, resetAfter(1<<20), true, func(b []byte) []byte {
		b[len(b)-100] ^= 0xff
		return b
	}))
	e := newTestEngine(t, u, nil)
	dir := e.root
	got, errs := e.readAll(t, d, 2)
	for i := range got {
		if errs[i] == nil {
			t.Fatalf("reader %d got a whole body (%d bytes) of corrupt content", i, len(got[i]))
		}
		if len(got[i]) >= len(content) {
			t.Fatalf("reader %d got %d bytes: the last must be held back", i, len(got[i]))
		}
	}
	if _, ok := e.local.HasBlob(storage.Key{Upstream: "upstream.test", Digest: d}); ok {
		t.Fatal("corrupt resumed blob cached")
	}
	eventually(t, "tmp/ empty", func() bool {
		ents, _ := os.ReadDir(filepath.Join(dir, "tmp"))
		return len(ents) == 0
	})
}

// A source that ignores Range and sends different bytes before the resume
// point is set aside; with no other source the download fails.
func TestResumeRefusesADifferentPrefix(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(81, 2<<20)
	d := u.pushBlob("org/app", content)
	u.set("GET", blobPath("org/app", d), u.flaky(content, resetAfter(1<<20), false, func(b []byte) []byte {
		b[10] ^= 0xff
		return b
	}))
	e := newTestEngine(t, u, nil)
	if _, err := e.read(t, d); err == nil {
		t.Fatal("a blob resumed from a source with other bytes was served whole")
	}
	if n := e.counter(e.metrics.resumes.WithLabelValues("upstream", "mismatch")); n == 0 {
		t.Fatal("the differing source was not counted as set aside")
	}
}

// A bucket read that breaks, again and again, resumes from the bucket at
// the byte reached, without asking the upstream.
func TestResumeFromTheBucket(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(82, 1<<20)
	d := u.pushBlob("org/app", content)
	bucket := storage.NewMemory(storage.MemoryOptions{})
	key := storage.Key{Upstream: "upstream.test", Digest: d}
	if err := bucket.PutBlob(context.Background(), key, bytes.NewReader(content), int64(len(content))); err != nil {
		t.Fatal(err)
	}
	bucket.BreakBodies(300<<10, errors.New("connection reset"))
	e := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = bucket })
	got, errs := e.readAll(t, d, 2)
	for i := range got {
		if errs[i] != nil || !bytes.Equal(got[i], content) {
			t.Fatalf("reader %d: %d bytes, %v", i, len(got[i]), errs[i])
		}
	}
	if n := u.count("GET", blobPath("org/app", d)); n != 0 {
		t.Fatalf("upstream GETs %d, want 0", n)
	}
	if n := bucket.Requests("GetBlob"); n != 4 {
		t.Fatalf("bucket GETs %d, want 4 (300 KiB each)", n)
	}
}

// A relay (no room on disk) resumes the same way within its window.
func TestResumeARelay(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(83, 3*RelayWindow)
	d := u.pushBlob("org/app", content)
	u.set("GET", blobPath("org/app", d), u.flaky(content, u.stallAfter(RelayWindow+12345), true, nil))
	e := newTestEngine(t, u, func(o *Options, lo *storage.LocalOptions) {
		o.SourceIdleTimeout = 300 * time.Millisecond
		lo.FreeSpace = func(string) (int64, error) { return 0, nil }
	})
	got, errs := e.readAll(t, d, 2)
	for i := range got {
		if errs[i] != nil || !bytes.Equal(got[i], content) {
			t.Fatalf("reader %d: %d bytes, %v", i, len(got[i]), errs[i])
		}
	}
	if n := u.count("GET", blobPath("org/app", d)); n != 2 {
		t.Fatalf("upstream GETs %d, want 2", n)
	}
}

// A SIGHUP that shortens source_idle_timeout applies to the next download:
// started with an hour, the stalled upstream below is dropped after the
// reloaded 300ms and the download resumes (an hour would outlast the test).
func TestReloadAppliesIdleTimeouts(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(90, 2<<20)
	d := u.pushBlob("org/app", content)
	u.set("GET", blobPath("org/app", d), u.flaky(content, u.stallAfter(1<<20), true, nil))
	e := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) {
		o.SourceIdleTimeout, o.PeerIdleTimeout = time.Hour, time.Hour
	})
	cfg, _ := e.config()
	cfg = cfg.Clone()
	cfg.SourceIdleTimeout, cfg.PeerIdleTimeout = config.Duration(300*time.Millisecond), config.Duration(200*time.Millisecond)
	apply, err := e.Prepare(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := e.idleTimeout(source{label: "peer"}); got != time.Hour {
		t.Fatalf("peer idle timeout before apply %v, want the hour in force", got)
	}
	apply()
	if got := e.idleTimeout(source{label: "peer"}); got != 200*time.Millisecond {
		t.Fatalf("peer idle timeout after reload %v, want 200ms", got)
	}
	got, err := e.read(t, d)
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("read %d bytes, %v", len(got), err)
	}
	if n := e.counter(e.metrics.resumes.WithLabelValues("upstream", "stall")); n != 1 {
		t.Fatalf("resumes{upstream,stall} %v, want 1", n)
	}
}

// A reload is all or nothing across berth's parts: Prepare of a
// configuration whose upstream cannot be built changes nothing, and a good
// one changes nothing until its apply.
func TestPrepareChangesNothingUntilApplied(t *testing.T) {
	u := newUpstreamFake(t)
	e := newTestEngine(t, u, nil)
	cfg, _ := e.config()
	next := cfg.Clone()
	next.Upstreams["quay.test"] = config.Upstream{URL: u.srv.URL}
	next.TagTTL = config.Duration(time.Minute)
	next.SourceIdleTimeout = config.Duration(2 * time.Second)

	bad := next.Clone()
	noPEM := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(noPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad.Upstreams["quay.test"] = config.Upstream{URL: u.srv.URL, CAFile: noPEM}
	if apply, err := e.Prepare(bad); err == nil || apply != nil || !strings.Contains(err.Error(), "upstream quay.test") {
		t.Fatalf("Prepare with an unusable CA file: apply %v, error %v", apply != nil, err)
	}
	unchanged := func(when string) {
		t.Helper()
		if _, err := e.Resolve("quay.test", "org/app"); err == nil {
			t.Errorf("%s: the new upstream is in force", when)
		}
		if got, _ := e.config(); got.TagTTL != cfg.TagTTL {
			t.Errorf("%s: tag_ttl %v in force, want %v", when, got.TagTTL, cfg.TagTTL)
		}
		if got := e.idleTimeout(source{label: "upstream"}); got != 15*time.Second {
			t.Errorf("%s: source idle timeout %v, want the 15s in force", when, got)
		}
	}
	unchanged("after a failed Prepare")

	apply, err := e.Prepare(next)
	if err != nil {
		t.Fatal(err)
	}
	unchanged("before apply")
	apply()
	if _, err := e.Resolve("quay.test", "org/app"); err != nil {
		t.Errorf("after apply: %v", err)
	}
	if got, _ := e.config(); got.TagTTL != next.TagTTL {
		t.Errorf("after apply: tag_ttl %v, want %v", got.TagTTL, next.TagTTL)
	}
	if got := e.idleTimeout(source{label: "upstream"}); got != 2*time.Second {
		t.Errorf("after apply: source idle timeout %v, want 2s", got)
	}
}

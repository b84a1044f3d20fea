package mirror

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/storage"
)

// blobKey is the cache key of a blob fetched through the default upstream.
func blobKey(d digest.Digest) storage.Key {
	return storage.Key{Upstream: config.DockerHub, Digest: d}
}

func TestBlobConcurrentClientsShareOneDownload(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	content := randomBytes(1, 1<<20)
	d := up.pushBlob("org/app", content)
	gate := make(chan struct{})
	up.set("GET", blobPath("org/app", d), up.pauseAfter(256<<10, gate, nil))

	const clients = 20
	firstBytes := make(chan struct{}, clients)
	type result struct {
		sum string
		n   int
		err error
	}
	results := make(chan result, clients)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	for range clients {
		go func() {
			req, _ := http.NewRequestWithContext(ctx, "GET", h.ts.URL+blobPath("org/app", d), nil)
			resp, err := h.ts.Client().Do(req)
			if err != nil {
				results <- result{err: err}
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != 200 {
				results <- result{err: fmt.Errorf("status %d", resp.StatusCode)}
				return
			}
			head := make([]byte, 64<<10)
			if _, err := io.ReadFull(resp.Body, head); err != nil {
				results <- result{err: err}
				return
			}
			firstBytes <- struct{}{}
			rest, err := io.ReadAll(resp.Body)
			all := append(head, rest...)
			results <- result{sum: sha(all), n: len(all), err: err}
		}()
	}
	// Every client has bytes while the upstream still holds back 3/4 of
	// the blob: berth streams what it has, it does not store and forward.
	for i := range clients {
		select {
		case <-firstBytes:
		case r := <-results:
			t.Fatalf("client failed before the download finished: %+v", r)
		case <-ctx.Done():
			t.Fatalf("only %d of %d clients got their first bytes while the upstream was mid-blob", i, clients)
		}
	}
	if n := up.count("GET", blobPath("org/app", d)); n != 1 {
		t.Fatalf("upstream saw %d GETs of the blob while %d clients waited, want 1", n, clients)
	}
	close(gate)
	for range clients {
		select {
		case r := <-results:
			if r.err != nil || r.sum != sha(content) {
				t.Fatalf("client got %d bytes sha256 %s err %v; want sha256 %s", r.n, r.sum, r.err, sha(content))
			}
		case <-ctx.Done():
			t.Fatal("clients did not finish after the upstream sent the rest")
		}
	}
	if n := up.count("GET", blobPath("org/app", d)); n != 1 {
		t.Fatalf("upstream saw %d GETs of the blob, want 1", n)
	}
	eventually(t, "blob in cache", func() bool { _, ok := h.local.HasBlob(blobKey(d)); return ok })
	wantOK(t, h.get(blobPath("org/app", d)), content)
	if n := up.count("GET", blobPath("org/app", d)); n != 1 {
		t.Fatalf("a cached blob was fetched again (%d upstream GETs)", n)
	}
}

func TestBlobDigestMismatchIsNotServedOrCached(t *testing.T) {
	up, h, content, d, path := newBlobFixture(t, 2, 300<<10)

	// One client is streaming the blob when the corruption is found at the end.
	gate := make(chan struct{})
	up.set("GET", path, up.pauseAfter(100<<10, gate, func(b []byte) { b[len(b)-10] ^= 1 }))
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", h.ts.URL+path, nil)
	resp, err := h.ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 1000)
	if _, err := io.ReadFull(resp.Body, head); err != nil {
		t.Fatalf("streaming client got no bytes: %v", err)
	}
	close(gate)
	rest, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	got := append(head, rest...)
	if err == nil && len(got) == len(content) {
		t.Fatalf("streaming client received a complete %d-byte body of corrupt content", len(got))
	}
	if bytes.Equal(got, content) {
		t.Fatal("impossible: client got the right content from a corrupt upstream")
	}

	// A client arriving afterwards gets an error, never the bad bytes.
	up.set("GET", path, corrupt())
	r := h.get(path)
	cutOrError(t, r, http.StatusServiceUnavailable, "UNAVAILABLE")
	if _, ok := h.local.HasBlob(blobKey(d)); ok {
		t.Fatal("corrupt blob was cached")
	}
	eventually(t, "temp files removed", h.tmpEmpty)
	h.wantMetric("berth_digest_mismatches_total", nil, 2)

	// Once the upstream is fixed, berth fetches again and caches.
	up.clear("GET", path)
	before := up.count("GET", path)
	wantOK(t, h.get(path), content)
	if n := up.count("GET", path) - before; n != 1 {
		t.Fatalf("after mismatches, %d upstream GETs for a good copy, want 1", n)
	}
	eventually(t, "blob in cache", func() bool { _, ok := h.local.HasBlob(blobKey(d)); return ok })
}

// An upstream that sends more or fewer bytes than it announced is as bad as
// a wrong digest.
func TestBlobWrongLengthIsNotCached(t *testing.T) {
	up, h, content, d, path := newBlobFixture(t, 3, 10<<10)
	up.set("GET", path, func(w http.ResponseWriter, r *http.Request, _ http.Handler) {
		w.Header().Set("Content-Length", strconv.Itoa(len(content)))
		w.WriteHeader(200)
		w.Write(content[:len(content)-5]) // then the connection ends
	})
	r := h.get(path)
	cutOrError(t, r, http.StatusServiceUnavailable, "UNAVAILABLE")
	if _, ok := h.local.HasBlob(blobKey(d)); ok {
		t.Fatal("truncated blob cached")
	}
	eventually(t, "temp files removed", h.tmpEmpty)
}

func TestBlobRangeAndConditionalFromCache(t *testing.T) {
	up, h, content, d, path := newBlobFixture(t, 4, 100<<10)
	wantOK(t, h.get(path), content)
	eventually(t, "blob in cache", func() bool { _, ok := h.local.HasBlob(blobKey(d)); return ok })

	r := h.get(path, "Range", "bytes=1000-1999")
	if r.StatusCode != http.StatusPartialContent || !bytes.Equal(r.body, content[1000:2000]) {
		t.Fatalf("Range on cached blob: status %d, %d bytes", r.StatusCode, len(r.body))
	}
	if cr := r.Header.Get("Content-Range"); cr != fmt.Sprintf("bytes 1000-1999/%d", len(content)) {
		t.Fatalf("Content-Range %q", cr)
	}
	r = h.get(path, "Range", "bytes=-100")
	if r.StatusCode != http.StatusPartialContent || !bytes.Equal(r.body, content[len(content)-100:]) {
		t.Fatalf("suffix Range on cached blob: status %d, %d bytes", r.StatusCode, len(r.body))
	}
	r = h.get(path, "If-None-Match", `"`+d.String()+`"`)
	if r.StatusCode != http.StatusNotModified || len(r.body) != 0 {
		t.Fatalf("If-None-Match with the ETag: status %d, %d body bytes; want 304", r.StatusCode, len(r.body))
	}
	r = h.do("HEAD", path)
	if r.StatusCode != 200 || len(r.body) != 0 || r.Header.Get("Content-Length") != strconv.Itoa(len(content)) ||
		r.Header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("HEAD cached blob: %d, %d body bytes, headers %v", r.StatusCode, len(r.body), r.Header)
	}
	if n := up.count("GET", path); n != 1 {
		t.Fatalf("upstream GETs %d, want 1", n)
	}
}

// stalledDownload is a blob whose upstream answer stops after pauseAt bytes
// until gate is closed, with a first client waiting for all of it on whole.
type stalledDownload struct {
	h       *harness
	up      *fakeUpstream
	content []byte
	d       digest.Digest
	path    string
	gate    chan struct{}
	whole   <-chan response
}

func newStalledDownload(t *testing.T, seed int64, size, pauseAt int) *stalledDownload {
	t.Helper()
	up := newFakeUpstream(t)
	s := &stalledDownload{h: newHarness(t, up), up: up, content: randomBytes(seed, size), gate: make(chan struct{})}
	s.d = up.pushBlob("org/app", s.content)
	s.path = blobPath("org/app", s.d)
	up.set("GET", s.path, up.pauseAfter(pauseAt, s.gate, nil))
	whole := make(chan response, 1)
	go func() { whole <- s.h.get(s.path) }()
	s.whole = whole
	eventually(t, "download started", func() bool { return up.count("GET", s.path) == 1 })
	return s
}

// finish lets the upstream send the rest and checks the first client got it all, fetched once.
func (s *stalledDownload) finish(t *testing.T) {
	t.Helper()
	close(s.gate)
	r, err := within(s.whole, testTimeout)
	if err != nil {
		t.Fatal("whole-blob client never finished")
	}
	wantOK(t, r, s.content)
	if n := s.up.count("GET", s.path); n != 1 {
		t.Fatalf("upstream GETs %d, want 1", n)
	}
}

func TestBlobRangeWhileDownloading(t *testing.T) {
	s := newStalledDownload(t, 5, 512<<10, 128<<10)
	// A range inside what has arrived is answered while the upstream stalls.
	r := s.h.get(s.path, "Range", "bytes=1000-1999")
	if r.StatusCode != http.StatusPartialContent || !bytes.Equal(r.body, s.content[1000:2000]) {
		t.Fatalf("Range during download: status %d, %d bytes, err %v", r.StatusCode, len(r.body), r.readErr)
	}
	if cr := r.Header.Get("Content-Range"); cr != fmt.Sprintf("bytes 1000-1999/%d", len(s.content)) {
		t.Fatalf("Content-Range %q", cr)
	}
	// A range past it waits for the bytes.
	late := make(chan response, 1)
	go func() { late <- s.h.get(s.path, "Range", "bytes=400000-400099") }()
	s.finish(t)
	r, err := within(late, testTimeout)
	if err != nil {
		t.Fatal("range past the downloaded part never answered")
	}
	if r.StatusCode != http.StatusPartialContent || !bytes.Equal(r.body, s.content[400000:400100]) {
		t.Fatalf("late Range: status %d, %d bytes, err %v", r.StatusCode, len(r.body), r.readErr)
	}
}

func TestBlobConditionalWhileDownloading(t *testing.T) {
	s := newStalledDownload(t, 6, 256<<10, 64<<10)
	r := s.h.get(s.path, "If-None-Match", `"`+s.d.String()+`"`)
	if r.StatusCode != http.StatusNotModified {
		t.Fatalf("If-None-Match during download: %d, want 304", r.StatusCode)
	}
	s.finish(t)
}

func TestBlobClientDisconnectDoesNotAbortDownload(t *testing.T) {
	up, h, content, d, path := newBlobFixture(t, 7, 1<<20)
	gate := make(chan struct{})
	up.set("GET", path, up.pauseAfter(200<<10, gate, nil))

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	req, _ := http.NewRequestWithContext(ctx, "GET", h.ts.URL+path, nil)
	resp, err := h.ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(resp.Body, make([]byte, 10<<10)); err != nil {
		t.Fatal(err)
	}
	cancel() // the client gives up mid-blob
	resp.Body.Close()
	close(gate)

	eventually(t, "blob cached after its only client left", func() bool {
		_, ok := h.local.HasBlob(blobKey(d))
		return ok
	})
	wantOK(t, h.get(path), content)
	if n := up.count("GET", path); n != 1 {
		t.Fatalf("upstream GETs %d, want 1", n)
	}
}

func TestBlobDiskFullPassesThrough(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up, func(s *setup) {
		s.local.FreeSpace = func(string) (int64, error) { return 0, nil }
	})
	content := randomBytes(8, 300<<10)
	d := up.pushBlob("org/app", content)
	path := blobPath("org/app", d)

	wantOK(t, h.get(path), content)
	if _, ok := h.local.HasBlob(blobKey(d)); ok {
		t.Fatal("blob cached on a full disk")
	}
	h.wantMetric("berth_passthrough_total", nil, 1)
	eventually(t, "no temp files", h.tmpEmpty)
	// Still no room: served again, still through.
	wantOK(t, h.get(path), content)
	h.wantMetric("berth_passthrough_total", nil, 2)
	h.wantMetric("berth_bytes_served_total", map[string]string{"source": "upstream"}, float64(2*len(content)))
	// Passthrough verifies too: corrupt content never arrives whole.
	up.set("GET", path, corrupt())
	r := h.get(path)
	cutOrError(t, r, http.StatusServiceUnavailable, "UNAVAILABLE")
}

// Registries behind some proxies stream blobs without Content-Length.
func TestBlobWithoutContentLength(t *testing.T) {
	up, h, content, d, path := newBlobFixture(t, 9, 200<<10)
	up.set("GET", path, chunked())
	var wg sync.WaitGroup
	for range 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := h.get(path)
			if r.StatusCode != 200 || r.readErr != nil || !bytes.Equal(r.body, content) {
				t.Errorf("chunked upstream: status %d, %d bytes, err %v", r.StatusCode, len(r.body), r.readErr)
			}
		}()
	}
	wg.Wait()
	if _, ok := h.local.HasBlob(blobKey(d)); !ok {
		t.Fatal("blob from a chunked answer not cached")
	}
	r := h.get(path, "Range", "bytes=10-19")
	if r.StatusCode != http.StatusPartialContent || !bytes.Equal(r.body, content[10:20]) {
		t.Fatalf("Range after chunked download: %d", r.StatusCode)
	}
}

// A download of unknown length is served from disk once it is complete;
// it still counts as one miss, its bytes as the upstream's.
func TestBlobWithoutContentLengthMetrics(t *testing.T) {
	up, h, content, _, path := newBlobFixture(t, 19, 100<<10)
	up.set("GET", path, chunked())
	wantOK(t, h.get(path), content)
	blob := func(result string) map[string]string { return map[string]string{"kind": "blob", "result": result} }
	h.wantMetric("berth_cache_lookups_total", blob("miss"), 1)
	h.wantMetric("berth_cache_lookups_total", blob("hit"), 0)
	h.wantMetric("berth_bytes_served_total", map[string]string{"source": "upstream"}, float64(len(content)))
	h.wantMetric("berth_bytes_served_total", map[string]string{"source": "local"}, 0)
	wantOK(t, h.get(path), content)
	h.wantMetric("berth_cache_lookups_total", blob("hit"), 1)
	h.wantMetric("berth_bytes_served_total", map[string]string{"source": "local"}, float64(len(content)))
}

func TestBlobHeadUncachedAsksUpstreamOnly(t *testing.T) {
	up, h, _, d, path := newBlobFixture(t, 11, 5000)
	r := h.do("HEAD", path)
	if r.StatusCode != 200 || len(r.body) != 0 || r.Header.Get("Content-Length") != "5000" || r.Header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("HEAD uncached blob: %d, headers %v", r.StatusCode, r.Header)
	}
	if up.count("GET", path) != 0 || up.count("HEAD", path) != 1 {
		t.Fatalf("HEAD made %d upstream GETs and %d HEADs, want 0 and 1", up.count("GET", path), up.count("HEAD", path))
	}
	r = h.do("HEAD", blobPath("org/app", digest.FromString("missing")))
	errorCode(t, r, http.StatusNotFound, "BLOB_UNKNOWN")
}

// Close must leave no half-written download behind.
func TestCloseDiscardsDownloadsInProgress(t *testing.T) {
	up, h, _, d, path := newBlobFixture(t, 12, 300<<10)
	up.set("GET", path, up.pauseAfter(100<<10, make(chan struct{}), nil))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "GET", h.ts.URL+path, nil)
		if resp, err := h.ts.Client().Do(req); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	eventually(t, "partial download on disk", func() bool { return !h.tmpEmpty() })
	cancel()
	done := make(chan struct{})
	go func() { h.eng.Close(); close(done) }()
	if _, err := within(done, testTimeout); err != nil {
		t.Fatal("Close did not return while a download was stalled")
	}
	if !h.tmpEmpty() {
		t.Fatal("Close left a partial download in tmp/")
	}
	if _, ok := h.local.HasBlob(blobKey(d)); ok {
		t.Fatal("partial blob cached")
	}
}

// A crash mid-download, then a restart on the same data directory with the
// upstream gone: what was committed is served, the partial blob is not.
func TestRestartServesOnlyCommittedBlobs(t *testing.T) {
	up := newFakeUpstream(t)
	h := newHarness(t, up)
	done := randomBytes(13, 100<<10)
	dDone := up.pushBlob("org/app", done)
	partial := randomBytes(14, 300<<10)
	dPartial := up.pushBlob("org/app", partial)
	wantOK(t, h.get(blobPath("org/app", dDone)), done)
	eventually(t, "blob cached", func() bool { _, ok := h.local.HasBlob(blobKey(dDone)); return ok })
	up.set("GET", blobPath("org/app", dPartial), up.pauseAfter(100<<10, make(chan struct{}), nil))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "GET", h.ts.URL+blobPath("org/app", dPartial), nil)
		if resp, err := h.ts.Client().Do(req); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	eventually(t, "partial download on disk", func() bool { return !h.tmpEmpty() })

	// The process "dies" here: nothing is closed. A new berth starts on the
	// same directory with its upstream unreachable.
	down := closedPortURL(t)
	h2 := newHarness(t, nil, func(s *setup) {
		s.root = h.root
		s.cfg.Upstreams = map[string]config.Upstream{config.DockerHub: {URL: down}}
	})
	if !h2.tmpEmpty() {
		t.Fatal("restart kept the partial download in tmp/")
	}
	if _, ok := h2.local.HasBlob(blobKey(dPartial)); ok {
		t.Fatal("partial blob visible after restart")
	}
	wantOK(t, h2.get(blobPath("org/app", dDone)), done)
	errorCode(t, h2.get(blobPath("org/app", dPartial)), http.StatusServiceUnavailable, "UNAVAILABLE")
}

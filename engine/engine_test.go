package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/storage"
)

// The token handshake of a repository is shared by every caller asking at
// once; the first caller leaving must not fail the others.
func TestHandshakeOutlivesTheFirstCaller(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(1, 4096)
	d := u.pushBlob("org/app", content)
	var tokenRequests atomic.Int32
	authed := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			tokenRequests.Add(1)
			time.Sleep(300 * time.Millisecond) // a slow token service
			fmt.Fprint(w, `{"token":"t0k3n"}`)
			return
		}
		if r.Header.Get("Authorization") != "Bearer t0k3n" {
			w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="http://%s/token",service="test"`, r.Host))
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		u.reg.ServeHTTP(w, r)
	})
	u.srv.Config.Handler = authed
	e := newTestEngine(t, u, nil)

	first, cancelFirst := context.WithCancel(context.Background())
	firstDone := make(chan error, 1)
	go func() {
		_, err := e.StatBlob(first, e.repo, d)
		firstDone <- err
	}()
	eventually(t, "the handshake to start", func() bool { return tokenRequests.Load() > 0 })
	second := make(chan error, 1)
	go func() {
		_, err := e.StatBlob(context.Background(), e.repo, d)
		second <- err
	}()
	time.Sleep(50 * time.Millisecond) // the second caller joins the handshake
	cancelFirst()
	if err := <-firstDone; !errors.Is(err, context.Canceled) {
		t.Fatalf("first caller: %v, want context.Canceled", err)
	}
	if err := <-second; err != nil {
		t.Fatalf("second caller failed with the first caller's cancellation: %v", err)
	}
}

// HEAD of a blob this host is downloading is answered from the download,
// not by asking the upstream again.
func TestStatBlobDuringDownloadAsksNoUpstream(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(2, 200<<10)
	d := u.pushBlob("org/app", content)
	gate := make(chan struct{})
	u.set("GET", blobPath("org/app", d), u.pauseAfter(10<<10, gate))
	e := newTestEngine(t, u, nil)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	b := e.open(t, ctx, d, "")
	size, err := e.StatBlob(ctx, e.repo, d)
	if err != nil || size != int64(len(content)) {
		t.Fatalf("StatBlob during download: %d, %v", size, err)
	}
	if n := u.count("HEAD", blobPath("org/app", d)); n != 0 {
		t.Fatalf("upstream HEADs %d, want 0", n)
	}
	close(gate)
	got, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("blob: %d bytes, %v", len(got), err)
	}
}

// HEAD of a blob the bucket holds is answered from the bucket.
func TestStatBlobFromTheBucket(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(3, 1000)
	d := u.pushBlob("org/app", content)
	bucket := storage.NewMemory(storage.MemoryOptions{})
	key := storage.Key{Upstream: "upstream.test", Digest: d}
	if err := bucket.PutBlob(context.Background(), key, bytes.NewReader(content), int64(len(content))); err != nil {
		t.Fatal(err)
	}
	e := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = bucket })
	size, err := e.StatBlob(context.Background(), e.repo, d)
	if err != nil || size != int64(len(content)) {
		t.Fatalf("StatBlob: %d, %v", size, err)
	}
	if n := u.count("HEAD", blobPath("org/app", d)); n != 0 {
		t.Fatalf("upstream HEADs %d, want 0", n)
	}
}

// A download of unknown length that finished before its reader looked at
// it is still served, from disk.
func TestFinishedDownloadOfUnknownSize(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(4, 4096)
	d := u.pushBlob("org/app", content)
	e := newTestEngine(t, u, nil)
	key := storage.Key{Upstream: "upstream.test", Digest: d}
	w, err := e.local.CreateBlob(key, -1)
	if err != nil {
		t.Fatal(err)
	}
	rf, err := os.Open(w.Path())
	if err != nil {
		t.Fatal(err)
	}
	w.Write(content)
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	dl := newDownload(key, time.Second)
	dl.begin(-1, "upstream", rf)
	rd := dl.newReader(context.Background())
	dl.publish(int64(len(content)))
	dl.finish(nil, nil)
	b, err := e.fromDownload(context.Background(), dl, rd)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	got, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(got, content) || b.Source != "upstream" {
		t.Fatalf("finished download of unknown size: %d bytes, %v, source %q", len(got), err, b.Source)
	}
}

// Close waits for background work: after it returns, no revalidation or
// manifest fetch is still running.
func TestCloseWaitsForBackgroundWork(t *testing.T) {
	u := newUpstreamFake(t)
	hung, entered := make(chan struct{}), make(chan struct{})
	u.set("GET", "/v2/org/app/manifests/v1", func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		select {
		case <-r.Context().Done():
		case <-u.stop:
		}
		close(hung)
	})
	e := newTestEngine(t, u, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := e.Manifest(ctx, e.repo, "v1", nil); err == nil {
		t.Fatal("manifest from a hung upstream")
	}
	// The caller gave up; the fetch it started goes on in the background.
	select {
	case <-entered:
	case <-time.After(testTimeout):
		t.Fatal("the background fetch never reached the upstream")
	}
	e.Close()
	e.bgMu.Lock()
	running := len(e.bg)
	e.bgMu.Unlock()
	if running != 0 {
		t.Fatalf("%d background calls still running after Close", running)
	}
	select {
	case <-hung:
	case <-time.After(testTimeout):
		t.Fatal("the upstream request outlived Close")
	}
}

// Per-repository transports are bounded: a daemon meeting many
// repositories keeps only the most recent ones' tokens.
func TestUpstreamTransportsAreBounded(t *testing.T) {
	u := newUpstreamFake(t)
	e := newTestEngine(t, u, nil)
	_, ups := e.config()
	up := ups["upstream.test"]
	up.transports.max = 4
	for i := range 10 {
		repo := Repo{Upstream: "upstream.test", Name: fmt.Sprintf("org/app%d", i)}
		e.StatBlob(context.Background(), repo, digest.FromString("x"))
	}
	if n := up.transports.len(); n != 4 {
		t.Fatalf("%d transports kept, want 4", n)
	}
	if _, ok := up.transports.get("org/app9"); !ok {
		t.Fatal("the most recent repository's transport was dropped")
	}
}

func TestTagListsAreBounded(t *testing.T) {
	u := newUpstreamFake(t)
	e := newTestEngine(t, u, nil)
	e.tagLists.max = 3
	for i := range 5 {
		u.pushBlob(fmt.Sprintf("org/app%d", i), []byte("x"))
		e.Tags(context.Background(), Repo{Upstream: "upstream.test", Name: fmt.Sprintf("org/app%d", i)})
	}
	if n := e.tagLists.len(); n > 3 {
		t.Fatalf("%d tag lists cached, want at most 3", n)
	}
}

// Subscribers see blobs cached and evicted, manifests stored and tags
// changing; a subscriber that does not read never slows the engine.
func TestEvents(t *testing.T) {
	u := newUpstreamFake(t)
	e := newTestEngine(t, u, func(_ *Options, lo *storage.LocalOptions) { lo.Budget = 300 << 10 })
	events, cancel := e.Subscribe(64)
	defer cancel()
	stuck, cancelStuck := e.Subscribe(1) // never read
	defer cancelStuck()
	var ds []digest.Digest
	for i := range 4 {
		content := randomBytes(int64(10+i), 100<<10)
		ds = append(ds, u.pushBlob("org/app", content))
		if got, err := e.read(t, ds[i]); err != nil || !bytes.Equal(got, content) {
			t.Fatalf("blob %d: %v", i, err)
		}
	}
	seen := map[EventKind]int{}
	deadline := time.After(testTimeout)
	for seen[BlobCached] < 4 || seen[BlobEvicted] < 1 {
		select {
		case ev := <-events:
			seen[ev.Kind]++
			if ev.Kind == BlobCached && (ev.Repo != e.repo || ev.Size != 100<<10) {
				t.Fatalf("blob event %+v", ev)
			}
		case <-deadline:
			t.Fatalf("events seen: %v", seen)
		}
	}
	if dropped := e.counter(e.metrics.eventsDropped); dropped == 0 {
		t.Fatal("the stuck subscriber's events were not counted as dropped")
	}
	_ = stuck
}

// Prefetch puts a blob on disk without a reader and pins it until its
// time: cache pressure evicts other blobs, not the pinned one.
func TestPrefetchPinsUntilItsTime(t *testing.T) {
	u := newUpstreamFake(t)
	e := newTestEngine(t, u, func(_ *Options, lo *storage.LocalOptions) { lo.Budget = 350 << 10 })
	pinned := randomBytes(20, 100<<10)
	dp := u.pushBlob("org/app", pinned)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if err := e.Prefetch(ctx, e.repo, dp, time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	key := storage.Key{Upstream: "upstream.test", Digest: dp}
	if _, ok := e.local.HasBlob(key); !ok {
		t.Fatal("prefetched blob not on disk")
	}
	for i := range 6 {
		d := u.pushBlob("org/app", randomBytes(int64(30+i), 100<<10))
		if _, err := e.read(t, d); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := e.local.HasBlob(key); !ok {
		t.Fatal("pinned blob evicted")
	}
	if _, ok := e.Pinned()[key]; !ok {
		t.Fatal("pin not listed")
	}
	eventually(t, "the pin to expire", func() bool { _, ok := e.Pinned()[key]; return !ok })
	for i := range 6 {
		d := u.pushBlob("org/app", randomBytes(int64(40+i), 100<<10))
		e.read(t, d)
	}
	if _, ok := e.local.HasBlob(key); ok {
		t.Fatal("blob still kept after its pin expired")
	}
	if n := u.count("GET", blobPath("org/app", dp)); n != 0 {
		t.Fatalf("prefetch counted %d client GETs upstream after it", n)
	}
}

// A prefetch of a blob the disk has no room for is a clear no-space error.
func TestPrefetchWithoutRoom(t *testing.T) {
	u := newUpstreamFake(t)
	e := newTestEngine(t, u, func(_ *Options, lo *storage.LocalOptions) {
		lo.FreeSpace = func(string) (int64, error) { return 0, nil }
	})
	d := u.pushBlob("org/app", randomBytes(21, 10<<10))
	err := e.Prefetch(context.Background(), e.repo, d, time.Time{})
	if KindOf(err) != KindNoSpace {
		t.Fatalf("prefetch on a full disk: %v (kind %s), want no_space", err, KindOf(err))
	}
}

// Concurrent callers of one blob on two hosts sharing a bucket: one
// upstream fetch; the other host streams from the holder or reads the bucket.
func TestFleetOneFetchForTwoHosts(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(50, 2<<20)
	d := u.pushBlob("org/app", content)
	gate := make(chan struct{})
	u.set("GET", blobPath("org/app", d), u.pauseAfter(256<<10, gate))
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: "a"})
	a := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = bucket })
	b := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = bucket.Host("b") })
	var wg sync.WaitGroup
	for _, e := range []*testEngine{a, a, b, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if got, err := e.read(t, d); err != nil || !bytes.Equal(got, content) {
				t.Errorf("read: %d bytes, %v", len(got), err)
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	close(gate)
	wg.Wait()
	if n := u.count("GET", blobPath("org/app", d)); n != 1 {
		t.Fatalf("upstream GETs %d, want 1", n)
	}
	waited := a.counter(a.fleet.leases.WithLabelValues("blob", "waited")) + b.counter(b.fleet.leases.WithLabelValues("blob", "waited"))
	taken := a.counter(a.fleet.leases.WithLabelValues("blob", "taken")) + b.counter(b.fleet.leases.WithLabelValues("blob", "taken"))
	if taken != 1 || waited != 1 {
		t.Fatalf("leases taken %v, waited %v; want 1 and 1", taken, waited)
	}
}

// A lease left by a host that died is taken over once it expires.
func TestFleetTakesOverAnExpiredLease(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(51, 64<<10)
	d := u.pushBlob("org/app", content)
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: "dead"})
	key := storage.Key{Upstream: "upstream.test", Digest: d}
	if _, err := bucket.AcquireLease(context.Background(), storage.BlobLeaseName(key), 700*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	e := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) {
		o.Bucket, o.LeaseTTL = bucket.Host("live"), time.Second
	})
	start := time.Now()
	if got, err := e.read(t, d); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("read: %v", err)
	}
	if el := time.Since(start); el < 500*time.Millisecond {
		t.Fatalf("fetched after %v, before the dead holder's lease expired", el)
	}
	if n := e.counter(e.fleet.leases.WithLabelValues("blob", "taken_over")); n != 1 {
		t.Fatalf("taken_over %v, want 1", n)
	}
	eventually(t, "the blob in the bucket", func() bool {
		_, err := bucket.StatBlob(context.Background(), key)
		return err == nil
	})
}

// fetching is a host, advertised at its peer server's URL, whose download
// of a fresh 1 MiB blob holds the blob's lease and waits for gate after
// its first bytes; hb reads that download.
type fetching struct {
	u       *upstreamFake
	content []byte
	d       digest.Digest
	gate    chan struct{}
	holder  *testEngine
	bucket  *storage.Memory
	peer    string // the holder's URL
	hb      *Blob
}

func startFetching(t *testing.T, ctx context.Context, seed int64) *fetching {
	t.Helper()
	f := &fetching{u: newUpstreamFake(t), content: randomBytes(seed, 1<<20), gate: make(chan struct{})}
	f.d = f.u.pushBlob("org/app", f.content)
	f.u.set("GET", blobPath("org/app", f.d), f.u.pauseAfter(128<<10, f.gate))
	peer := peerOf(t, &f.holder)
	f.bucket, f.peer = storage.NewMemory(storage.MemoryOptions{Holder: peer.URL}), peer.URL
	f.holder = newTestEngine(t, f.u, func(o *Options, _ *storage.LocalOptions) { o.Bucket, o.Advertise = f.bucket, peer.URL })
	hb, err := f.holder.Blob(ctx, f.holder.repo, f.d)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hb.Close() })
	f.hb = hb
	return f
}

// A host waiting on another's lease streams the blob from it when the
// holder advertises a URL.
func TestFleetStreamsFromTheLeaseHolder(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	f := startFetching(t, ctx, 52)
	waiter := newTestEngine(t, f.u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = f.bucket.Host("waiter") })
	wb := waiter.open(t, ctx, f.d, "peer")
	close(f.gate)
	got, err := io.ReadAll(wb)
	if err != nil || !bytes.Equal(got, f.content) {
		t.Fatalf("waiter read %d bytes, %v", len(got), err)
	}
	if n := f.u.count("GET", blobPath("org/app", f.d)); n != 1 {
		t.Fatalf("upstream GETs %d, want 1", n)
	}
}

// A failing bucket costs the fleet-wide dedup and nothing else; once it
// answers the health check again it is used again.
func TestFleetBucketFailureAndRecovery(t *testing.T) {
	u := newUpstreamFake(t)
	bucket := storage.NewMemory(storage.MemoryOptions{})
	e := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = bucket })
	bucket.Fail("", errors.New("bucket unreachable"))
	c1 := randomBytes(53, 10<<10)
	d1 := u.pushBlob("org/app", c1)
	if got, err := e.read(t, d1); err != nil || !bytes.Equal(got, c1) {
		t.Fatalf("read with the bucket down: %v", err)
	}
	if n := e.counter(e.fleet.degraded); n != 1 {
		t.Fatalf("degraded %v, want 1", n)
	}
	before := bucket.Requests("")
	c2 := randomBytes(54, 10<<10)
	d2 := u.pushBlob("org/app", c2)
	if _, err := e.read(t, d2); err != nil {
		t.Fatal(err)
	}
	if n := bucket.Requests(""); n != before {
		t.Fatalf("%d bucket requests while backing off, want none", n-before)
	}
	bucket.ClearFaults()
	if err := e.BucketHealth()(context.Background()); err != nil {
		t.Fatal(err)
	}
	c3 := randomBytes(55, 10<<10)
	d3 := u.pushBlob("org/app", c3)
	if _, err := e.read(t, d3); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the blob in the bucket after recovery", func() bool {
		_, err := bucket.StatBlob(context.Background(), storage.Key{Upstream: "upstream.test", Digest: d3})
		return err == nil
	})
}

// A corrupt object in the bucket is never served whole and is deleted.
func TestFleetCorruptBucketObject(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(56, 10<<10)
	d := u.pushBlob("org/app", content)
	bucket := storage.NewMemory(storage.MemoryOptions{})
	key := storage.Key{Upstream: "upstream.test", Digest: d}
	bad := bytes.Clone(content)
	bad[100] ^= 1
	bucket.CorruptBlob(key, bad)
	e := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = bucket })
	if got, err := e.read(t, d); err == nil {
		t.Fatalf("corrupt bucket object served whole (%d bytes)", len(got))
	}
	eventually(t, "the corrupt object deleted", func() bool {
		_, err := bucket.StatBlob(context.Background(), key)
		return errors.Is(err, storage.ErrNotFound)
	})
	if got, err := e.read(t, d); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("refetch: %v", err)
	}
}

// A holder that has the lease but no download yet (it took the lease over
// a moment ago) answers a waiting host 404; the waiter asks it again on
// its next poll and streams from it, instead of polling the bucket until
// the upload, so that if the holder dies too it resumes from the bytes it
// has rather than fetching the blob once more.
func TestFleetWaiterAsksAHolderNotYetDownloadingAgain(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	u := newUpstreamFake(t)
	content := randomBytes(56, 1<<20)
	d := u.pushBlob("org/app", content)
	gate := make(chan struct{})
	u.set("GET", blobPath("org/app", d), u.pauseAfter(128<<10, gate))
	var holder *testEngine
	real := peerOf(t, &holder)
	var asked atomic.Int32
	notYet := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if asked.Add(1) == 1 {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		httputil.NewSingleHostReverseProxy(mustParseURL(t, real.URL)).ServeHTTP(w, r)
	}))
	t.Cleanup(notYet.Close)
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: notYet.URL})
	holder = newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket, o.Advertise = bucket, notYet.URL })
	holder.open(t, ctx, d, "")
	view := bucket.Host("waiter")
	waiter := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = view })
	wb := waiter.open(t, ctx, d, "peer")
	if n := view.Requests("StatBlob"); n != 0 {
		t.Fatalf("waiter polled the bucket %d times, want 0: the holder was asked again first", n)
	}
	if n := asked.Load(); n != 2 {
		t.Fatalf("holder asked %d times, want 2", n)
	}
	close(gate)
	got, err := io.ReadAll(wb)
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("waiter read %d bytes, %v", len(got), err)
	}
	if n := u.count("GET", blobPath("org/app", d)); n != 1 {
		t.Fatalf("upstream GETs %d, want 1", n)
	}
}

func mustParseURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

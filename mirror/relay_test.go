package mirror

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/engine"
)

// A disk with no room: every blob has to be relayed.
func fullDisk(s *setup) { s.local.FreeSpace = func(string) (int64, error) { return 0, nil } }

// relayFixture is a berth with a full disk and an upstream holding one blob
// of size random bytes.
func relayFixture(t *testing.T, seed int64, size int, opts ...func(*setup)) (up *fakeUpstream, h *harness, content []byte, path string) {
	t.Helper()
	up = newFakeUpstream(t)
	h = newHarness(t, up, append([]func(*setup){fullDisk}, opts...)...)
	content = randomBytes(seed, size)
	return up, h, content, blobPath("org/app", up.pushBlob("org/app", content))
}

func cachedOnFullDisk(t *testing.T, h *harness, path string) {
	t.Helper()
	d, _ := digest.Parse(path[strings.LastIndex(path, "/")+1:])
	if _, ok := h.local.HasBlob(blobKey(d)); ok {
		t.Fatal("blob cached on a full disk")
	}
}

// relayClient is a GET of a blob whose body the test reads at its own pace.
type relayClient struct {
	resp *http.Response
}

func startClient(t *testing.T, h *harness, ctx context.Context, path string) *relayClient {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, "GET", h.ts.URL+path, nil)
	resp, err := h.ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return &relayClient{resp: resp}
}

// readRest reads the body to its end, prefixed with what was read already.
func (c *relayClient) readRest(head []byte) ([]byte, error) {
	rest, err := io.ReadAll(c.resp.Body)
	return append(head, rest...), err
}

func TestRelayConcurrentClientsShareOneDownload(t *testing.T) {
	up, h, content, path := relayFixture(t, 21, 3*engine.RelayWindow+12345)
	gate := make(chan struct{})
	up.set("GET", path, up.pauseAfter(8<<10, gate, nil))

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	const clients = 8
	cs := make([]*relayClient, clients)
	heads := make([][]byte, clients)
	for i := range cs {
		cs[i] = startClient(t, h, ctx, path)
		// Bytes arrive before the upstream has sent more than 8 KiB: the
		// relay streams, it does not store and forward.
		heads[i] = make([]byte, 4<<10)
		if _, err := io.ReadFull(cs[i].resp.Body, heads[i]); err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
	}
	close(gate)
	errs := make(chan error, clients)
	for i, c := range cs {
		go func() {
			got, err := c.readRest(heads[i])
			if err == nil && sha(got) != sha(content) {
				err = fmt.Errorf("body of %d bytes differs from the blob", len(got))
			}
			errs <- err
		}()
	}
	for i := range clients {
		if err := <-errs; err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
	}
	if n := up.count("GET", path); n != 1 {
		t.Fatalf("upstream GETs %d, want 1 for %d clients", n, clients)
	}
	cachedOnFullDisk(t, h, path)
	h.wantMetric("berth_passthrough_total", nil, 1)
	h.wantMetric("berth_bytes_served_total", map[string]string{"source": "upstream"}, float64(clients*len(content)))
	eventually(t, "no temp files", h.tmpEmpty)
}

// A client that joins once the window has moved past the blob's start
// gets a download of its own.
func TestRelayLateClientGetsItsOwnDownload(t *testing.T) {
	up, h, content, path := relayFixture(t, 22, 4*engine.RelayWindow)

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	first := startClient(t, h, ctx, path)
	head := make([]byte, 2*engine.RelayWindow) // the ring has wrapped
	if _, err := io.ReadFull(first.resp.Body, head); err != nil {
		t.Fatal(err)
	}
	wantOK(t, h.get(path), content) // while the first client pauses
	got, err := first.readRest(head)
	if err != nil || sha(got) != sha(content) {
		t.Fatalf("first client: %d bytes, %v", len(got), err)
	}
	if n := up.count("GET", path); n != 2 {
		t.Fatalf("upstream GETs %d, want 2", n)
	}
	h.wantMetric("berth_passthrough_total", nil, 2)
}

// A client that stops reading is dropped after relayStall; the others finish.
func TestRelayDropsAStuckClient(t *testing.T) {
	// Larger than the window plus what loopback sockets buffer for the
	// stuck client, so the relay really has to wait for it.
	up, h, content, path := relayFixture(t, 23, 48<<20, func(s *setup) { s.engine.RelayStall = time.Second })
	gate := make(chan struct{})
	up.set("GET", path, up.pauseAfter(8<<10, gate, nil))

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	stuck := startClient(t, h, ctx, path)
	if _, err := io.ReadFull(stuck.resp.Body, make([]byte, 1<<10)); err != nil {
		t.Fatal(err)
	}
	moving := startClient(t, h, ctx, path)
	close(gate)
	got, err := moving.readRest(nil)
	if err != nil || sha(got) != sha(content) {
		t.Fatalf("the reading client: %d bytes, %v", len(got), err)
	}
	// The stuck client's response was cut: never the whole blob.
	rest, err := io.ReadAll(stuck.resp.Body)
	if err == nil {
		t.Fatalf("stuck client got a complete body (%d bytes after a pause)", 1<<10+len(rest))
	}
	if n := up.count("GET", path); n != 1 {
		t.Fatalf("upstream GETs %d, want 1", n)
	}
}

// A relay waiting for a slow reader is not waiting for its source: the
// source's idle timeout does not cut it.
func TestRelayWaitingForAReaderIsNotIdle(t *testing.T) {
	up, h, content, path := relayFixture(t, 27, 24<<20, func(s *setup) { s.engine.SourceIdleTimeout = 300 * time.Millisecond })
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c := startClient(t, h, ctx, path)
	var got []byte
	buf := make([]byte, 2<<20)
	for {
		n, err := io.ReadFull(c.resp.Body, buf)
		got = append(got, buf[:n]...)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d bytes: %v", len(got), err)
		}
		time.Sleep(400 * time.Millisecond) // slower than the idle timeout
	}
	if sha(got) != sha(content) {
		t.Fatalf("slow client got %d bytes, not the blob", len(got))
	}
	if n := up.count("GET", path); n != 1 {
		t.Fatalf("upstream GETs %d, want 1", n)
	}
}

// When every client of a relay has gone there is nobody to download for:
// the upstream request ends at once.
func TestRelayStopsWhenItsClientsLeave(t *testing.T) {
	up, h, content, path := relayFixture(t, 24, 2<<20)
	upstreamGone := make(chan struct{})
	pause := up.pauseAfter(64<<10, make(chan struct{}), nil) // never resumes by itself
	up.set("GET", path, func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		defer close(upstreamGone)
		pause(w, r, next)
	})

	ctx, cancel := context.WithCancel(context.Background())
	c := startClient(t, h, ctx, path)
	if _, err := io.ReadFull(c.resp.Body, make([]byte, 16<<10)); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-upstreamGone:
	case <-time.After(testTimeout):
		t.Fatal("the upstream request outlived the relay's last client")
	}
	eventually(t, "the relay ended", func() bool {
		return h.eng.Downloads() == 0
	})
	h.wantMetric("berth_inflight_fetches", nil, 0)
	// Nothing stuck: the next request relays afresh.
	up.clear("GET", path)
	wantOK(t, h.get(path), content)
}

func TestRelayWithoutContentLength(t *testing.T) {
	up, h, content, path := relayFixture(t, 25, engine.RelayWindow+777)
	up.set("GET", path, chunked())
	wantOK(t, h.get(path), content)
	cachedOnFullDisk(t, h, path)
}

// A relay verifies like a cached download: corrupt content reaches every
// client cut short, never whole.
func TestRelayCorruptBlobIsCutForEveryClient(t *testing.T) {
	up, h, content, path := relayFixture(t, 26, 2*engine.RelayWindow)
	gate := make(chan struct{})
	up.set("GET", path, up.pauseAfter(8<<10, gate, func(b []byte) { b[len(b)-1] ^= 1 }))

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	cs := []*relayClient{startClient(t, h, ctx, path), startClient(t, h, ctx, path)}
	close(gate)
	// Both read at once: the relay moves at the pace of the slower one.
	type result struct {
		n   int
		err error
	}
	results := make(chan result, len(cs))
	for _, c := range cs {
		go func() {
			got, err := c.readRest(nil)
			results <- result{len(got), err}
		}()
	}
	for i := range cs {
		r := <-results
		if r.err == nil {
			t.Fatalf("client %d: complete body of %d bytes from corrupt content", i, r.n)
		}
		if r.n >= len(content) {
			t.Fatalf("client %d: %d bytes, the last must be held back", i, r.n)
		}
	}
	h.wantMetric("berth_digest_mismatches_total", map[string]string{"source": "upstream"}, 1)
	if n := up.count("GET", path); n != 1 {
		t.Fatalf("upstream GETs %d, want 1", n)
	}
}

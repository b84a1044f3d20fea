package engine

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/internal/testsupport"
	"github.com/berth-dev/berth/storage"
)

// A lease whose holder's berth refuses connections is taken over at once,
// not at its expiry.
func TestFailoverTakesOverAnUnreachableHolder(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(90, 64<<10)
	d := u.pushBlob("org/app", content)
	dead := "http://" + testsupport.FreeAddr(t) // nothing listens there
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: dead})
	key := storage.Key{Upstream: "upstream.test", Digest: d}
	if _, err := bucket.AcquireLease(context.Background(), storage.BlobLeaseName(key), time.Hour); err != nil {
		t.Fatal(err)
	}
	e := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = bucket.Host("live") })
	start := time.Now()
	if got, err := e.read(t, d); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("read: %v", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("took %v: waited for the dead holder's lease", el)
	}
	if n := e.counter(e.fleet.leases.WithLabelValues("blob", "taken_over")); n != 1 {
		t.Fatalf("taken_over %v, want 1", n)
	}
	eventually(t, "the blob in the bucket", func() bool {
		_, err := bucket.StatBlob(context.Background(), key)
		return err == nil
	})
}

// The host a download streams from dies mid-blob: the waiting host carries
// on from the byte it has, from the upstream under the lease it takes
// over, and its readers never see an error.
func TestFailoverWhenThePeerDiesMidStream(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(91, 4<<20)
	d := u.pushBlob("org/app", content)
	path := blobPath("org/app", d)
	gate := make(chan struct{})
	first := true
	pause := u.pauseAfter(1<<20, gate)
	u.set("GET", path, func(w http.ResponseWriter, r *http.Request) {
		if first { // the holder's fetch: stalls after 1 MiB
			first = false
			pause(w, r)
			return
		}
		u.ranged(d)(w, r)
	})
	var holder *testEngine
	peer := peerOf(t, &holder)
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: peer.URL})
	holder = newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket, o.Advertise = bucket, peer.URL })
	waiter := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = bucket.Host("waiter") })
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	holder.open(t, ctx, d, "")
	wb := waiter.open(t, ctx, d, "peer")
	head := make([]byte, 512<<10)
	if _, err := io.ReadFull(wb, head); err != nil {
		t.Fatal(err)
	}
	// The holder's berth dies: its connections drop and its port closes.
	peer.CloseClientConnections()
	peer.Close()
	rest, err := io.ReadAll(wb)
	if err != nil {
		t.Fatalf("the waiter's reader saw the peer die: %v", err)
	}
	if got := append(head, rest...); !bytes.Equal(got, content) {
		t.Fatalf("waiter read %d bytes, not the blob", len(got))
	}
	if n := waiter.counter(waiter.fleet.leases.WithLabelValues("blob", "taken_over")); n != 1 {
		t.Fatalf("the waiter took over %v leases, want 1", n)
	}
	if n := u.count("GET", path); n != 2 {
		t.Fatalf("upstream GETs %d, want 2 (the holder's, and the waiter's ranged rest)", n)
	}
	eventually(t, "the blob in the bucket", func() bool {
		_, err := bucket.StatBlob(context.Background(), storage.Key{Upstream: "upstream.test", Digest: d})
		return err == nil
	})
	close(gate)
}

// ranged answers a GET of blob d with the whole blob, honouring Range.
func (u *upstreamFake) ranged(d digest.Digest) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		rec := httptest.NewRecorder()
		whole := r.Clone(r.Context())
		whole.Header.Del("Range")
		u.reg.ServeHTTP(rec, whole)
		w.Header().Set("Docker-Content-Digest", d.String())
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(rec.Body.Bytes()))
	}
}

// A holder that goes silent, mid-blob or before its response headers,
// holding the connection open (a frozen or hung berth), is judged dead
// after PeerIdleTimeout, not after SourceIdleTimeout (an hour here) nor at
// its lease's expiry (an hour too): the waiting host takes the lease over
// and its reader gets the whole blob, verified, the rest from the upstream.
func TestFailoverWhenThePeerGoesSilent(t *testing.T) {
	for _, tc := range []struct {
		name string
		sent int // bytes the peer sends before it goes silent; -1: not even headers
	}{{"mid-blob", 1 << 20}, {"before its headers", -1}} {
		t.Run(tc.name, func(t *testing.T) {
			u := newUpstreamFake(t)
			content := randomBytes(93, 4<<20)
			d := u.pushBlob("org/app", content)
			path := blobPath("org/app", d)
			u.set("GET", path, u.ranged(d))
			stop := make(chan struct{})
			peer := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tc.sent >= 0 {
					w.Header().Set("Content-Length", strconv.Itoa(len(content)))
					w.Write(content[:tc.sent])
					w.(http.Flusher).Flush()
				}
				select {
				case <-stop:
				case <-r.Context().Done():
				}
			}))
			t.Cleanup(func() { close(stop); peer.Close() })
			bucket := storage.NewMemory(storage.MemoryOptions{Holder: peer.URL})
			key := storage.Key{Upstream: "upstream.test", Digest: d}
			if _, err := bucket.AcquireLease(context.Background(), storage.BlobLeaseName(key), time.Hour); err != nil {
				t.Fatal(err)
			}
			e := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) {
				o.Bucket = bucket.Host("live")
				o.SourceIdleTimeout, o.PeerIdleTimeout = time.Hour, 300*time.Millisecond
			})
			got, err := e.read(t, d)
			if err != nil || !bytes.Equal(got, content) {
				t.Fatalf("read %d bytes of %d: %v", len(got), len(content), err)
			}
			if n := e.counter(e.fleet.leases.WithLabelValues("blob", "taken_over")); n != 1 {
				t.Fatalf("taken_over %v, want 1", n)
			}
			if n := u.count("GET", path); n != 1 {
				t.Fatalf("upstream GETs %d, want 1", n)
			}
			stalls := e.counter(e.metrics.resumes.WithLabelValues("peer", "stall"))
			if want := map[bool]float64{true: 1, false: 0}[tc.sent > 0]; stalls != want {
				t.Fatalf("resumes after a peer stall %v, want %v", stalls, want)
			}
		})
	}
}

// peerOf serves e's PeerBlob over HTTP, as a berth's fleet port does; e is
// read when a request comes, so it may be set after the server starts.
func peerOf(t *testing.T, e **testEngine) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		dd, _ := digest.Parse(r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:])
		b, err := (*e).PeerBlob(r.Context(), storage.Key{Upstream: r.URL.Query().Get("ns"), Digest: dd})
		if err != nil {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		defer b.Close()
		w.Header().Set("Docker-Content-Digest", dd.String())
		if b.Seekable() {
			http.ServeContent(w, r, "", time.Time{}, b)
			return
		}
		io.Copy(w, b)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// When the holder dies under several hosts streaming from it, one of them
// takes the fetch over and the others stream from that one: the rest of
// the blob crosses the upstream link once more, not once per host.
func TestFailoverOneSurvivorFetchesForTheOthers(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(92, 4<<20)
	d := u.pushBlob("org/app", content)
	path := blobPath("org/app", d)
	gate := make(chan struct{})
	defer close(gate)
	var gets sync.Mutex
	first := true
	pause := u.pauseAfter(1<<20, gate)
	u.set("GET", path, func(w http.ResponseWriter, r *http.Request) {
		gets.Lock()
		holderFetch := first
		first = false
		gets.Unlock()
		if holderFetch {
			pause(w, r)
			return
		}
		u.ranged(d)(w, r)
	})
	var a, b, c *testEngine
	pa, pb, pc := peerOf(t, &a), peerOf(t, &b), peerOf(t, &c)
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: pa.URL})
	host := func(p *httptest.Server, bk storage.Bucket) *testEngine {
		return newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket, o.Advertise = bk, p.URL })
	}
	a = host(pa, bucket)
	b = host(pb, bucket.Host(pb.URL))
	c = host(pc, bucket.Host(pc.URL))
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	a.open(t, ctx, d, "")
	var readers []*Blob
	for _, e := range []*testEngine{b, c} {
		r, err := e.Blob(ctx, e.repo, d)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		if r.Source != "peer" {
			t.Fatalf("source %q, want peer", r.Source)
		}
		if _, err := io.ReadFull(r, make([]byte, 256<<10)); err != nil {
			t.Fatal(err)
		}
		readers = append(readers, r)
	}
	pa.CloseClientConnections() // the holder's berth dies
	pa.Close()
	var wg sync.WaitGroup
	for i, r := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rest, err := io.ReadAll(r)
			if err != nil || !bytes.Equal(append(content[:256<<10:256<<10], rest...), content) {
				t.Errorf("survivor %d: %d more bytes, %v", i, len(rest), err)
			}
		}()
	}
	wg.Wait()
	if n := u.count("GET", path); n != 2 {
		t.Fatalf("upstream GETs %d, want 2: the holder's, and one survivor's for the rest", n)
	}
	over := b.counter(b.fleet.leases.WithLabelValues("blob", "taken_over")) + c.counter(c.fleet.leases.WithLabelValues("blob", "taken_over"))
	if over != 1 {
		t.Fatalf("leases taken over %v, want 1", over)
	}
}

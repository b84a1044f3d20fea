package engine

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/berth-dev/berth/storage"
)

// headerTransport adds one header to every request, as auth.PeerTransport
// adds the fleet token.
type headerTransport struct {
	key, value string
	base       http.RoundTripper
}

func (h headerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set(h.key, h.value)
	return h.base.RoundTrip(r)
}

// peerWithToken is a holder's fleet port that answers peers only when they
// send want as their Authorization header, and 401 otherwise.
func peerWithToken(t *testing.T, holder **testEngine, want string) *httptest.Server {
	peer := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != want || r.Header.Get(PeerHeader) == "" {
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
			return
		}
		dd, _ := digest.Parse(r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:])
		b, err := (*holder).PeerBlob(r.Context(), storage.Key{Upstream: r.URL.Query().Get("ns"), Digest: dd})
		if err != nil {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		defer b.Close()
		w.Header().Set("Content-Length", fmt.Sprint(b.Size))
		io.Copy(w, b)
	}))
	t.Cleanup(peer.Close)
	return peer
}

// Options.PeerTransport carries the waiting host's requests to the holder:
// with the right credential the waiter streams from the peer.
func TestPeerTransportCarriesTheCredential(t *testing.T) {
	u := newUpstreamFake(t)
	content := randomBytes(61, 1<<20)
	d := u.pushBlob("org/app", content)
	gate := make(chan struct{})
	u.set("GET", blobPath("org/app", d), u.pauseAfter(128<<10, gate))
	var holder *testEngine
	peer := peerWithToken(t, &holder, "Bearer right-token-0123456789")
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: peer.URL})
	holder = newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket, o.Advertise = bucket, peer.URL })
	waiter := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) {
		o.Bucket = bucket.Host("waiter")
		o.PeerTransport = headerTransport{"Authorization", "Bearer right-token-0123456789", NewPeerTransport()}
	})
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	holder.open(t, ctx, d, "")
	wb := waiter.open(t, ctx, d, "peer")
	close(gate)
	if got, err := io.ReadAll(wb); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("waiter read %d bytes, %v", len(got), err)
	}
	if n := u.count("GET", blobPath("org/app", d)); n != 1 {
		t.Fatalf("upstream GETs %d, want 1", n)
	}
}

// A holder refusing the waiter's credential (401) is like any refusal: the
// waiter reads the blob from the bucket once the holder has uploaded it,
// never fails its caller, and logs the refusal once at warn, without the
// credential.
func TestPeerRefusingTheCredentialFallsBackToTheBucket(t *testing.T) {
	u := newUpstreamFake(t)
	c1, c2 := randomBytes(62, 1<<20), randomBytes(63, 256<<10)
	d1 := u.pushBlob("org/app", c1)
	d2 := u.pushBlob("org/app", c2)
	var holder *testEngine
	peer := peerWithToken(t, &holder, "Bearer right-token-0123456789")
	bucket := storage.NewMemory(storage.MemoryOptions{Holder: peer.URL})
	holder = newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) { o.Bucket, o.Advertise = bucket, peer.URL })
	logger, hook := logtest.NewNullLogger()
	waiter := newTestEngine(t, u, func(o *Options, _ *storage.LocalOptions) {
		o.Bucket = bucket.Host("waiter")
		o.Log = logrus.NewEntry(logger)
		o.PeerTransport = headerTransport{"Authorization", "Bearer wrong-token-0123456789", NewPeerTransport()}
	})
	for _, c := range []struct {
		d       digest.Digest
		content []byte
	}{{d1, c1}, {d2, c2}} {
		gate := make(chan struct{})
		u.set("GET", blobPath("org/app", c.d), u.pauseAfter(64<<10, gate))
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		hb, err := holder.Blob(ctx, holder.repo, c.d)
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan error, 1)
		go func() {
			b, err := waiter.read(t, c.d)
			if err == nil && !bytes.Equal(b, c.content) {
				err = fmt.Errorf("read %d bytes, not the blob", len(b))
			}
			got <- err
		}()
		// The waiter was refused by the holder and waits for its upload.
		eventually(t, "the waiter refused by the holder", func() bool {
			for _, e := range hook.AllEntries() {
				if e.Level == logrus.WarnLevel && strings.Contains(e.Message, "refused") {
					return true
				}
			}
			return false
		})
		close(gate)
		io.Copy(io.Discard, hb)
		hb.Close()
		if err := <-got; err != nil {
			t.Fatalf("waiter: %v", err)
		}
		cancel()
		if n := u.count("GET", blobPath("org/app", c.d)); n != 1 {
			t.Fatalf("upstream GETs of %s: %d, want 1", c.d, n)
		}
	}
	warns := 0
	for _, e := range hook.AllEntries() {
		line, _ := e.String()
		if strings.Contains(line, "token-0123456789") {
			t.Fatalf("a log line shows a credential: %s", line)
		}
		if e.Level == logrus.WarnLevel && strings.Contains(e.Message, "refused") {
			warns++
			if e.Data["peer"] != peer.URL || e.Data["status"] != http.StatusUnauthorized {
				t.Fatalf("refusal logged as %v", e.Data)
			}
		}
	}
	if warns != 1 {
		t.Fatalf("the refusal was logged %d times, want once", warns)
	}
}

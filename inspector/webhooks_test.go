package inspector

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/internal/testsupport"
	"github.com/berth-dev/berth/storage"
)

// receiver is a webhook endpoint that checks every request's signature
// and refuses the first `refuse` attempts of each delivery with 503.
type receiver struct {
	t      *testing.T
	secret []byte
	refuse int
	srv    *httptest.Server

	mu        sync.Mutex
	attempts  map[string]int // by Berth-Delivery
	delivered []Payload
	badSig    int
}

func newReceiver(t *testing.T, secret string, refuse int) *receiver {
	r := &receiver{t: t, secret: []byte(secret), refuse: refuse, attempts: map[string]int{}}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		r.mu.Lock()
		defer r.mu.Unlock()
		if req.Method != http.MethodPost || req.Header.Get("Content-Type") != "application/json" {
			http.Error(w, "want a JSON POST", http.StatusBadRequest)
			return
		}
		if !Verify(r.secret, body, req.Header.Get(SignatureHeader)) {
			r.badSig++
			http.Error(w, "bad signature", http.StatusUnauthorized)
			return
		}
		id := req.Header.Get("Berth-Delivery")
		r.attempts[id]++
		if r.attempts[id] <= r.refuse {
			http.Error(w, "not yet", http.StatusServiceUnavailable)
			return
		}
		var p Payload
		if err := json.Unmarshal(body, &p); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if req.Header.Get("Berth-Event") != "tag."+p.Event {
			http.Error(w, "Berth-Event does not match the body", http.StatusBadRequest)
			return
		}
		r.delivered = append(r.delivered, p)
		fmt.Fprint(w, "thanks")
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *receiver) payloads() []Payload {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Payload(nil), r.delivered...)
}

func (r *receiver) webhook(t *testing.T, events ...string) config.Webhook {
	p := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(p, append(r.secret, '\n'), 0o600); err != nil {
		t.Fatal(err)
	}
	return config.Webhook{URL: r.srv.URL + "/hook", SecretFile: p, Events: events}
}

func (h *harness) revalidate(repoName, tag string) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if _, err := h.eng.Manifest(ctx, h.repo(repoName), tag, nil); err != nil {
		h.t.Fatal(err)
	}
}

func TestWebhookSignedRetriedDelivered(t *testing.T) {
	up := inProcessRegistry(t)
	recv := newReceiver(t, "s3cr3t", 2)
	h := newHarness(t, up, harnessOptions{config: func(c *config.Config) {
		c.TagTTL = 0 // every pull revalidates
		c.Webhooks = []config.Webhook{recv.webhook(t, "changed")}
	}})
	v1d := up.push(t, "org/app:stable", build(t, dockerSpec(t)))
	h.pull("org/app", "stable") // a new tag: this webhook does not want it
	v2d := up.push(t, "org/app:stable", build(t, dockerSpec(t)))
	h.revalidate("org/app", "stable")

	eventually(t, "the delivery", func() bool { return len(recv.payloads()) == 1 })
	p := recv.payloads()[0]
	if p.Event != "changed" || p.Upstream != "registry.test" || p.Repository != "org/app" || p.Tag != "stable" ||
		p.OldDigest != v1d.String() || p.NewDigest != v2d.String() || p.ImageName != "registry.test/org/app" {
		t.Errorf("payload %+v", p)
	}
	if len(p.ChangedTags) != 1 || p.ChangedTags[0].Tag != "stable" || len(p.NewTags) != 0 || len(p.DeletedTags) != 0 || p.Text == "" || p.Time.IsZero() {
		t.Errorf("MicroBadger fields %+v", p)
	}
	eventually(t, "the delivery log", func() bool {
		ds := h.ins.Deliveries()
		return len(ds) == 1 && ds[0].State == "delivered"
	})
	d := h.ins.Deliveries()[0]
	if len(d.Attempts) != 3 || d.Attempts[0].Status != 503 || d.Attempts[1].Status != 503 || d.Attempts[2].Status != 200 || d.Attempts[2].Response != "thanks" {
		t.Errorf("attempts %+v", d.Attempts)
	}
	// Backoff: the second wait is about twice the first.
	if w1, w2 := d.Attempts[1].Time.Sub(d.Attempts[0].Time), d.Attempts[2].Time.Sub(d.Attempts[1].Time); w1 < 20*time.Millisecond || w2 < 40*time.Millisecond {
		t.Errorf("waits %v, %v: not exponential from 20ms", w1, w2)
	}
	if recv.badSig != 0 {
		t.Errorf("%d requests with a bad signature", recv.badSig)
	}
	if got := h.counter("berth_webhook_deliveries_total", "result", "delivered"); got != 1 {
		t.Errorf("berth_webhook_deliveries_total{delivered} = %v", got)
	}
	if got := h.counter("berth_webhook_attempts_total"); got != 3 {
		t.Errorf("berth_webhook_attempts_total = %v", got)
	}
	// The log survives a restart of the inspector.
	j := openJournal[Delivery](filepath.Join(h.cfg.Data, "inspect", "deliveries.jsonl"), 10)
	if got := j.list(nil); len(got) != 1 || got[0].State != "delivered" {
		t.Errorf("delivery log on disk: %+v", got)
	}
}

func TestWebhookGivesUpAfterAttempts(t *testing.T) {
	up := inProcessRegistry(t)
	recv := newReceiver(t, "k", 1000)
	h := newHarness(t, up, harnessOptions{config: func(c *config.Config) {
		c.Webhooks = []config.Webhook{recv.webhook(t)}
	}})
	up.push(t, "org/app:1", build(t, dockerSpec(t)))
	h.pull("org/app", "1")
	eventually(t, "the delivery to fail", func() bool {
		ds := h.ins.Deliveries()
		return len(ds) == 1 && ds[0].State == "failed"
	})
	if n := len(h.ins.Deliveries()[0].Attempts); n != 6 {
		t.Errorf("%d attempts, want 6", n)
	}
	if got := h.counter("berth_webhook_deliveries_total", "result", "failed"); got != 1 {
		t.Errorf("berth_webhook_deliveries_total{failed} = %v", got)
	}
}

// Three hosts on one bucket see the same tag change; the fleet delivers it once.
func TestWebhookFleetDeliversOnce(t *testing.T) {
	t.Run("Memory", func(t *testing.T) {
		b := storage.NewMemory(storage.MemoryOptions{Holder: "host-0"})
		testFleetOnce(t, func(k int) storage.Bucket { return b.Host(fmt.Sprintf("host-%d", k)) })
	})
	t.Run("MinIO", func(t *testing.T) {
		m := testsupport.StartMinIO(t)
		t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
		t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
		t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
		bucket := m.NewBucket(t)
		testFleetOnce(t, func(k int) storage.Bucket {
			s, err := storage.NewS3(context.Background(), storage.S3Options{
				Bucket: bucket, Prefix: "berth/", Region: m.Region, Endpoint: m.Endpoint, PathStyle: true,
				Credentials: m.Credentials(), Holder: fmt.Sprintf("host-%d", k),
			})
			if err != nil {
				t.Fatal(err)
			}
			return s
		})
	})
}

func testFleetOnce(t *testing.T, bucket func(k int) storage.Bucket) {
	up := inProcessRegistry(t)
	recv := newReceiver(t, "fleet-secret", 1)
	var hosts []*harness
	for k := range 3 {
		hosts = append(hosts, newHarness(t, up, harnessOptions{bucket: bucket(k), config: func(c *config.Config) {
			c.TagTTL = 0
			c.Webhooks = []config.Webhook{recv.webhook(t)}
		}}))
	}
	v1d := up.push(t, "org/app:prod", build(t, dockerSpec(t)))
	// All three at once, then each again until its own record has the
	// digest: a host that waited on another's revalidation (the fleet's tag
	// lease) learns of the change on its next look. Every host sees every
	// change.
	converge := func(want string) {
		var wg sync.WaitGroup
		for _, h := range hosts {
			wg.Add(1)
			go func() { defer wg.Done(); h.revalidate("org/app", "prod") }()
		}
		wg.Wait()
		for _, h := range hosts {
			eventually(t, "each host to see "+want, func() bool {
				if rec, err := h.local.GetTag("registry.test", "org/app", "prod"); err == nil && rec.Digest.String() == want {
					return true
				}
				h.revalidate("org/app", "prod")
				return false
			})
		}
	}
	converge(v1d.String())
	v2d := up.push(t, "org/app:prod", build(t, dockerSpec(t)))
	converge(v2d.String())
	// A host that learns the new digest from the fleet's tag record rather
	// than from its own look at the upstream publishes no change: how many
	// hosts see each change depends on that race; at least one does.
	eventually(t, "two deliveries", func() bool { return len(recv.payloads()) >= 2 })
	time.Sleep(500 * time.Millisecond) // a duplicate would have arrived by now
	got := recv.payloads()
	if len(got) != 2 {
		t.Fatalf("%d deliveries, want 2 (one new, one changed): %+v", len(got), got)
	}
	byEvent := map[string]Payload{}
	for _, p := range got {
		byEvent[p.NewDigest] = p
	}
	if byEvent[v1d.String()].Tag != "prod" || byEvent[v2d.String()].Tag != "prod" {
		t.Errorf("deliveries %+v", got)
	}
	var claimed, seen float64
	for _, h := range hosts {
		claimed += h.counter("berth_tag_events_total", "claimed", "yes")
		seen += h.counter("berth_tag_events_total")
	}
	if claimed != 2 {
		t.Errorf("%v events claimed by the fleet, want 2 (of %v seen)", claimed, seen)
	}
	t.Logf("the hosts saw the two changes %v times in all", seen)

	// Now every host sees the same event at the same moment: one delivers.
	ev := TagEvent{Type: "deleted", Upstream: "registry.test", Repository: "org/app", Tag: "prod", Old: v2d.String(), Time: time.Now().UTC()}
	var wg sync.WaitGroup
	for _, h := range hosts {
		wg.Add(1)
		go func() { defer wg.Done(); h.ins.tagEvent(ev) }()
	}
	wg.Wait()
	eventually(t, "every host to handle the deletion", func() bool {
		var n float64
		for _, h := range hosts {
			n += h.counter("berth_tag_events_total", "type", "deleted")
		}
		return n == 3
	})
	eventually(t, "the deletion's delivery", func() bool { return len(recv.payloads()) >= 3 })
	time.Sleep(500 * time.Millisecond)
	if got := recv.payloads(); len(got) != 3 || got[2].Event != "deleted" {
		t.Fatalf("three hosts seeing one deletion made %d deliveries in all, want 3: %+v", len(got), got)
	}
	var deletedClaims float64
	for _, h := range hosts {
		deletedClaims += h.counter("berth_tag_events_total", "type", "deleted", "claimed", "yes")
	}
	if deletedClaims != 1 {
		t.Errorf("%v hosts claimed the deletion, want 1", deletedClaims)
	}
}

// The watch list notices a tag that moved and one that vanished, though
// nothing pulls.
func TestWatchNoticesChangesWithoutPulls(t *testing.T) {
	up := inProcessRegistry(t)
	recv := newReceiver(t, "w", 0)
	v1d := up.push(t, "org/watched:v1", build(t, dockerSpec(t)))
	up.push(t, "org/watched:other", build(t, dockerSpec(t)))
	h := newHarness(t, up, harnessOptions{config: func(c *config.Config) {
		c.TagTTL = 0
		c.Webhooks = []config.Webhook{recv.webhook(t)}
		c.Inspector.Watch = []config.Watch{{Repository: "registry.test/org/watched", Tags: []string{"v*"}, Interval: config.Duration(50 * time.Millisecond)}}
	}})
	eventually(t, "the new tag", func() bool { return len(recv.payloads()) == 1 })
	if p := recv.payloads()[0]; p.Event != "new" || p.Tag != "v1" || p.NewDigest != v1d.String() {
		t.Fatalf("first delivery %+v", p)
	}
	v2d := up.push(t, "org/watched:v1", build(t, dockerSpec(t)))
	eventually(t, "the change", func() bool { return len(recv.payloads()) == 2 })
	if p := recv.payloads()[1]; p.Event != "changed" || p.OldDigest != v1d.String() || p.NewDigest != v2d.String() {
		t.Fatalf("second delivery %+v", p)
	}
	up.delete(t, "org/watched:v1")
	eventually(t, "the deletion", func() bool { return len(recv.payloads()) == 3 })
	p := recv.payloads()[2]
	if p.Event != "deleted" || p.OldDigest != v2d.String() || len(p.DeletedTags) != 1 || p.DeletedTags[0].Tag != "v1" {
		t.Fatalf("third delivery %+v", p)
	}
	time.Sleep(300 * time.Millisecond) // more watch rounds: nothing delivered twice
	if n := len(recv.payloads()); n != 3 {
		t.Fatalf("%d deliveries, want 3", n)
	}
	// "other" matches no pattern: never asked about.
	if _, err := h.local.GetTag("registry.test", "org/watched", "other"); err == nil {
		t.Error("the watch revalidated a tag outside its patterns")
	}
	// The tag history shows all three.
	if hist := h.ins.history.list(nil); len(hist) < 3 {
		t.Errorf("history %+v", hist)
	}
}

func TestSignVerify(t *testing.T) {
	body := []byte(`{"a":1}`)
	sig := Sign([]byte("k"), body)
	// echo -n '{"a":1}' | openssl dgst -sha256 -hmac k
	if sig != "sha256=c3a92ff9e274cdcce27a58c15a78ec6dcbbdbd0038a87e7a11baef2028fd8bff" {
		t.Fatalf("signature %q", sig)
	}
	if !Verify([]byte("k"), body, sig) || Verify([]byte("other"), body, sig) || Verify([]byte("k"), []byte(`{"a":2}`), sig) {
		t.Fatal("Verify accepts what it must refuse, or refuses the right signature")
	}
}

// A reload swaps the webhooks and the watch list in a running inspector,
// and only once applied: the next event goes to the new webhook only, a
// newly watched repository is revalidated without a pull, a secret file
// that cannot be read rejects the reload, and an unwatched repository
// leaves the scaler feed.
func TestReloadWebhooksAndWatch(t *testing.T) {
	up := inProcessRegistry(t)
	before, after := newReceiver(t, "a", 0), newReceiver(t, "b", 0)
	v1 := up.push(t, "org/later:v1", build(t, dockerSpec(t)))
	h := newHarness(t, up, harnessOptions{config: func(c *config.Config) {
		c.TagTTL = 0
		c.Webhooks = []config.Webhook{before.webhook(t)}
	}})

	next := *h.cfg
	next.Webhooks = []config.Webhook{after.webhook(t)}
	next.Inspector.Watch = []config.Watch{{Repository: "registry.test/org/later", Tags: []string{"v*"}, Interval: config.Duration(50 * time.Millisecond)}}
	apply, err := h.ins.Prepare(&next)
	if err != nil {
		t.Fatal(err)
	}
	if hooks := h.ins.Webhooks(); len(hooks) != 1 || hooks[0]["url"] != before.srv.URL+"/hook" {
		t.Errorf("webhooks in force before apply: %v", hooks)
	}
	if f := h.ins.Feed(); len(f.Images) != 0 {
		t.Errorf("the watch list changed before apply: %+v", f.Images)
	}
	apply()
	eventually(t, "the watched tag delivered to the new webhook", func() bool { return len(after.payloads()) == 1 })
	if p := after.payloads()[0]; p.Event != "new" || p.Tag != "v1" || p.NewDigest != v1.String() {
		t.Errorf("delivery %+v", p)
	}
	eventually(t, "the delivery logged", func() bool {
		for _, d := range h.ins.Deliveries() {
			if d.State == "delivered" {
				return true
			}
		}
		return false
	})
	for _, d := range h.ins.Deliveries() {
		if d.URL != after.srv.URL+"/hook" {
			t.Errorf("delivery to %s after the reload", d.URL)
		}
	}
	if n := len(before.payloads()); n != 0 {
		t.Errorf("the removed webhook got %d deliveries", n)
	}
	if f := h.ins.Feed(); len(f.Images) != 1 || !f.Images[0].Watched {
		t.Errorf("feed while watched: %+v", f.Images)
	}

	bad := next
	bad.Webhooks = []config.Webhook{{URL: before.srv.URL + "/hook", SecretFile: filepath.Join(t.TempDir(), "gone")}}
	bad.Inspector.Watch = nil
	if apply, err := h.ins.Prepare(&bad); err == nil || apply != nil {
		t.Fatal("a reload with an unreadable secret file was taken")
	}
	if hooks := h.ins.Webhooks(); len(hooks) != 1 || hooks[0]["url"] != after.srv.URL+"/hook" {
		t.Errorf("webhooks after a rejected reload: %v", hooks)
	}
	if f := h.ins.Feed(); len(f.Images) != 1 {
		t.Errorf("a rejected reload changed the watch list: %+v", f.Images)
	}

	unwatched := next
	unwatched.Inspector.Watch = nil
	if apply, err = h.ins.Prepare(&unwatched); err != nil {
		t.Fatal(err)
	}
	apply()
	if f := h.ins.Feed(); len(f.Images) != 0 {
		t.Errorf("feed after unwatching: %+v", f.Images)
	}
}

package inspector

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/engine"
)

// TagEvent is a tag that appeared, moved to another digest, or vanished.
type TagEvent struct {
	Type       string    `json:"type"` // new, changed, deleted
	Upstream   string    `json:"upstream"`
	Repository string    `json:"repository"`
	Tag        string    `json:"tag"`
	Old        string    `json:"old_digest,omitempty"`
	New        string    `json:"new_digest,omitempty"`
	Time       time.Time `json:"time"`
}

// Payload is a webhook's JSON body: MicroBadger's fields, then berth's.
type Payload struct {
	Text        string   `json:"text"`
	ImageName   string   `json:"image_name"`
	NewTags     []TagRef `json:"new_tags"`
	ChangedTags []TagRef `json:"changed_tags"`
	DeletedTags []TagRef `json:"deleted_tags"`

	Event      string    `json:"event"` // new, changed, deleted
	Upstream   string    `json:"upstream"`
	Repository string    `json:"repository"`
	Tag        string    `json:"tag"`
	OldDigest  string    `json:"old_digest,omitempty"`
	NewDigest  string    `json:"new_digest,omitempty"`
	Time       time.Time `json:"time"`
}

// TagRef is a tag in MicroBadger's lists.
type TagRef struct {
	Tag string `json:"tag"`
}

// SignatureHeader carries sha256=<hex HMAC-SHA256 of the body>.
const SignatureHeader = "Berth-Signature"

// Sign is the value of SignatureHeader for body under secret.
func Sign(secret, body []byte) string {
	m := hmac.New(sha256.New, secret)
	m.Write(body)
	return "sha256=" + hex.EncodeToString(m.Sum(nil))
}

// Verify checks a SignatureHeader value in constant time.
func Verify(secret, body []byte, header string) bool {
	return hmac.Equal([]byte(header), []byte(Sign(secret, body)))
}

// HTTPDoer sends webhooks; *http.Client is one.
type HTTPDoer interface {
	Do(*http.Request) (*http.Response, error)
}

func defaultClient() *http.Client { return &http.Client{Timeout: 10 * time.Second} }

// Delivery is one event sent to one webhook, with every attempt.
type Delivery struct {
	ID       string    `json:"id"`
	URL      string    `json:"url"`
	Event    TagEvent  `json:"event"`
	State    string    `json:"state"` // pending, delivered, failed
	Attempts []Attempt `json:"attempts"`
	Updated  time.Time `json:"updated"`
}

// Attempt is one HTTP request of a delivery.
type Attempt struct {
	Time     time.Time `json:"time"`
	Status   int       `json:"status"` // 0: no answer
	Error    string    `json:"error,omitempty"`
	Response string    `json:"response,omitempty"` // the first 256 bytes of the answer
	Duration float64   `json:"duration_seconds"`
}

type hook struct {
	config.Webhook
	secret []byte
}

type webhooks struct {
	i   *Inspector
	log *journal[Delivery] // finished deliveries

	mu      sync.Mutex
	hooks   []hook // replaced whole on reload
	pending map[string]*Delivery
}

func newWebhooks(i *Inspector, cfg []config.Webhook, logPath string) (*webhooks, error) {
	hooks, err := readHooks(cfg)
	if err != nil {
		return nil, err
	}
	return &webhooks{i: i, log: openJournal[Delivery](logPath, 1000), hooks: hooks, pending: map[string]*Delivery{}}, nil
}

// readHooks reads the webhooks' secret files.
func readHooks(cfg []config.Webhook) ([]hook, error) {
	var hooks []hook
	for k, c := range cfg {
		h := hook{Webhook: c}
		if c.SecretFile != "" {
			b, err := os.ReadFile(c.SecretFile)
			if err != nil {
				return nil, fmt.Errorf("webhooks[%d].secret_file: %w", k, err)
			}
			h.secret = bytes.TrimSpace(b)
		}
		hooks = append(hooks, h)
	}
	return hooks, nil
}

// list returns the webhooks in force.
func (w *webhooks) list() []hook {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.hooks
}

// set replaces the webhooks; deliveries in progress go on to their old
// webhook.
func (w *webhooks) set(hooks []hook) {
	w.mu.Lock()
	w.hooks = hooks
	w.mu.Unlock()
}

func (h hook) wants(ev TagEvent) bool {
	if len(h.Events) > 0 && !slices.Contains(h.Events, ev.Type) {
		return false
	}
	if len(h.Repositories) == 0 {
		return true
	}
	for _, p := range h.Repositories {
		if ok, _ := path.Match(p, ev.Upstream+"/"+ev.Repository); ok {
			return true
		}
	}
	return false
}

// tagEvent records a tag event in the history and, when a webhook wants
// it, claims it for the fleet and delivers it. Claiming and delivering run
// on goroutines of their own: the event loop never waits on the network.
func (i *Inspector) tagEvent(ev TagEvent) {
	i.history.add(ev)
	var hooks []hook
	for _, h := range i.hooks.list() {
		if h.wants(ev) {
			hooks = append(hooks, h)
		}
	}
	if len(hooks) == 0 {
		return
	}
	i.goLife(func() {
		claimed, err := i.claim(ev)
		if err != nil {
			i.log.WithError(err).WithField("tag", ev.Upstream+"/"+ev.Repository+":"+ev.Tag).Warn("could not record the tag event for the fleet; not delivering it")
			return
		}
		i.metrics.events.WithLabelValues(ev.Type, map[bool]string{true: "yes", false: "no"}[claimed]).Inc()
		if !claimed {
			return // another host (or this one, earlier) delivers it
		}
		var wg sync.WaitGroup
		for _, h := range hooks {
			wg.Add(1)
			go func() {
				defer wg.Done()
				i.hooks.deliver(i.life, h, ev)
			}()
		}
		wg.Wait()
	})
}

// claim records the event once for the fleet: a conditional write in the
// bucket keyed by (upstream, repository, tag, new digest), or for a
// deletion the digest the tag had; without a bucket, a file on this host.
// Exactly one claimant gets true.
func (i *Inspector) claim(ev TagEvent) (bool, error) {
	d := ev.New
	kind := "to"
	if ev.Type == "deleted" {
		d, kind = ev.Old, "deleted"
	}
	pd, err := digest.Parse(d)
	if err != nil {
		return false, fmt.Errorf("event digest %q: %v", d, err)
	}
	name := fmt.Sprintf("events/%s/%s/_tag/%s/%s/%s/%s", ev.Upstream, ev.Repository, ev.Tag, kind, pd.Algorithm(), pd.Encoded())
	body, _ := json.Marshal(ev)
	if i.objects != nil {
		ctx, cancel := context.WithTimeout(i.life, 30*time.Second)
		defer cancel()
		return i.objects.CreateObject(ctx, name, body)
	}
	return claimLocal(filepath.Join(i.store.dir, filepath.FromSlash(name)))
}

func payload(ev TagEvent) Payload {
	p := Payload{
		ImageName: imageName(ev.Upstream, ev.Repository), NewTags: []TagRef{}, ChangedTags: []TagRef{}, DeletedTags: []TagRef{},
		Event: ev.Type, Upstream: ev.Upstream, Repository: ev.Repository, Tag: ev.Tag, OldDigest: ev.Old, NewDigest: ev.New, Time: ev.Time,
	}
	ref := ev.Upstream + "/" + ev.Repository + ":" + ev.Tag
	switch ev.Type {
	case "new":
		p.NewTags = append(p.NewTags, TagRef{ev.Tag})
		p.Text = fmt.Sprintf("berth: new tag %s (%s)", ref, ev.New)
	case "changed":
		p.ChangedTags = append(p.ChangedTags, TagRef{ev.Tag})
		p.Text = fmt.Sprintf("berth: %s changed from %s to %s", ref, ev.Old, ev.New)
	case "deleted":
		p.DeletedTags = append(p.DeletedTags, TagRef{ev.Tag})
		p.Text = fmt.Sprintf("berth: %s was deleted (it was %s)", ref, ev.Old)
	}
	return p
}

// imageName is MicroBadger's image name: namespace/image on Docker Hub,
// registry/namespace/image elsewhere.
func imageName(upstream, repo string) string {
	if upstream == config.DockerHub {
		return repo
	}
	return upstream + "/" + repo
}

// deliver POSTs the event to one webhook, retrying with exponential
// backoff until it answers 2xx or every attempt is spent.
func (w *webhooks) deliver(ctx context.Context, h hook, ev TagEvent) {
	body, _ := json.Marshal(payload(ev))
	id := make([]byte, 8)
	_, _ = rand.Read(id)
	d := &Delivery{ID: hex.EncodeToString(id), URL: h.URL, Event: ev, State: "pending", Attempts: []Attempt{}, Updated: time.Now().UTC()}
	w.mu.Lock()
	w.pending[d.ID] = d
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		delete(w.pending, d.ID)
		w.mu.Unlock()
		w.log.add(*d)
		w.i.metrics.deliveries.WithLabelValues(d.State).Inc()
		w.i.log.WithFields(map[string]any{"url": h.URL, "event": ev.Type, "tag": ev.Upstream + "/" + ev.Repository + ":" + ev.Tag,
			"state": d.State, "attempts": len(d.Attempts)}).Info("webhook delivery")
	}()
	delay := w.i.o.RetryBase
	for n := range w.i.o.Attempts {
		if n > 0 {
			select {
			case <-ctx.Done():
				w.update(d, func() { d.State = "failed" })
				return
			case <-time.After(delay):
			}
			delay *= 2
		}
		a := w.attempt(ctx, h, d.ID, ev, body)
		w.update(d, func() {
			d.Attempts = append(d.Attempts, a)
			if a.Status >= 200 && a.Status < 300 {
				d.State = "delivered"
			}
		})
		if d.State == "delivered" {
			return
		}
	}
	w.update(d, func() { d.State = "failed" })
}

func (w *webhooks) update(d *Delivery, fn func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	fn()
	d.Updated = time.Now().UTC()
}

func (w *webhooks) attempt(ctx context.Context, h hook, id string, ev TagEvent, body []byte) Attempt {
	w.i.metrics.attempts.Inc()
	start := time.Now()
	a := Attempt{Time: start.UTC()}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.URL, bytes.NewReader(body))
	if err != nil {
		a.Error = err.Error()
		return a
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "berth-webhook")
	req.Header.Set("Berth-Event", "tag."+ev.Type)
	req.Header.Set("Berth-Delivery", id)
	if len(h.secret) > 0 {
		req.Header.Set(SignatureHeader, Sign(h.secret, body))
	}
	resp, err := w.i.o.Client.Do(req)
	a.Duration = time.Since(start).Seconds()
	if err != nil {
		a.Error = err.Error()
		return a
	}
	defer resp.Body.Close()
	a.Status = resp.StatusCode
	excerpt, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
	a.Response = strings.ToValidUTF8(string(excerpt), "?")
	return a
}

// Deliveries lists the webhook deliveries, in progress first, then the
// finished ones newest first.
func (i *Inspector) Deliveries() []Delivery {
	w := i.hooks
	w.mu.Lock()
	out := []Delivery{}
	for _, d := range w.pending {
		c := *d
		c.Attempts = slices.Clone(d.Attempts)
		out = append(out, c)
	}
	w.mu.Unlock()
	slices.SortFunc(out, func(a, b Delivery) int { return b.Updated.Compare(a.Updated) })
	return append(out, w.log.list(nil)...)
}

// Webhooks lists the configured webhooks' URLs and filters, never secrets.
func (i *Inspector) Webhooks() []map[string]any {
	out := []map[string]any{}
	for _, h := range i.hooks.list() {
		out = append(out, map[string]any{"url": h.URL, "events": h.Events, "repositories": h.Repositories, "signed": len(h.secret) > 0})
	}
	return out
}

// watch revalidates a watched repository's tags at its interval: tags that
// moved publish TagChanged through the engine; tags that vanished from the
// upstream are reported deleted here.
func (i *Inspector) watch(ctx context.Context, w config.Watch) {
	host, name, _ := strings.Cut(w.Repository, "/")
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		i.watchOnce(ctx, host, name, w.Tags)
		t.Reset(w.Interval.D())
	}
}

func (i *Inspector) watchOnce(ctx context.Context, host, name string, patterns []string) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	repo, err := i.eng.Resolve(host, name)
	if err != nil {
		i.log.WithError(err).WithField("repository", host+"/"+name).Warn("watch: cannot resolve")
		return
	}
	upstream, err := i.eng.Tags(ctx, repo)
	if err != nil {
		i.log.WithError(err).WithField("repository", repo.String()).Warn("watch: cannot list tags")
		return
	}
	for _, tag := range matching(upstream, patterns) {
		_, err := i.eng.Manifest(ctx, repo, tag, nil)
		if err != nil && engine.KindOf(err) == engine.KindNotFound {
			i.deleted(repo, tag)
		} else if err != nil {
			i.log.WithError(err).WithField("tag", repo.String()+":"+tag).Debug("watch: revalidation failed")
		}
	}
	// Tags berth knows that the upstream no longer lists.
	known, _ := i.local.Tags(repo.Upstream, repo.Name)
	for _, tag := range matching(known, patterns) {
		if !slices.Contains(upstream, tag) {
			i.deleted(repo, tag)
		}
	}
}

func (i *Inspector) deleted(repo engine.Repo, tag string) {
	rec, err := i.local.GetTag(repo.Upstream, repo.Name, tag)
	if err != nil {
		return // never seen here: nothing to report
	}
	// Once per tag and digest on this host; claim makes it once per fleet.
	marker := filepath.Join(i.store.dir, "deleted", repo.Upstream, filepath.FromSlash(repo.Name), tag, rec.Digest.Encoded())
	if first, err := claimLocal(marker); err != nil || !first {
		return
	}
	i.tagEvent(TagEvent{Type: "deleted", Upstream: repo.Upstream, Repository: repo.Name, Tag: tag, Old: rec.Digest.String(), Time: time.Now().UTC()})
}

func matching(tags, patterns []string) []string {
	var out []string
	for _, t := range tags {
		for _, p := range patterns {
			if ok, _ := path.Match(p, t); ok {
				out = append(out, t)
				break
			}
		}
	}
	return out
}

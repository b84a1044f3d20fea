// Package inspector is berth's embedded image inspector. It learns of every
// manifest berth stores from the engine's events and inspects each digest
// once, in the background, from a bounded queue that never slows a pull:
// platforms, labels and OCI annotations, layers and the commands that made
// them, a reconstructed Dockerfile, sizes. It serves what it learnt as JSON
// (under /berth/v1/, and MicroBadger's /v1/images/), as pages (/ui/), as
// tag-change webhooks and as a feed for autoscalers. docs/inspector.md
// describes it.
//
// Inspection in the background reads only what this host already has: a
// manifest it stored and, once a client's pull has cached it, the image's
// configuration blob; it never makes the upstream send a byte a pull did
// not ask for. With a bucket, the host that fetched a manifest from the
// upstream inspects it and writes the record to the bucket; a host that
// read the manifest from the bucket leaves it to that host and reads the
// fleet's record only when asked for it. A caller of the API asking for an
// image not yet inspected has it inspected at once, reading through the
// cache.
package inspector

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"reflect"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	"golang.org/x/sync/singleflight"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/healthcheck"
	"github.com/berth-dev/berth/storage"
)

// Options builds an Inspector.
type Options struct {
	Engine  *engine.Engine
	Local   *storage.Local
	Bucket  storage.Bucket // nil: no fleet tier; results and events stay on this host
	Config  *config.Config // inspector.*, webhooks, data
	Metrics prometheus.Registerer
	Log     *logrus.Entry
	Health  *healthcheck.Checker // for the node page; nil: not shown

	// Workers inspect in parallel; default 2.
	Workers int
	// RetryBase is the first webhook retry's delay, doubling for each
	// next one; default 1s.
	RetryBase time.Duration
	// Attempts is how many times a webhook delivery is tried; default 6.
	Attempts int
	// Client sends webhooks; default a client with a 10s timeout.
	Client HTTPDoer
	// PrewarmQueue, when set, reports pre-warm's queue for the scaler feed
	// (prewarm_queue, and the gauge berth_prewarm_queue); nil: neither.
	PrewarmQueue func() int
}

// maxWaiting bounds the manifests waiting for their config to be cached.
const maxWaiting = 4096

// Inspector inspects manifests in the background and serves the results.
type Inspector struct {
	o     Options
	eng   *engine.Engine
	local *storage.Local
	// cfg is the configuration in force: a reload replaces it (webhooks,
	// the watch list, show_env_names).
	cfg     atomic.Pointer[config.Config]
	log     *logrus.Entry
	store   *store
	objects storage.Objects
	metrics *metrics

	queue  chan job
	flight singleflight.Group

	mu      sync.Mutex
	queued  map[storage.Key]bool      // in the queue, being inspected, or waiting for their config
	waiting map[storage.Key][]job     // by config blob: manifests whose config no pull has cached yet
	missed  map[storage.Key]time.Time // records the bucket lacked, and when it was asked

	stopWatching context.CancelFunc // ends the watch list's goroutines

	history *journal[TagEvent]
	hooks   *webhooks
	scaler  *scaler

	life   context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	unsub  func()
}

type job struct {
	repo   engine.Repo
	digest digest.Digest
	// fleet: the manifest came from the bucket, so the host that fetched
	// it from the upstream inspects it for the fleet.
	fleet bool
}

// New builds an inspector; Start runs it.
func New(o Options) (*Inspector, error) {
	if o.Engine == nil || o.Local == nil || o.Config == nil {
		return nil, errors.New("inspector: Engine, Local and Config are required")
	}
	if o.Log == nil {
		l := logrus.New()
		l.Out = io.Discard
		o.Log = logrus.NewEntry(l)
	}
	if o.Metrics == nil {
		o.Metrics = prometheus.NewRegistry()
	}
	if o.Workers <= 0 {
		o.Workers = 2
	}
	if o.RetryBase <= 0 {
		o.RetryBase = time.Second
	}
	if o.Attempts <= 0 {
		o.Attempts = 6
	}
	if o.Client == nil {
		o.Client = defaultClient()
	}
	dir := filepath.Join(o.Config.Data, "inspect")
	i := &Inspector{
		o: o, eng: o.Engine, local: o.Local, log: o.Log.WithField("component", "inspector"),
		store:   &store{dir: dir},
		queue:   make(chan job, max(o.Config.Inspector.Queue, 1)),
		queued:  map[storage.Key]bool{},
		waiting: map[storage.Key][]job{},
		missed:  map[storage.Key]time.Time{},
		history: openJournal[TagEvent](filepath.Join(dir, "tags.jsonl"), 2000),
	}
	if objs, ok := o.Bucket.(storage.Objects); ok && o.Bucket != nil {
		i.objects = objs
		i.store.objects = objs
	}
	i.cfg.Store(o.Config)
	i.life, i.cancel = context.WithCancel(context.Background())
	i.metrics = newMetrics(o.Metrics, i)
	var err error
	if i.hooks, err = newWebhooks(i, o.Config.Webhooks, filepath.Join(dir, "deliveries.jsonl")); err != nil {
		return nil, err
	}
	i.scaler = newScaler(i)
	return i, nil
}

// Start subscribes to the engine's events and runs the workers, the watch
// list and the scaler feed until Close.
func (i *Inspector) Start() {
	events, cancel := i.eng.Subscribe(1024)
	i.unsub = cancel
	i.goLife(func() { i.loop(events) })
	for range i.o.Workers {
		i.goLife(i.work)
	}
	i.mu.Lock()
	i.startWatching(i.cfg.Load().Inspector.Watch)
	i.mu.Unlock()
	i.goLife(i.scaler.run)
}

// startWatching runs one goroutine per watched repository until the next
// reload or Close; i.mu is held.
func (i *Inspector) startWatching(watch []config.Watch) {
	ctx, cancel := context.WithCancel(i.life)
	i.stopWatching = cancel
	for _, w := range watch {
		i.goLife(func() { i.watch(ctx, w) })
	}
}

// Prepare reads what cfg's webhooks need (their secret files) and returns
// the func that takes the webhooks, the watch list and show_env_names of
// cfg (SIGHUP): new webhooks get the next events, removed ones none
// (deliveries in progress finish); watched repositories are revalidated
// from then on, from the start of their interval, and those removed no
// more. A secret file that cannot be read is an error and changes nothing;
// nor does anything change until apply, so a reload can still be given up
// when another part of it fails.
func (i *Inspector) Prepare(cfg *config.Config) (apply func(), err error) {
	hooks, err := readHooks(cfg.Webhooks)
	if err != nil {
		return nil, err
	}
	return func() { i.apply(cfg, hooks) }, nil
}

func (i *Inspector) apply(cfg *config.Config, hooks []hook) {
	old := i.cfg.Swap(cfg)
	i.hooks.set(hooks)
	if reflect.DeepEqual(old.Inspector.Watch, cfg.Inspector.Watch) {
		return
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.stopWatching == nil {
		return // not started
	}
	i.stopWatching()
	i.startWatching(cfg.Inspector.Watch)
}

// Close stops the inspector and waits for its goroutines; deliveries in
// progress are abandoned (their log says so).
func (i *Inspector) Close() {
	if i.unsub != nil {
		i.unsub()
	}
	i.cancel()
	i.wg.Wait()
}

func (i *Inspector) goLife(fn func()) {
	i.wg.Add(1)
	go func() {
		defer i.wg.Done()
		fn()
	}()
}

// loop takes the engine's events: it never blocks on anything slow, so the
// engine's buffer never fills because of it.
func (i *Inspector) loop(events <-chan engine.Event) {
	for {
		select {
		case <-i.life.Done():
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			switch ev.Kind {
			case engine.ManifestStored:
				i.enqueue(job{repo: ev.Repo, digest: ev.Digest, fleet: ev.FromBucket && i.objects != nil})
			case engine.BlobCached:
				i.scaler.cached(ev.Size)
				i.configCached(storage.Key{Upstream: ev.Repo.Upstream, Digest: ev.Digest})
			case engine.TagChanged:
				kind := "changed"
				if ev.Old == "" {
					kind = "new"
				}
				i.tagEvent(TagEvent{Type: kind, Upstream: ev.Repo.Upstream, Repository: ev.Repo.Name, Tag: ev.Tag,
					Old: ev.Old.String(), New: ev.Digest.String(), Time: ev.Time.UTC()})
			}
		}
	}
}

// enqueue adds a manifest to the queue unless it is inspected already or
// queued; when the queue is full it is dropped and counted.
func (i *Inspector) enqueue(j job) {
	key := storage.Key{Upstream: j.repo.Upstream, Digest: j.digest}
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.queued[key] {
		return
	}
	if _, ok := i.store.get(key.Upstream, key.Digest); ok {
		return
	}
	select {
	case i.queue <- j:
		i.queued[key] = true
	default:
		i.metrics.dropped.Inc()
	}
}

// configCached requeues the manifests that waited for this blob.
func (i *Inspector) configCached(blob storage.Key) {
	i.mu.Lock()
	defer i.mu.Unlock()
	jobs, ok := i.waiting[blob]
	if !ok {
		return
	}
	delete(i.waiting, blob)
	for _, j := range jobs {
		select {
		case i.queue <- j:
		default:
			delete(i.queued, storage.Key{Upstream: j.repo.Upstream, Digest: j.digest})
			i.metrics.dropped.Inc()
		}
	}
}

func (i *Inspector) work() {
	for {
		select {
		case <-i.life.Done():
			return
		case j := <-i.queue:
			i.background(j)
		}
	}
}

// errWaiting: the config is not on this host yet; the manifest waits for it.
var errWaiting = errors.New("waiting for the config blob to be cached")

func (i *Inspector) background(j job) {
	key := storage.Key{Upstream: j.repo.Upstream, Digest: j.digest}
	if j.fleet {
		i.leaveToFleet(j)
		i.mu.Lock()
		delete(i.queued, key)
		i.mu.Unlock()
		return
	}
	_, err := i.inspect(i.life, j.repo, j.digest, false, &j)
	if errors.Is(err, errWaiting) {
		return // still queued: configCached requeues it
	}
	i.mu.Lock()
	delete(i.queued, key)
	i.mu.Unlock()
	if err != nil && i.life.Err() == nil {
		i.log.WithError(err).WithField("digest", j.digest).Debug("inspection failed")
	}
}

// Inspect returns the record of manifest d of repo, inspecting it now if
// no host has: reading the manifest and config through the cache (from the
// upstream if need be). For an index its platforms are inspected too.
func (i *Inspector) Inspect(ctx context.Context, repo engine.Repo, d digest.Digest) (*Record, error) {
	rec, err := i.inspect(ctx, repo, d, true, nil)
	if err != nil || rec.Kind != KindIndex || rec.Index == nil {
		return rec, err
	}
	for _, p := range rec.Index.Platforms {
		pd, err := digest.Parse(p.Digest)
		if err != nil {
			continue
		}
		if _, err := i.inspect(ctx, repo, pd, true, nil); err != nil && ctx.Err() != nil {
			return rec, ctx.Err()
		}
	}
	return rec, nil
}

// inspect returns the record of one manifest: from this host's disk, the
// bucket, or by inspecting it. fetch allows reading through the engine
// (which may ask the upstream); without it only what this host has is
// read, and a missing config parks bg (when given) until it is cached.
func (i *Inspector) inspect(ctx context.Context, repo engine.Repo, d digest.Digest, fetch bool, bg *job) (*Record, error) {
	if rec, ok := i.store.get(repo.Upstream, d); ok {
		return rec, nil
	}
	// Background and asked-for inspections share no flight: a background
	// one may end waiting for a config that an asked-for one fetches.
	key := fmt.Sprintf("%s@%s fetch=%v", repo.Upstream, d, fetch)
	v, err, _ := i.flight.Do(key, func() (any, error) {
		if rec, ok := i.store.get(repo.Upstream, d); ok {
			return rec, nil
		}
		// In the background this host fetched the manifest from the
		// upstream (see leaveToFleet), so the bucket is unlikely to hold
		// its record: no GET first; the conditional write in inspectNow
		// finds out. An inspection asked for reads the bucket first.
		if fetch {
			if rec, ok := i.fromFleet(ctx, repo.Upstream, d, true); ok {
				return rec, nil
			}
		}
		return i.inspectNow(ctx, repo, d, fetch, bg)
	})
	if err != nil {
		return nil, err
	}
	return v.(*Record), nil
}

func (i *Inspector) inspectNow(ctx context.Context, repo engine.Repo, d digest.Digest, fetch bool, bg *job) (*Record, error) {
	start := time.Now()
	var content []byte
	var mediaType string
	if fetch {
		m, err := i.eng.Manifest(ctx, repo, d.String(), nil)
		if err != nil {
			return nil, err
		}
		content, mediaType = m.Content, m.MediaType
	} else {
		m, err := i.local.GetManifest(storage.Key{Upstream: repo.Upstream, Digest: d})
		if err != nil {
			return nil, fmt.Errorf("manifest %s: %w", d, err)
		}
		content, mediaType = m.Content, m.MediaType
	}
	rec := &Record{Version: recordVersion, Upstream: repo.Upstream, Repository: repo.Name, Digest: d.String(), MediaType: mediaType, Inspected: time.Now().UTC()}
	kind, err := kindOf(content, mediaType)
	switch {
	case err != nil:
		rec.Error = err.Error()
	case kind == KindIndex:
		rec.Kind = KindIndex
		if rec.Index, err = parseIndex(content); err != nil {
			rec.Error = err.Error()
		}
	default:
		rec.Kind = KindImage
		m, err := parseManifest(content)
		if err != nil {
			rec.Error = err.Error()
			break
		}
		rec.Image = imageFromManifest(m)
		raw, err := i.readConfig(ctx, repo, m.Config.Digest.String(), m.Config.Size, fetch, d, bg)
		var ce *configError
		switch {
		case errors.As(err, &ce):
			rec.Error = err.Error()
		case err != nil:
			// errWaiting, or a passing fault (the upstream, the disk):
			// nothing is recorded, the next try reads it again.
			return nil, err
		default:
			if err := applyConfig(rec.Image, m, raw); err != nil {
				rec.Error = err.Error()
			}
		}
	}
	if err := i.store.put(ctx, rec); err != nil {
		i.log.WithError(err).Warn("could not store inspection")
	}
	result := "ok"
	if rec.Error != "" {
		result = "error"
	}
	i.metrics.inspections.WithLabelValues(result).Inc()
	i.metrics.seconds.Observe(time.Since(start).Seconds())
	i.scaler.recorded(rec)
	return rec, nil
}

// leaveToFleet handles a manifest this host read from the bucket: another
// host fetched it from the upstream and inspects it, writing the record to
// the bucket. Reading that record now would cost every host one S3 GET per
// manifest whether or not anyone looks at it, so it is read when the API,
// a page or the scaler feed asks (fromFleet). Only the manifest's config
// digest is noted, from the manifest on disk, so that a pin on the config
// names the image in the scaler feed.
func (i *Inspector) leaveToFleet(j job) {
	if _, ok := i.store.get(j.repo.Upstream, j.digest); ok {
		return
	}
	i.metrics.inspections.WithLabelValues("deferred").Inc()
	m, err := i.local.GetManifest(storage.Key{Upstream: j.repo.Upstream, Digest: j.digest})
	if err != nil {
		return
	}
	if kind, err := kindOf(m.Content, m.MediaType); err != nil || kind != KindImage {
		return
	}
	if pm, err := parseManifest(m.Content); err == nil {
		i.scaler.config(j.repo.Upstream, pm.Config.Digest.String(), j.digest)
	}
}

// fromFleet reads the fleet's record of d from the bucket, keeping it on
// this host's disk. A record the bucket lacked is not asked for again
// within a minute, so a page shown often costs no S3 request per view;
// always asks anyway (the caller would otherwise inspect it, fetching
// what it lacks).
func (i *Inspector) fromFleet(ctx context.Context, upstream string, d digest.Digest, always bool) (*Record, bool) {
	if i.objects == nil {
		return nil, false
	}
	key := storage.Key{Upstream: upstream, Digest: d}
	i.mu.Lock()
	asked, missed := i.missed[key]
	i.mu.Unlock()
	if missed && !always && time.Since(asked) < time.Minute {
		return nil, false
	}
	rec, ok := i.store.shared(ctx, upstream, d)
	i.mu.Lock()
	if !ok {
		if len(i.missed) >= maxWaiting {
			clear(i.missed)
		}
		i.missed[key] = time.Now()
		i.mu.Unlock()
		return nil, false
	}
	delete(i.missed, key)
	i.mu.Unlock()
	i.metrics.inspections.WithLabelValues("shared").Inc()
	i.scaler.recorded(rec)
	return rec, true
}

// lookup returns the record of d from this host's disk or the bucket.
func (i *Inspector) lookup(ctx context.Context, upstream string, d digest.Digest) (*Record, bool) {
	if rec, ok := i.store.get(upstream, d); ok {
		return rec, true
	}
	return i.fromFleet(ctx, upstream, d, false)
}

// configError is a fault of the image's config itself.
type configError struct{ msg string }

func (e *configError) Error() string { return e.msg }

// readConfig reads a config blob whole, up to MaxConfigSize.
func (i *Inspector) readConfig(ctx context.Context, repo engine.Repo, ref string, size int64, fetch bool, manifest digest.Digest, bg *job) ([]byte, error) {
	if size > MaxConfigSize {
		return nil, &configError{fmt.Sprintf("config is %d bytes, over the %d byte limit: not read", size, MaxConfigSize)}
	}
	cd, err := digest.Parse(ref)
	if err != nil {
		return nil, &configError{"config digest: " + err.Error()}
	}
	var r io.ReadCloser
	if fetch {
		b, err := i.eng.Blob(ctx, repo, cd)
		if err != nil {
			return nil, err
		}
		r = b
	} else {
		key := storage.Key{Upstream: repo.Upstream, Digest: cd}
		f, _, release, err := i.local.OpenBlob(key)
		if errors.Is(err, storage.ErrNotFound) && bg != nil {
			// Park, then look again: a config cached in between is not missed.
			i.mu.Lock()
			if len(i.waiting) >= maxWaiting {
				i.mu.Unlock()
				return nil, &configError{"too many manifests waiting for their config; not inspected"}
			}
			i.waiting[key] = append(i.waiting[key], *bg)
			i.mu.Unlock()
			f, _, release, err = i.local.OpenBlob(key)
			if err != nil {
				return nil, errWaiting
			}
			i.mu.Lock()
			jobs := i.waiting[key]
			n := len(jobs)
			for k, j := range jobs {
				if j.digest == manifest {
					jobs = append(jobs[:k], jobs[k+1:]...)
					break
				}
			}
			if len(jobs) == n {
				// configCached took it already and requeued it.
				i.mu.Unlock()
				release()
				f.Close()
				return nil, errWaiting
			}
			if len(jobs) == 0 {
				delete(i.waiting, key)
			} else {
				i.waiting[key] = jobs
			}
			i.mu.Unlock()
		} else if err != nil {
			return nil, err
		}
		r = readCloser{f, func() error { err := f.Close(); release(); return err }}
	}
	defer r.Close()
	raw, err := io.ReadAll(io.LimitReader(r, MaxConfigSize+1))
	if err != nil {
		return nil, err
	}
	if len(raw) > MaxConfigSize {
		return nil, &configError{fmt.Sprintf("config is over the %d byte limit: not read", MaxConfigSize)}
	}
	return raw, nil
}

type readCloser struct {
	io.Reader
	close func() error
}

func (r readCloser) Close() error { return r.close() }

// Waiting is the number of manifests waiting for their config blob.
func (i *Inspector) Waiting() int {
	i.mu.Lock()
	defer i.mu.Unlock()
	n := 0
	for _, jobs := range i.waiting {
		n += len(jobs)
	}
	return n
}

// QueueLen is the number of manifests in the queue.
func (i *Inspector) QueueLen() int { return len(i.queue) }

// Platform is one platform of a View: the index's entry and, once
// inspected, its image.
type Platform struct {
	Entry
	Image *Image `json:"image,omitempty"`
	Error string `json:"error,omitempty"`
}

// View is a record as the API and pages show it: an index with its
// platforms' images joined, sizes added up, the tags that point at it.
type View struct {
	*Record
	Tags         []string      `json:"tags"`
	Platforms    []Platform    `json:"platforms,omitempty"` // an index's platforms
	DownloadSize int64         `json:"downloadSize"`        // an index: layers shared between platforms counted once
	Microscaling *Microscaling `json:"microscaling,omitempty"`
	History      []TagEvent    `json:"history"`
}

// view joins a record with its platforms' records (those inspected) and
// strips what the configuration does not allow shown.
func (i *Inspector) view(rec *Record) *View {
	v := &View{Record: rec, Tags: []string{}}
	if rec.Image != nil {
		img := *rec.Image
		if !i.cfg.Load().Inspector.ShowEnvNames {
			img.EnvNames = nil
		}
		v.Record = &Record{}
		*v.Record = *rec
		v.Image = &img
		v.DownloadSize = img.DownloadSize
		v.Microscaling = microscaling(img.Labels)
	}
	if rec.Index != nil {
		seen := map[string]bool{}
		for _, e := range rec.Index.Platforms {
			p := Platform{Entry: e}
			if d, err := digest.Parse(e.Digest); err == nil {
				if child, ok := i.store.get(rec.Upstream, d); ok {
					p.Error = child.Error
					if child.Image != nil {
						img := *child.Image
						if !i.cfg.Load().Inspector.ShowEnvNames {
							img.EnvNames = nil
						}
						p.Image = &img
						for _, l := range img.Layers {
							if !seen[l.Digest] {
								seen[l.Digest] = true
								v.DownloadSize += l.Size
							}
						}
						if v.Microscaling == nil {
							v.Microscaling = microscaling(img.Labels)
						}
					}
				}
			}
			v.Platforms = append(v.Platforms, p)
		}
	}
	v.History = i.history.list(func(e TagEvent) bool {
		return e.Upstream == rec.Upstream && (e.New == rec.Digest || e.Old == rec.Digest)
	})
	return v
}

// nodePlatform picks the platform this node's runtime pulls from an index.
func nodePlatform(v *View) *Platform {
	for k := range v.Platforms {
		p := &v.Platforms[k]
		if p.OS == runtime.GOOS && p.Architecture == runtime.GOARCH {
			return p
		}
	}
	if len(v.Platforms) > 0 {
		return &v.Platforms[0]
	}
	return nil
}

// TagInfo is one cached tag.
type TagInfo struct {
	Tag       string    `json:"tag"`
	Digest    string    `json:"digest"`
	MediaType string    `json:"mediaType"`
	Checked   time.Time `json:"checked"`
}

// Repository is one cached repository and its tags.
type Repository struct {
	Upstream   string    `json:"upstream"`
	Repository string    `json:"repository"`
	Tags       []TagInfo `json:"tags"`
}

// Repositories lists the cached repositories with their tags and digests.
func (i *Inspector) Repositories() ([]Repository, error) {
	repos, err := i.eng.Catalog()
	if err != nil {
		return nil, err
	}
	out := []Repository{}
	for _, r := range repos {
		out = append(out, Repository{Upstream: r.Upstream, Repository: r.Name, Tags: i.tags(r)})
	}
	sort.Slice(out, func(a, b int) bool {
		if out[a].Upstream != out[b].Upstream {
			return out[a].Upstream < out[b].Upstream
		}
		return out[a].Repository < out[b].Repository
	})
	return out, nil
}

func (i *Inspector) tags(r engine.Repo) []TagInfo {
	names, _ := i.local.Tags(r.Upstream, r.Name)
	sort.Strings(names)
	out := []TagInfo{}
	for _, t := range names {
		rec, err := i.local.GetTag(r.Upstream, r.Name, t)
		if err != nil {
			continue
		}
		out = append(out, TagInfo{Tag: t, Digest: rec.Digest.String(), MediaType: rec.MediaType, Checked: rec.Checked.UTC()})
	}
	return out
}

// Image returns the view of repo at ref (a tag or a digest), inspecting
// it now if need be. A tag is resolved through the engine, with its TTL
// and stale rules, as a pull would.
func (i *Inspector) Image(ctx context.Context, repo engine.Repo, ref string) (*View, error) {
	var d digest.Digest
	if strings.Contains(ref, ":") {
		var err error
		if d, err = digest.Parse(ref); err != nil {
			return nil, &engine.Error{Kind: engine.KindInvalidReference, Msg: err.Error()}
		}
	} else {
		m, err := i.eng.Manifest(ctx, repo, ref, nil)
		if err != nil {
			return nil, err
		}
		d = m.Digest
	}
	rec, err := i.Inspect(ctx, repo, d)
	if err != nil {
		return nil, err
	}
	v := i.view(rec)
	for _, t := range i.tags(repo) {
		if t.Digest == d.String() {
			v.Tags = append(v.Tags, t.Tag)
		}
	}
	return v, nil
}

package engine

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/storage"
)

// Options builds an Engine in one step.
type Options struct {
	Config  *config.Config        // upstreams, TTLs; Prepare's apply swaps it
	Local   *storage.Local        // the host's disk
	Bucket  storage.Bucket        // the fleet's bucket; nil: no fleet tier
	Log     *logrus.Entry         // nil: discard
	Metrics prometheus.Registerer // nil: a private registry

	// LeaseTTL is how long a host may hold the right to fetch a blob for
	// the fleet without renewing it; default 15s.
	LeaseTTL time.Duration
	// Advertise is the URL other hosts reach this berth at; it goes into
	// the leases this host takes so waiting hosts stream from it.
	Advertise string
	// SourceIdleTimeout is how long a download's source may send nothing
	// before berth resumes the download from another request; default 15s.
	SourceIdleTimeout time.Duration
	// PeerIdleTimeout is how long another berth streaming a blob to this
	// one may send nothing (response headers included) before it is judged
	// dead: its lease is taken over and the download carries on from the
	// upstream or the bucket; default 5s. Shorter than SourceIdleTimeout
	// because a wrong guess costs only one more upstream fetch.
	PeerIdleTimeout time.Duration
	// RelayStall is how long a download the disk has no room for waits
	// on a client that reads nothing before it drops that client; default 30s.
	RelayStall time.Duration
	// PeerTransport carries this host's requests to other berths' fleet
	// ports, adding this host's fleet credential (auth.PeerTransport).
	// Nil: NewPeerTransport(), plain HTTP without credentials.
	PeerTransport http.RoundTripper
}

// Engine is berth's pull-through engine: blobs and manifests from the
// local disk, the fleet's bucket, a peer or the upstream, each fetched once
// however many callers ask. It knows nothing of HTTP clients: the registry
// API, pre-warm and the inspector all call it.
type Engine struct {
	local   *storage.Local
	log     *logrus.Entry
	metrics *metrics
	fleet   *fleet // nil without a bucket
	opts    Options

	// life outlives callers: downloads are shared and finish even when the
	// caller that started them leaves. Close cancels it.
	life   context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	downloads map[storage.Key]*download

	settings sync.RWMutex
	cfg      *config.Config
	ups      map[string]*upstream
	// The idle timeouts start as Options says and follow the configuration
	// on reload; downloads read them on every chunk, hence atomics.
	sourceIdle, peerIdle atomic.Int64

	bgMu     sync.Mutex
	bg       map[string]*call // tag revalidations and manifest fetches by key
	tagLists *lru[string, tagList]

	pins *pinSet

	peers        *http.Client
	peerRefusals sync.Map // holder URL and status already logged: a refusal is logged once

	subMu sync.Mutex
	subs  map[chan Event]struct{}
}

// maxTagLists bounds the cached upstream tag lists.
const maxTagLists = 1024

// New builds an engine over the local disk and, when o.Bucket is set, the
// fleet's bucket.
func New(o Options) (*Engine, error) {
	if o.Log == nil {
		l := logrus.New()
		l.Out = ioDiscard{}
		o.Log = logrus.NewEntry(l)
	}
	if o.Metrics == nil {
		o.Metrics = prometheus.NewRegistry()
	}
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = 15 * time.Second
	}
	if o.SourceIdleTimeout <= 0 {
		o.SourceIdleTimeout = 15 * time.Second
	}
	if o.PeerIdleTimeout <= 0 {
		o.PeerIdleTimeout = 5 * time.Second
	}
	if o.RelayStall <= 0 {
		o.RelayStall = 30 * time.Second
	}
	e := &Engine{
		local: o.Local, log: o.Log, opts: o,
		downloads: map[storage.Key]*download{},
		tagLists:  newLRU[string, tagList](maxTagLists),
		bg:        map[string]*call{},
		subs:      map[chan Event]struct{}{},
	}
	e.sourceIdle.Store(int64(o.SourceIdleTimeout))
	e.peerIdle.Store(int64(o.PeerIdleTimeout))
	if o.PeerTransport == nil {
		o.PeerTransport = defaultPeerTransport
	}
	e.peers = &http.Client{
		Transport: o.PeerTransport,
		// A peer answers or refuses; following a redirect would carry this
		// host's fleet credential (added by the transport) somewhere else.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	e.life, e.cancel = context.WithCancel(context.Background())
	ups, err := e.newUpstreams(o.Config)
	if err != nil {
		e.cancel()
		return nil, err
	}
	e.setConfig(o.Config.Clone(), ups)
	e.metrics = newMetrics(o.Metrics, o.Local, e)
	if o.Bucket != nil {
		e.fleet = newFleet(e, o.Bucket, o.LeaseTTL, o.Advertise, o.Metrics)
	}
	e.pins = newPinSet(o.Local)
	o.Local.OnEvict(func(k storage.Key, size int64) {
		e.metrics.evicted(size)
		e.publish(Event{Kind: BlobEvicted, Repo: Repo{Upstream: k.Upstream}, Digest: k.Digest, Size: size})
	})
	return e, nil
}

type ioDiscard struct{}

func (ioDiscard) Write(p []byte) (int, error) { return len(p), nil }

// Prepare builds the upstreams of cfg (their CA files read) and returns
// the func that swaps in cfg's upstreams, TTLs and idle timeouts. Nothing
// changes until apply, so a reload can still be given up when another part
// of it fails. After apply, work in progress finishes with the old
// upstreams, and running downloads take the new idle timeouts from their
// next chunk.
func (e *Engine) Prepare(cfg *config.Config) (apply func(), err error) {
	ups, err := e.newUpstreams(cfg)
	if err != nil {
		return nil, err
	}
	cfg = cfg.Clone()
	return func() {
		e.setConfig(cfg, ups)
		// At New, Options carries the idle timeouts; from then on the
		// configuration does.
		if d := cfg.SourceIdleTimeout.D(); d > 0 {
			e.sourceIdle.Store(int64(d))
		}
		if d := cfg.PeerIdleTimeout.D(); d > 0 {
			e.peerIdle.Store(int64(d))
		}
	}, nil
}

// newUpstreams builds cfg's upstreams; it starts nothing, so upstreams
// that are never put in force need no cleaning up.
func (e *Engine) newUpstreams(cfg *config.Config) (map[string]*upstream, error) {
	ups := map[string]*upstream{}
	for host, c := range cfg.Upstreams {
		u, err := newUpstream(e.life, host, c)
		if err != nil {
			return nil, err
		}
		ups[host] = u
	}
	return ups, nil
}

// setConfig puts cfg, which no caller holds, and its upstreams in force.
func (e *Engine) setConfig(cfg *config.Config, ups map[string]*upstream) {
	e.settings.Lock()
	e.cfg, e.ups = cfg, ups
	e.settings.Unlock()
	e.tagLists.clear()
}

func (e *Engine) config() (*config.Config, map[string]*upstream) {
	e.settings.RLock()
	defer e.settings.RUnlock()
	return e.cfg, e.ups
}

// Close stops the work still running (downloads, revalidations) and waits
// for it, so nothing partial remains. Call it after the callers are done.
func (e *Engine) Close() {
	e.cancel()
	e.wg.Wait()
	e.pins.close()
}

// goBackground runs fn as engine work that Close waits for.
func (e *Engine) goBackground(fn func()) {
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		fn()
	}()
}

// Repo names a repository at one of the engine's upstreams.
type Repo struct {
	Upstream string // the upstream's registry name, e.g. docker.io
	Name     string // the repository there, e.g. library/alpine
}

func (r Repo) String() string { return r.Upstream + "/" + r.Name }

// dockerHubAliases are the names containerd and others use for Docker Hub.
var dockerHubAliases = map[string]bool{"docker.io": true, "index.docker.io": true, "registry-1.docker.io": true}

func canonicalHost(h string) string {
	h = strings.ToLower(h)
	if dockerHubAliases[h] {
		return config.DockerHub
	}
	return h
}

// Resolve maps a registry name and a repository name to a Repo: registry
// "" is the default upstream; Docker Hub's aliases are one registry; a
// registry may also be named by its endpoint's host. Docker Hub's
// single-component names get library/.
func (e *Engine) Resolve(registry, name string) (Repo, error) {
	cfg, ups := e.config()
	host := cfg.DefaultUpstream
	if registry != "" {
		host = canonicalHost(registry)
	}
	if name == "" || name != strings.ToLower(name) {
		return Repo{}, &Error{Kind: KindInvalidName, Msg: fmt.Sprintf("invalid repository name %q: must be lower case", name)}
	}
	up, ok := ups[host]
	if !ok {
		for _, u := range ups {
			if strings.EqualFold(u.endpoint.Host, host) {
				up, ok = u, true
				break
			}
		}
	}
	if !ok {
		return Repo{}, &Error{Kind: KindUnknownRegistry, Msg: fmt.Sprintf("registry %s is not an upstream of this berth (configured: %s)", host, strings.Join(cfg.UpstreamHosts(), ", "))}
	}
	if up.host == config.DockerHub && !strings.Contains(name, "/") {
		name = "library/" + name
	}
	return Repo{Upstream: up.host, Name: name}, nil
}

// upstreamOf returns the configured upstream of r.
func (e *Engine) upstreamOf(r Repo) (*upstream, error) {
	_, ups := e.config()
	up, ok := ups[r.Upstream]
	if !ok {
		return nil, &Error{Kind: KindUnknownRegistry, Msg: "registry " + r.Upstream + " is no longer an upstream of this berth"}
	}
	return up, nil
}

// DefaultUpstream is the upstream of names that name no registry.
func (e *Engine) DefaultUpstream() string {
	cfg, _ := e.config()
	return cfg.DefaultUpstream
}

// PingUpstream returns a health check of the named upstream.
func (e *Engine) PingUpstream(host string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		_, ups := e.config()
		u, ok := ups[host]
		if !ok {
			return fmt.Errorf("upstream %s is no longer configured", host)
		}
		return u.ping(ctx)
	}
}

// BucketHealth is the bucket's health check: a failed ping makes the engine
// skip the bucket too, a successful one ends a backoff early, so berth
// returns to the bucket as soon as it answers again. Nil without a bucket.
func (e *Engine) BucketHealth() func(context.Context) error {
	if e.fleet == nil {
		return nil
	}
	return e.fleet.health
}

// Kind classifies what went wrong, for callers that answer clients (the
// registry API's error codes, pre-warm's per-blob errors).
type Kind string

const (
	KindNotFound         Kind = "not_found"
	KindDenied           Kind = "unauthorized"
	KindRateLimited      Kind = "rate_limited"
	KindUnavailable      Kind = "upstream_unavailable"
	KindDigestMismatch   Kind = "digest_mismatch"
	KindNoSpace          Kind = "no_space"
	KindInvalidName      Kind = "invalid_name"
	KindInvalidReference Kind = "invalid_reference"
	KindUnknownRegistry  Kind = "unknown_registry"
	KindUnsupported      Kind = "unsupported"
	KindInternal         Kind = "internal"
)

// Error is an engine failure that is not an upstream's answer.
type Error struct {
	Kind Kind
	Msg  string
}

func (e *Error) Error() string { return e.Msg }

// KindOf classifies err.
func KindOf(err error) Kind {
	var ee *Error
	if errors.As(err, &ee) {
		return ee.Kind
	}
	switch {
	case errors.Is(err, storage.ErrDigestMismatch):
		return KindDigestMismatch
	case errors.Is(err, storage.ErrNoSpace):
		return KindNoSpace
	}
	ue, ok := asUpstreamError(err)
	switch {
	case !ok:
		return KindInternal
	case ue.Status == http.StatusNotFound:
		return KindNotFound
	case ue.Status == http.StatusTooManyRequests:
		return KindRateLimited
	case ue.Status == http.StatusUnauthorized || ue.Status == http.StatusForbidden:
		return KindDenied
	default:
		return KindUnavailable
	}
}

// RetryAfter is the upstream's Retry-After behind err, if any.
func RetryAfter(err error) string {
	if ue, ok := asUpstreamError(err); ok {
		return ue.RetryAfter
	}
	return ""
}

// Package mirror is berth's registry API and pull-through engine: it
// answers the pull side of the OCI distribution API from the local cache
// and fetches what it lacks from the configured upstreams, once.
package mirror

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	v2 "github.com/distribution/distribution/v3/registry/api/v2"
	"github.com/distribution/reference"
	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	"golang.org/x/sync/singleflight"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/storage"
)

// Server is the registry API of one berth.
type Server struct {
	local   *storage.Local
	log     *logrus.Entry
	metrics *metrics
	sharedT *sharedTier
	router  *mux.Router

	// downloadCtx outlives requests: downloads are shared and finish even
	// when the client that started them leaves. Close cancels it.
	downloadCtx    context.Context
	cancelDownload context.CancelFunc
	wg             sync.WaitGroup

	mu      sync.Mutex
	flights map[storage.Key]*flight

	settings sync.RWMutex
	cfg      *config.Config
	ups      map[string]*upstream

	revalidate   singleflight.Group // tag revalidations and manifest fetches
	revalStarted sync.Map           // revalidate key -> time.Time it started
	tagLists     sync.Map           // tag list cache: upstream+"/"+repo -> tagList
}

// New builds a Server over the local tier. Upstreams come from cfg.
func New(cfg *config.Config, local *storage.Local, reg prometheus.Registerer, log *logrus.Entry) (*Server, error) {
	s := &Server{local: local, log: log, flights: map[storage.Key]*flight{}}
	if err := s.Reload(cfg); err != nil {
		return nil, err
	}
	s.metrics = newMetrics(reg, local)
	s.sharedT = newSharedMetrics(reg)
	local.OnEvict(s.metrics.evicted)
	s.downloadCtx, s.cancelDownload = context.WithCancel(context.Background())
	s.router = v2.RouterWithPrefix("")
	s.router.GetRoute(v2.RouteNameBase).Handler(s.handle("base", s.serveBase))
	s.router.GetRoute(v2.RouteNameManifest).Handler(s.handle("manifest", s.routeManifest))
	s.router.GetRoute(v2.RouteNameBlob).Handler(s.handle("blob", s.routeBlob))
	s.router.GetRoute(v2.RouteNameTags).Handler(s.handle("tags", s.routeTags))
	s.router.GetRoute(v2.RouteNameCatalog).Handler(s.handle("catalog", s.serveCatalog))
	s.router.GetRoute(v2.RouteNameBlobUpload).Handler(s.handle("write", s.rejectWrite))
	s.router.GetRoute(v2.RouteNameBlobUploadChunk).Handler(s.handle("write", s.rejectWrite))
	s.router.NotFoundHandler = s.handle("other", s.notFound)
	return s, nil
}

// Reload swaps in new upstreams and TTLs; in-flight requests finish with the old ones.
func (s *Server) Reload(cfg *config.Config) error {
	ups := map[string]*upstream{}
	for host, c := range cfg.Upstreams {
		u, err := newUpstream(host, c)
		if err != nil {
			return err
		}
		ups[host] = u
	}
	s.settings.Lock()
	s.cfg, s.ups = cfg.Clone(), ups
	s.settings.Unlock()
	s.tagLists.Clear()
	return nil
}

func (s *Server) config() (*config.Config, map[string]*upstream) {
	s.settings.RLock()
	defer s.settings.RUnlock()
	return s.cfg, s.ups
}

// ServeHTTP answers the /v2/ API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.router.ServeHTTP(w, r) }

// Close stops downloads still running; call it after the HTTP server has
// drained, so their temp files are removed and nothing partial remains.
func (s *Server) Close() {
	s.cancelDownload()
	s.wg.Wait()
}

func (s *Server) handle(kind string, h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		sw.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		defer func() {
			code := sw.status
			if code == 0 {
				code = http.StatusOK
			}
			s.metrics.requests.WithLabelValues(kind, r.Method, strconv.Itoa(code)).Inc()
		}()
		sw.onHeader = func() { s.metrics.duration.WithLabelValues(kind).Observe(time.Since(start).Seconds()) }
		h(sw, r)
	})
}

func (s *Server) serveBase(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", "2")
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		io.WriteString(w, "{}")
	}
}

func (s *Server) rejectWrite(w http.ResponseWriter, r *http.Request) {
	serveError(w, errcode.ErrorCodeUnsupported.WithMessage("berth is a read-only mirror: push, delete and mount are not supported").WithDetail(map[string]string{"method": r.Method}))
}

// methodAllowed rejects writes on read routes with UNSUPPORTED.
func (s *Server) methodAllowed(w http.ResponseWriter, r *http.Request) bool {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return true
	}
	s.rejectWrite(w, r)
	return false
}

func serveError(w http.ResponseWriter, err errcode.Error) {
	status := err.Code.Descriptor().HTTPStatusCode
	if status == http.StatusMethodNotAllowed || err.Code == errcode.ErrorCodeUnsupported {
		w.Header().Set("Allow", "GET, HEAD")
		status = http.StatusMethodNotAllowed
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Del("Content-Length")
	w.Header().Del("Docker-Content-Digest")
	w.Header().Del("Warning")
	w.Header().Del("Berth-Stale")
	w.WriteHeader(status)
	errcode.ServeJSON(discardHeader{w}, errcode.Errors{err})
}

// discardHeader lets errcode.ServeJSON write its body after we chose the status.
type discardHeader struct{ http.ResponseWriter }

func (discardHeader) WriteHeader(int) {}

// A route's target: which upstream and which repository there.
type target struct {
	up   *upstream
	repo string
}

// dockerHubAliases are the names containerd and others use for Docker Hub.
var dockerHubAliases = map[string]bool{"docker.io": true, "index.docker.io": true, "registry-1.docker.io": true}

func canonicalHost(h string) string {
	h = strings.ToLower(h)
	if dockerHubAliases[h] {
		return config.DockerHub
	}
	return h
}

// resolve maps a request's name to an upstream: containerd's ?ns=, a first
// path component naming a registry (CRI-O), or the default upstream.
func (s *Server) resolve(r *http.Request, name string) (target, *errcode.Error) {
	cfg, ups := s.config()
	host := ""
	if ns := r.URL.Query().Get("ns"); ns != "" {
		host = canonicalHost(ns)
	} else if first, rest, ok := strings.Cut(name, "/"); ok && (strings.ContainsAny(first, ".:") || first == "localhost") {
		host, name = canonicalHost(first), rest
	} else {
		host = cfg.DefaultUpstream
	}
	// The router lets an upper-case first component through as a registry
	// host; when it names none it is part of the repository name, which
	// must be lower case.
	if name != strings.ToLower(name) {
		e := errcode.Error{Code: v2.ErrorCodeNameInvalid, Message: fmt.Sprintf("invalid repository name %q: must be lower case", name)}
		return target{}, &e
	}
	up, ok := ups[host]
	if !ok {
		for _, u := range ups { // ns may name the endpoint rather than the registry
			if strings.EqualFold(u.endpoint.Host, host) {
				up, ok = u, true
				break
			}
		}
	}
	if !ok {
		e := errcode.Error{Code: v2.ErrorCodeNameUnknown, Message: fmt.Sprintf("registry %s is not an upstream of this berth (configured: %s)", host, strings.Join(cfg.UpstreamHosts(), ", "))}
		return target{}, &e
	}
	if up.host == config.DockerHub && !strings.Contains(name, "/") {
		name = "library/" + name
	}
	return target{up: up, repo: name}, nil
}

// readTarget admits GET and HEAD and resolves the route's name; on
// failure it has answered already.
func (s *Server) readTarget(w http.ResponseWriter, r *http.Request) (target, map[string]string, bool) {
	if !s.methodAllowed(w, r) {
		return target{}, nil, false
	}
	vars := mux.Vars(r)
	t, e := s.resolve(r, vars["name"])
	if e != nil {
		serveError(w, *e)
		return target{}, nil, false
	}
	return t, vars, true
}

func parseDigest(w http.ResponseWriter, ref string) (digest.Digest, bool) {
	d, err := digest.Parse(ref)
	if err != nil {
		serveError(w, v2.ErrorCodeDigestInvalid.WithMessage(err.Error()))
		return "", false
	}
	return d, true
}

func (s *Server) routeManifest(w http.ResponseWriter, r *http.Request) {
	t, vars, ok := s.readTarget(w, r)
	if !ok {
		return
	}
	ref := vars["reference"]
	if !strings.Contains(ref, ":") {
		s.serveManifestByTag(w, r, t, ref)
		return
	}
	if d, ok := parseDigest(w, ref); ok {
		s.serveManifestByDigest(w, r, t, d)
	}
}

func (s *Server) routeBlob(w http.ResponseWriter, r *http.Request) {
	t, vars, ok := s.readTarget(w, r)
	if !ok {
		return
	}
	if d, ok := parseDigest(w, vars["digest"]); ok {
		s.serveBlob(w, r, t.up, t.repo, d)
	}
}

var (
	anchoredName = regexp.MustCompile(`^` + reference.NameRegexp.String() + `$`)
	anchoredTag  = regexp.MustCompile(`^` + reference.TagRegexp.String() + `$`)
)

// notFound explains paths the router did not match: mostly a bad name,
// tag or digest in an otherwise well-formed request.
func (s *Server) notFound(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	if !strings.HasPrefix(p, "/v2/") {
		http.NotFound(w, r)
		return
	}
	rest := strings.TrimPrefix(p, "/v2/")
	for _, kind := range []string{"/manifests/", "/blobs/", "/tags/list"} {
		i := strings.LastIndex(rest, kind)
		if i < 0 {
			continue
		}
		name, ref := rest[:i], rest[i+len(kind):]
		switch {
		case !anchoredName.MatchString(name):
			serveError(w, v2.ErrorCodeNameInvalid.WithMessage(fmt.Sprintf("invalid repository name %q", name)))
		case kind == "/blobs/":
			serveError(w, v2.ErrorCodeDigestInvalid.WithMessage(fmt.Sprintf("invalid digest %q", ref)))
		case kind == "/manifests/" && strings.Contains(ref, ":"):
			serveError(w, v2.ErrorCodeDigestInvalid.WithMessage(fmt.Sprintf("invalid digest %q", ref)))
		case kind == "/manifests/" && !anchoredTag.MatchString(ref):
			serveError(w, v2.ErrorCodeTagInvalid.WithMessage(fmt.Sprintf("invalid tag %q", ref)))
		default:
			serveError(w, errcode.ErrorCodeUnsupported.WithMessage("unsupported path "+p))
		}
		return
	}
	serveError(w, v2.ErrorCodeNameUnknown.WithMessage("no such API path: "+p))
}

// statusWriter records the status for metrics and forwards ReadFrom so
// sendfile survives the wrapping.
type statusWriter struct {
	http.ResponseWriter
	status   int
	onHeader func()
}

func (s *statusWriter) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
		if s.onHeader != nil {
			s.onHeader()
		}
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(p []byte) (int, error) {
	if s.status == 0 {
		s.WriteHeader(http.StatusOK)
	}
	return s.ResponseWriter.Write(p)
}

func (s *statusWriter) ReadFrom(r io.Reader) (int64, error) {
	if s.status == 0 {
		s.WriteHeader(http.StatusOK)
	}
	if rf, ok := s.ResponseWriter.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{s.ResponseWriter}, r)
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// upstreamDo sends a request upstream and counts it.
func (s *Server) upstreamDo(ctx context.Context, up *upstream, repo, op, method, url string, hdr http.Header) (*http.Response, error) {
	resp, err := up.do(ctx, repo, method, url, hdr)
	code := 0
	if err == nil {
		code = resp.StatusCode
	} else if ue, ok := asUpstreamError(err); ok {
		code = ue.status
		if ue.unavailable() {
			s.metrics.upstreamErrs.WithLabelValues(up.host, op).Inc()
		}
	}
	s.metrics.upstreamReqs.WithLabelValues(up.host, op, strconv.Itoa(code)).Inc()
	return resp, err
}

// Package mirror is berth's registry API: the pull side of the OCI
// distribution API as a thin adapter over the engine, which does the
// caching and fetching.
package mirror

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	v2 "github.com/distribution/distribution/v3/registry/api/v2"
	"github.com/distribution/reference"
	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/engine"
)

// Server is the registry API of one berth.
type Server struct {
	eng     *engine.Engine
	log     *logrus.Entry
	metrics *metrics
	router  *mux.Router
}

// New builds the registry API over eng; its request metrics go to reg.
func New(eng *engine.Engine, reg prometheus.Registerer, log *logrus.Entry) *Server {
	s := &Server{eng: eng, log: log, metrics: newMetrics(reg)}
	s.router = v2.RouterWithPrefix("")
	// No path-cleaning redirects: clients of a registry send clean paths,
	// and a redirect built from an odd request URI can point off this host.
	s.router.SkipClean(true)
	s.router.GetRoute(v2.RouteNameBase).Handler(s.handle("base", s.serveBase))
	s.router.GetRoute(v2.RouteNameManifest).Handler(s.handle("manifest", s.routeManifest))
	s.router.GetRoute(v2.RouteNameBlob).Handler(s.handle("blob", s.routeBlob))
	s.router.GetRoute(v2.RouteNameTags).Handler(s.handle("tags", s.routeTags))
	s.router.GetRoute(v2.RouteNameCatalog).Handler(s.handle("catalog", s.serveCatalog))
	s.router.GetRoute(v2.RouteNameBlobUpload).Handler(s.handle("write", s.rejectWrite))
	s.router.GetRoute(v2.RouteNameBlobUploadChunk).Handler(s.handle("write", s.rejectWrite))
	s.router.NotFoundHandler = s.handle("other", s.notFound)
	return s
}

// ServeHTTP answers the /v2/ API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.router.ServeHTTP(w, r) }

func (s *Server) handle(kind string, h func(*responseWriter, *http.Request)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rw := &responseWriter{ResponseWriter: w}
		rw.onHeader = func() { s.metrics.duration.WithLabelValues(kind).Observe(time.Since(start).Seconds()) }
		rw.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		defer func() {
			code := rw.status
			if code == 0 {
				code = http.StatusOK
			}
			s.metrics.requests.WithLabelValues(kind, r.Method, strconv.Itoa(code)).Inc()
			if rw.source != "" {
				s.metrics.bytesServed.WithLabelValues(rw.source).Add(float64(rw.n))
			}
		}()
		h(rw, r)
	})
}

func (s *Server) serveBase(w *responseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", "2")
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		io.WriteString(w, "{}")
	}
}

func (s *Server) rejectWrite(w *responseWriter, r *http.Request) {
	serveError(w, errcode.ErrorCodeUnsupported.WithMessage("berth is a read-only mirror: push, delete and mount are not supported").WithDetail(map[string]string{"method": r.Method}))
}

// methodAllowed rejects writes on read routes with UNSUPPORTED.
func (s *Server) methodAllowed(w *responseWriter, r *http.Request) bool {
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

// engineError answers a request the engine could not serve.
func (s *Server) engineError(w http.ResponseWriter, err error, notFound errcode.ErrorCode) {
	var ue *engine.UpstreamError
	errors.As(err, &ue)
	switch engine.KindOf(err) {
	case engine.KindDigestMismatch:
		serveError(w, errcode.ErrorCodeUnavailable.WithMessage("upstream sent content that does not match its digest; nothing was kept"))
	case engine.KindNotFound:
		serveError(w, notFound.WithMessage("not found at upstream "+ue.Host))
	case engine.KindRateLimited:
		if ra := engine.RetryAfter(err); ra != "" {
			w.Header().Set("Retry-After", ra)
		}
		serveError(w, errcode.ErrorCodeTooManyRequests.WithMessage("upstream "+ue.Host+" is rate limiting berth and nothing is cached"))
	case engine.KindDenied:
		serveError(w, errcode.ErrorCodeDenied.WithMessage("upstream "+ue.Host+" denied access (repository missing, private, or berth's credentials lack access)"))
	case engine.KindInvalidName:
		serveError(w, v2.ErrorCodeNameInvalid.WithMessage(err.Error()))
	case engine.KindUnknownRegistry:
		serveError(w, v2.ErrorCodeNameUnknown.WithMessage(err.Error()))
	case engine.KindInvalidReference:
		serveError(w, v2.ErrorCodeDigestInvalid.WithMessage(err.Error()))
	case engine.KindUnavailable:
		serveError(w, errcode.ErrorCodeUnavailable.WithMessage(err.Error()))
	default:
		s.log.WithError(err).Warn("request failed")
		serveError(w, errcode.ErrorCodeUnavailable.WithMessage("berth could not serve this: "+err.Error()))
	}
}

// resolve maps a request's name to a repository: containerd's ?ns=, a
// first path component naming a registry (CRI-O), or the default upstream.
func (s *Server) resolve(r *http.Request, name string) (engine.Repo, error) {
	registry := r.URL.Query().Get("ns")
	if registry == "" {
		if first, rest, ok := strings.Cut(name, "/"); ok && (strings.ContainsAny(first, ".:") || first == "localhost") {
			registry, name = first, rest
		}
	}
	return s.eng.Resolve(registry, name)
}

// readTarget admits GET and HEAD and resolves the route's name; on
// failure it has answered already.
func (s *Server) readTarget(w *responseWriter, r *http.Request) (engine.Repo, map[string]string, bool) {
	if !s.methodAllowed(w, r) {
		return engine.Repo{}, nil, false
	}
	vars := mux.Vars(r)
	repo, err := s.resolve(r, vars["name"])
	if err != nil {
		s.engineError(w, err, v2.ErrorCodeNameUnknown)
		return engine.Repo{}, nil, false
	}
	return repo, vars, true
}

func parseDigest(w http.ResponseWriter, ref string) (digest.Digest, bool) {
	d, err := digest.Parse(ref)
	if err != nil {
		serveError(w, v2.ErrorCodeDigestInvalid.WithMessage(err.Error()))
		return "", false
	}
	return d, true
}

var (
	anchoredName = regexp.MustCompile(`^` + reference.NameRegexp.String() + `$`)
	anchoredTag  = regexp.MustCompile(`^` + reference.TagRegexp.String() + `$`)
)

// notFound explains paths the router did not match: mostly a bad name,
// tag or digest in an otherwise well-formed request.
func (s *Server) notFound(w *responseWriter, r *http.Request) {
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

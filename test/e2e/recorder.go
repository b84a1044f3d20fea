package e2e

import (
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/berth-dev/berth/internal/testsupport"
)

// Request is one request a Recorder passed on.
type Request struct {
	Method string
	Path   string
	NS     string // the ?ns= parameter, decoded
	URI    string // path and query as the client sent them
	Status int    // 0 if the target gave no response
}

// Recorder is an HTTP reverse proxy that notes every request and the status
// it got. Put in front of berth, it shows what a client really asked berth
// for (containerd's ?ns=, say) without depending on berth's own logging.
type Recorder struct {
	Host string // 127.0.0.1:PORT
	URL  string

	mu   sync.Mutex
	reqs []Request
}

// StartRecorder proxies a free loopback port to target (http://host:port)
// and is closed at cleanup.
func StartRecorder(t testing.TB, target string) *Recorder {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	rec := &Recorder{}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ErrorLog = nil
	rec.Host = testsupport.ServeLoopback(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &recordingWriter{ResponseWriter: w}
		rp.ServeHTTP(sw, r)
		rec.mu.Lock()
		rec.reqs = append(rec.reqs, Request{
			Method: r.Method, Path: r.URL.Path, NS: r.URL.Query().Get("ns"),
			URI: r.URL.RequestURI(), Status: sw.status,
		})
		rec.mu.Unlock()
	}))
	rec.URL = "http://" + rec.Host
	return rec
}

// Requests returns a copy of what was recorded so far.
func (r *Recorder) Requests() []Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Request(nil), r.reqs...)
}

// Matching returns the recorded requests whose path contains pathPart and
// whose ?ns= is ns.
func (r *Recorder) Matching(pathPart, ns string) []Request {
	var out []Request
	for _, req := range r.Requests() {
		if strings.Contains(req.Path, pathPart) && req.NS == ns {
			out = append(out, req)
		}
	}
	return out
}

type recordingWriter struct {
	http.ResponseWriter
	status int
}

func (w *recordingWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recordingWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *recordingWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

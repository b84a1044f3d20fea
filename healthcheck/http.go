package healthcheck

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path"
	"strings"
)

// Handler serves /healthz, /readyz and /status, picked by the last element
// of the request path, so it can be mounted at those three paths of any mux
// (or under a prefix). It never runs a check: it answers from the last
// results.
//
// /healthz answers 200 "ok" unless a liveness check fails, /readyz 200 "ok"
// unless a liveness or readiness check fails or has no result yet; both
// answer 503 listing every check they consider, in the Kubernetes style
// ("[+]name ok", "[-]name failed: error"), which ?verbose also asks for on
// success. /status answers the JSON Report, with 200 when ready and 503
// otherwise so that a probe of /status means the same as one of /readyz.
func (c *Checker) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch path.Base(r.URL.Path) {
		case "healthz", "livez":
			c.serveProbe(w, r, "healthz", func(k Kind) bool { return k == Liveness })
		case "readyz":
			c.serveProbe(w, r, "readyz", func(k Kind) bool { return k != Informational })
		case "status":
			c.serveStatus(w, r)
		default:
			http.NotFound(w, r)
		}
	})
}

func allowGet(w http.ResponseWriter, r *http.Request) bool {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return true
	}
	w.Header().Set("Allow", "GET, HEAD")
	http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	return false
}

func noCache(w http.ResponseWriter, contentType string) {
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
}

func (c *Checker) serveProbe(w http.ResponseWriter, r *http.Request, probe string, counts func(Kind) bool) {
	if !allowGet(w, r) {
		return
	}
	rep := c.Report()
	ok := rep.Live
	if probe == "readyz" {
		ok = rep.Ready
	}
	noCache(w, "text/plain; charset=utf-8")
	_, verbose := r.URL.Query()["verbose"]
	if ok && !verbose {
		w.WriteHeader(http.StatusOK)
		fmt.Fprintln(w, "ok")
		return
	}

	var b strings.Builder
	for _, s := range rep.Checks {
		if !counts(s.Kind) {
			if verbose && s.Status == StatusDegraded {
				fmt.Fprintf(&b, "[~]%s degraded (%s, does not fail this probe): %s\n", s.Name, s.Kind, oneLine(s.Error))
			} else if verbose {
				fmt.Fprintf(&b, "[+]%s %s (%s)\n", s.Name, s.Status, s.Kind)
			}
			continue
		}
		switch s.Status {
		case StatusOK:
			fmt.Fprintf(&b, "[+]%s ok\n", s.Name)
		case StatusUnknown:
			if probe == "readyz" {
				fmt.Fprintf(&b, "[-]%s failed: no result yet\n", s.Name)
			} else {
				fmt.Fprintf(&b, "[+]%s no result yet\n", s.Name)
			}
		default:
			fmt.Fprintf(&b, "[-]%s failed: %s\n", s.Name, oneLine(s.Error))
		}
	}
	code := http.StatusOK
	if ok {
		fmt.Fprintf(&b, "%s check passed\n", probe)
	} else {
		code = http.StatusServiceUnavailable
		fmt.Fprintf(&b, "%s check failed\n", probe)
	}
	w.WriteHeader(code)
	_, _ = w.Write([]byte(b.String()))
}

// oneLine keeps each check on its own line of a probe's answer, which is
// what `berth healthcheck` and kubelet event messages show.
func oneLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

func (c *Checker) serveStatus(w http.ResponseWriter, r *http.Request) {
	if !allowGet(w, r) {
		return
	}
	rep := c.Report()
	noCache(w, "application/json")
	code := http.StatusOK
	if !rep.Ready {
		code = http.StatusServiceUnavailable
	}
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(rep)
}

package mirror

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"strconv"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	v2 "github.com/distribution/distribution/v3/registry/api/v2"
)

func (s *Server) routeTags(w *responseWriter, r *http.Request) {
	repo, vars, ok := s.readTarget(w, r)
	if !ok {
		return
	}
	name := vars["name"]
	n, last, ok := pageParams(w, r)
	if !ok {
		return
	}
	tags, err := s.eng.Tags(r.Context(), repo)
	if err != nil {
		s.engineError(w, err, v2.ErrorCodeNameUnknown)
		return
	}
	page, more := paginate(tags, n, last)
	if more {
		w.Header().Set("Link", nextLink("/v2/"+name+"/tags/list", r, n, page[len(page)-1]))
	}
	writeJSON(w, struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}{name, page})
}

func (s *Server) serveCatalog(w *responseWriter, r *http.Request) {
	if !s.methodAllowed(w, r) {
		return
	}
	n, last, ok := pageParams(w, r)
	if !ok {
		return
	}
	def := s.eng.DefaultUpstream()
	repos, err := s.eng.Catalog()
	if err != nil {
		serveError(w, errcode.ErrorCodeUnknown.WithMessage(err.Error()))
		return
	}
	// Names as a client would ask for them: plain for the default upstream,
	// prefixed by the registry host for the others.
	names := make([]string, 0, len(repos))
	for _, p := range repos {
		if p.Upstream == def {
			names = append(names, p.Name)
		} else {
			names = append(names, p.String())
		}
	}
	sort.Strings(names)
	page, more := paginate(names, n, last)
	if more {
		w.Header().Set("Link", nextLink("/v2/_catalog", r, n, page[len(page)-1]))
	}
	writeJSON(w, struct {
		Repositories []string `json:"repositories"`
	}{page})
}

// pageParams reads n and last; n < 0 means no limit.
func pageParams(w http.ResponseWriter, r *http.Request) (n int, last string, ok bool) {
	q := r.URL.Query()
	n = -1
	if v := q.Get("n"); v != "" {
		var err error
		n, err = strconv.Atoi(v)
		if err != nil || n < 0 {
			serveError(w, v2.ErrorCodePaginationNumberInvalid.WithMessage(fmt.Sprintf("n=%q is not a non-negative integer", v)))
			return 0, "", false
		}
	}
	return n, q.Get("last"), true
}

// paginate returns the entries after last (sorted input), at most n of them.
func paginate(sorted []string, n int, last string) (page []string, more bool) {
	i := 0
	if last != "" {
		i = sort.SearchStrings(sorted, last)
		if i < len(sorted) && sorted[i] == last {
			i++
		}
	}
	rest := sorted[i:]
	if n >= 0 && len(rest) > n {
		return rest[:n], n > 0
	}
	if rest == nil {
		rest = []string{}
	}
	return rest, false
}

func nextLink(path string, r *http.Request, n int, last string) string {
	q := url.Values{}
	q.Set("n", strconv.Itoa(n))
	q.Set("last", last)
	if ns := r.URL.Query().Get("ns"); ns != "" {
		q.Set("ns", ns)
	}
	return fmt.Sprintf(`<%s?%s>; rel="next"`, path, q.Encode())
}

func writeJSON(w http.ResponseWriter, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		serveError(w, errcode.ErrorCodeUnknown.WithMessage(err.Error()))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	w.Write(b)
}

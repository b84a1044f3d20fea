package mirror

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	v2 "github.com/distribution/distribution/v3/registry/api/v2"
)

type tagList struct {
	tags    []string
	fetched time.Time
}

// maxTagPages bounds how many pages of an upstream tag list berth follows.
const maxTagPages = 100

func (s *Server) routeTags(w http.ResponseWriter, r *http.Request) {
	t, vars, ok := s.readTarget(w, r)
	if !ok {
		return
	}
	name := vars["name"]
	n, last, ok := pageParams(w, r)
	if !ok {
		return
	}
	tags, err := s.tags(r.Context(), t)
	if err != nil {
		s.upstreamFailure(w, err, v2.ErrorCodeNameUnknown)
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

// tags returns the full, sorted tag list. berth fetches every page from
// the upstream and paginates itself, so n and last behave the same whatever
// the upstream does with them. Without the upstream, the tags berth has
// cached are the answer.
func (s *Server) tags(ctx context.Context, t target) ([]string, error) {
	cfg, _ := s.config()
	key := t.up.host + "/" + t.repo
	if v, ok := s.tagLists.Load(key); ok && time.Since(v.(tagList).fetched) < cfg.TagTTL.D() {
		return v.(tagList).tags, nil
	}
	ctx, cancel := context.WithTimeout(ctx, upstreamFetchTimeout)
	defer cancel()
	tags, err := s.fetchTags(ctx, t)
	if err != nil {
		ue, ok := asUpstreamError(err)
		if cached, cerr := s.local.Tags(t.up.host, t.repo); cerr == nil && (!ok || ue.unavailable()) {
			sort.Strings(cached)
			return cached, nil
		}
		return nil, err
	}
	sort.Strings(tags)
	tags = slices.Compact(tags)
	s.tagLists.Store(key, tagList{tags: tags, fetched: time.Now()})
	return tags, nil
}

func (s *Server) fetchTags(ctx context.Context, t target) ([]string, error) {
	var all []string
	next := t.up.url(t.repo, "tags", "list")
	for page := 0; next != "" && page < maxTagPages; page++ {
		resp, err := s.upstreamDo(ctx, t.up, t.repo, "tags", http.MethodGet, next, nil)
		if err != nil {
			return nil, err
		}
		var body struct {
			Tags []string `json:"tags"`
		}
		err = json.NewDecoder(http.MaxBytesReader(nil, resp.Body, 16<<20)).Decode(&body)
		resp.Body.Close()
		if err != nil {
			return nil, &upstreamError{host: t.up.host, err: fmt.Errorf("tag list: %w", err)}
		}
		all = append(all, body.Tags...)
		next = nextFromLink(resp, t.up.endpoint)
	}
	return all, nil
}

// nextFromLink follows an RFC 5988 Link: <...>; rel="next" header.
func nextFromLink(resp *http.Response, base *url.URL) string {
	link := resp.Header.Get("Link")
	if link == "" {
		return ""
	}
	start, end := -1, -1
	for i, c := range link {
		if c == '<' && start < 0 {
			start = i + 1
		}
		if c == '>' && start >= 0 {
			end = i
			break
		}
	}
	if start < 0 || end < start {
		return ""
	}
	ref, err := url.Parse(link[start:end])
	if err != nil {
		return ""
	}
	return base.ResolveReference(ref).String()
}

func (s *Server) serveCatalog(w http.ResponseWriter, r *http.Request) {
	if !s.methodAllowed(w, r) {
		return
	}
	n, last, ok := pageParams(w, r)
	if !ok {
		return
	}
	cfg, _ := s.config()
	pairs, err := s.local.Repositories()
	if err != nil {
		serveError(w, errcode.ErrorCodeUnknown.WithMessage(err.Error()))
		return
	}
	// Names as a client would ask for them: plain for the default upstream,
	// prefixed by the registry host for the others.
	names := make([]string, 0, len(pairs))
	for _, p := range pairs {
		if p[0] == cfg.DefaultUpstream {
			names = append(names, p[1])
		} else {
			names = append(names, p[0]+"/"+p[1])
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

package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"time"
)

type tagList struct {
	tags    []string
	fetched time.Time
}

// maxTagPages bounds how many pages of an upstream tag list berth follows.
const maxTagPages = 100

// Tags returns repo's full, sorted tag list. berth fetches every page from
// the upstream so callers can paginate it as they like; without the
// upstream, the tags berth has cached are the answer.
func (e *Engine) Tags(ctx context.Context, repo Repo) ([]string, error) {
	cfg, _ := e.config()
	key := repo.String()
	if v, ok := e.tagLists.get(key); ok && time.Since(v.fetched) < cfg.TagTTL.D() {
		return v.tags, nil
	}
	up, err := e.upstreamOf(repo)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, upstreamFetchTimeout)
	defer cancel()
	tags, err := e.fetchTags(ctx, up, repo.Name)
	if err != nil {
		ue, ok := asUpstreamError(err)
		if cached, cerr := e.local.Tags(repo.Upstream, repo.Name); cerr == nil && (!ok || ue.Unavailable()) {
			sort.Strings(cached)
			return cached, nil
		}
		return nil, err
	}
	sort.Strings(tags)
	tags = slices.Compact(tags)
	e.tagLists.put(key, tagList{tags: tags, fetched: time.Now()})
	return tags, nil
}

func (e *Engine) fetchTags(ctx context.Context, up *upstream, repo string) ([]string, error) {
	var all []string
	next := up.url(repo, "tags", "list")
	for page := 0; next != "" && page < maxTagPages; page++ {
		resp, err := e.upstreamDo(ctx, up, repo, "tags", http.MethodGet, next, nil)
		if err != nil {
			return nil, err
		}
		var body struct {
			Tags []string `json:"tags"`
		}
		err = json.NewDecoder(http.MaxBytesReader(nil, resp.Body, 16<<20)).Decode(&body)
		resp.Body.Close()
		if err != nil {
			return nil, &UpstreamError{Host: up.host, err: fmt.Errorf("tag list: %w", err)}
		}
		all = append(all, body.Tags...)
		next = nextFromLink(resp, up.endpoint)
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

// Catalog lists the repositories with a cached tag.
func (e *Engine) Catalog() ([]Repo, error) {
	pairs, err := e.local.Repositories()
	if err != nil {
		return nil, err
	}
	out := make([]Repo, 0, len(pairs))
	for _, p := range pairs {
		out = append(out, Repo{Upstream: p[0], Name: p[1]})
	}
	return out, nil
}

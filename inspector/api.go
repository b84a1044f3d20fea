package inspector

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"path"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/engine"
)

// Routes the inspector serves; serve mounts each on the registry listener.
var Routes = []string{
	"/berth/v1/repositories", "/berth/v1/images/", "/berth/v1/webhooks", "/berth/v1/scaler",
	"/v1/images/", "/ui/",
}

// Handler serves the JSON API and the pages.
func (i *Inspector) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /berth/v1/repositories", i.serveRepositories)
	mux.HandleFunc("GET /berth/v1/images/{ref...}", i.serveImage)
	mux.HandleFunc("GET /berth/v1/webhooks", i.serveWebhooks)
	mux.HandleFunc("GET /berth/v1/scaler", i.serveScaler)
	mux.HandleFunc("GET /v1/images/{name...}", i.serveMicroBadger)
	i.pages(mux)
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// apiError answers with {"error": ..., "kind": ...} and the status the
// engine's error kind calls for.
func apiError(w http.ResponseWriter, err error) {
	kind := engine.KindOf(err)
	status := http.StatusInternalServerError
	switch kind {
	case engine.KindNotFound, engine.KindUnknownRegistry:
		status = http.StatusNotFound
	case engine.KindInvalidName, engine.KindInvalidReference:
		status = http.StatusBadRequest
	case engine.KindRateLimited:
		status = http.StatusTooManyRequests
	case engine.KindDenied:
		status = http.StatusForbidden
	case engine.KindUnavailable:
		status = http.StatusBadGateway
	}
	if errors.Is(err, context.DeadlineExceeded) {
		status = http.StatusGatewayTimeout
	}
	writeJSON(w, status, map[string]string{"error": err.Error(), "kind": string(kind)})
}

func (i *Inspector) serveRepositories(w http.ResponseWriter, r *http.Request) {
	repos, err := i.Repositories()
	if err != nil {
		apiError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"repositories": repos})
}

// parseRef splits upstream/name:tag or upstream/name@digest; a reference
// with neither is :latest.
func parseRef(ref string) (registry, name, tagOrDigest string, err error) {
	rest := ref
	if at := strings.LastIndex(rest, "@"); at >= 0 {
		rest, tagOrDigest = rest[:at], rest[at+1:]
	} else if c := strings.LastIndex(rest, ":"); c > strings.LastIndex(rest, "/") {
		rest, tagOrDigest = rest[:c], rest[c+1:]
	} else {
		tagOrDigest = "latest"
	}
	registry, name, ok := strings.Cut(rest, "/")
	if !ok || registry == "" || name == "" {
		return "", "", "", &engine.Error{Kind: engine.KindInvalidName, Msg: "want UPSTREAM/NAME:TAG or UPSTREAM/NAME@DIGEST, e.g. docker.io/library/alpine:3.20, not " + ref}
	}
	return registry, name, tagOrDigest, nil
}

func (i *Inspector) resolveRef(ref string) (engine.Repo, string, error) {
	registry, name, tod, err := parseRef(ref)
	if err != nil {
		return engine.Repo{}, "", err
	}
	repo, err := i.eng.Resolve(registry, name)
	return repo, tod, err
}

func (i *Inspector) serveImage(w http.ResponseWriter, r *http.Request) {
	repo, ref, err := i.resolveRef(r.PathValue("ref"))
	if err != nil {
		apiError(w, err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	v, err := i.Image(ctx, repo, ref)
	if err != nil {
		apiError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (i *Inspector) serveWebhooks(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"webhooks": i.Webhooks(), "deliveries": i.Deliveries()})
}

func (i *Inspector) serveScaler(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, i.Feed())
}

// MicroBadger's answers, field for field as its API encoded them: the
// Image and ImageVersion types of github.com/microscaling/microbadger,
// database/interface.go, with the tags given there, as api/image.go
// (handleGetImage, updateInspectedImage, getLatestFromVersion) filled
// them. Its Go client (api/api.go and api/interface.go at 63d3a9d, the
// revision Microscaling vendors for its label mode) decodes the times into
// time.Time, so they are always RFC 3339, never empty.
type mbImage struct {
	ID            string            `json:"Id,omitempty"` // the SHA of the version the top-level fields describe
	ImageName     string            `json:"ImageName,omitempty"`
	ImageURL      string            `json:"ImageURL,omitempty"`
	Author        string            `json:"Author,omitempty"`
	Description   string            `json:"Description,omitempty"`
	LatestSHA     string            `json:"LatestSHA"`
	LatestVersion string            `json:"LatestVersion,omitempty"`
	UpdatedAt     time.Time         `json:"UpdatedAt"`   // when the version was inspected
	LastUpdated   time.Time         `json:"LastUpdated"` // when the latest version was created
	PullCount     int               `json:"PullCount"`   // Docker Hub's counts: berth has none, 0
	StarCount     int               `json:"StarCount"`
	Labels        map[string]string `json:"Labels,omitempty"`
	LayerCount    int               `json:"LayerCount,omitempty"`
	DownloadSize  int64             `json:"DownloadSize,omitempty"`
	Versions      []mbVersion       `json:"Versions,omitempty"`
	// Microscaling is berth's addition: the com.microscaling.* labels of
	// the version shown, parsed.
	Microscaling *Microscaling `json:"Microscaling,omitempty"`
}

type mbVersion struct {
	SHA            string            `json:"SHA"`
	Tags           []TagRef          `json:"Tags"`
	ImageName      string            `json:"ImageName"`
	Author         string            `json:"Author"`
	Labels         map[string]string `json:"Labels,omitempty"`
	LayerCount     int               `json:"LayerCount"`
	DownloadSize   int64             `json:"DownloadSize"`
	Created        time.Time         `json:"Created"`
	Layers         []mbLayer         `json:"Layers,omitempty"`
	License        *mbLicense        `json:"License,omitempty"`
	VersionControl *mbVCS            `json:"VersionControl,omitempty"`
	Platform       string            `json:"Platform,omitempty"` // berth: the platform shown, for an index

	inspected   time.Time
	description string
}

type mbLayer struct {
	BlobSum      string `json:"BlobSum"`
	Command      string `json:"Command"`
	DownloadSize int64  `json:"DownloadSize"`
}

type mbLicense struct {
	Code string `json:"Code,omitempty"`
	URL  string `json:"URL,omitempty"`
}

type mbVCS struct {
	Type   string `json:"Type"`
	URL    string `json:"URL"`
	Commit string `json:"Commit"`
}

// maxVersions bounds the cached digests a MicroBadger answer inspects.
const maxVersions = 50

// serveMicroBadger answers MicroBadger's routes: /v1/images/IMAGE (a
// Docker Hub official image), /v1/images/NAMESPACE/IMAGE, either with
// :TAG (the top-level fields then describe that tag's version), and
// /v1/images/NAMESPACE/IMAGE/version/SHA (one version).
func (i *Inspector) serveMicroBadger(w http.ResponseWriter, r *http.Request) {
	name, tag, sha, err := parseMicroBadgerPath(r.PathValue("name"))
	if err != nil {
		apiError(w, err)
		return
	}
	repo, err := i.eng.Resolve("", name)
	if err != nil {
		apiError(w, err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	if sha != "" {
		v, err := i.microBadgerVersion(ctx, repo, sha)
		if err != nil {
			apiError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, v)
		return
	}
	mb, err := i.MicroBadger(ctx, repo, tag)
	if err != nil {
		apiError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, mb)
}

// parseMicroBadgerPath splits NAME[:TAG] or NAME/version/SHA.
func parseMicroBadgerPath(p string) (name, tag, sha string, err error) {
	if before, after, ok := strings.Cut(p, "/version/"); ok {
		if _, err := digest.Parse(after); err != nil {
			return "", "", "", &engine.Error{Kind: engine.KindInvalidReference, Msg: err.Error()}
		}
		return before, "", after, nil
	}
	if c := strings.LastIndex(p, ":"); c > strings.LastIndex(p, "/") {
		if c == len(p)-1 {
			return "", "", "", &engine.Error{Kind: engine.KindInvalidReference, Msg: "empty tag in " + p}
		}
		return p[:c], p[c+1:], "", nil
	}
	return p, "", "", nil
}

// mbName is MicroBadger's ImageName: without library/ for Docker Hub's
// official images (api/image.go), prefixed with the registry elsewhere.
func mbName(upstream, repo string) string {
	return strings.TrimPrefix(imageName(upstream, repo), "library/")
}

// microBadgerVersion builds one version: the image of a digest (for an
// index, this node's platform).
func (i *Inspector) microBadgerVersion(ctx context.Context, repo engine.Repo, ds string) (mbVersion, error) {
	d, err := digest.Parse(ds)
	if err != nil {
		return mbVersion{}, &engine.Error{Kind: engine.KindInvalidReference, Msg: err.Error()}
	}
	rec, err := i.Inspect(ctx, repo, d)
	if err != nil {
		return mbVersion{}, err
	}
	v := i.view(rec)
	img, platform := v.Image, ""
	if v.Index != nil {
		if p := nodePlatform(v); p != nil {
			img, platform = p.Image, p.Platform()
		}
	}
	ver := mbVersion{SHA: ds, Tags: []TagRef{}, ImageName: mbName(repo.Upstream, repo.Name), Platform: platform, inspected: rec.Inspected}
	for _, t := range i.tags(repo) {
		if t.Digest == ds {
			ver.Tags = append(ver.Tags, TagRef{t.Tag})
		}
	}
	if img == nil {
		return ver, nil
	}
	ver.Author = img.Author
	if len(img.Labels) > 0 {
		ver.Labels = img.Labels
	}
	ver.LayerCount = len(img.Layers)
	ver.DownloadSize = img.DownloadSize
	if img.Created != nil {
		ver.Created = img.Created.UTC()
	}
	for _, l := range img.Layers {
		ver.Layers = append(ver.Layers, mbLayer{BlobSum: l.Digest, Command: l.Command, DownloadSize: l.Size})
	}
	if lic := img.Annotations["org.opencontainers.image.licenses"]; lic != "" {
		ver.License = &mbLicense{Code: lic}
	}
	ver.VersionControl = versionControl(img)
	ver.description = img.Annotations["org.opencontainers.image.description"]
	return ver, nil
}

// versionControl is MicroBadger's VersionControl (inspector/labels.go):
// a git repository's URL and commit, a GitHub URL turned into the link to
// the commit's tree. MicroBadger showed only GitHub; berth shows any
// repository the source annotation (or vcs-url label) names.
func versionControl(img *Image) *mbVCS {
	src := img.Annotations["org.opencontainers.image.source"]
	if src == "" {
		return nil
	}
	vcs := &mbVCS{Type: img.Labels["org.label-schema.vcs-type"], URL: src, Commit: img.Annotations["org.opencontainers.image.revision"]}
	if vcs.Type != "" && !strings.EqualFold(vcs.Type, "git") {
		return vcs
	}
	vcs.Type = "git"
	if vcs.Commit != "" && strings.Contains(vcs.URL, "github.com") {
		u := strings.TrimSuffix(strings.Replace(vcs.URL, "git@github.com:", "https://github.com/", 1), ".git")
		if pu, err := url.Parse(u); err == nil {
			pu.Path = path.Join(pu.Path, "tree", vcs.Commit)
			vcs.URL = pu.String()
		}
	}
	return vcs
}

// MicroBadger builds MicroBadger's answer for a repository from the tags
// this host has cached: one version per digest. With tag, that tag (as a
// pull resolves it) is the version the top-level fields describe;
// without, the latest.
func (i *Inspector) MicroBadger(ctx context.Context, repo engine.Repo, tag string) (*mbImage, error) {
	want := ""
	if tag != "" {
		m, err := i.eng.Manifest(ctx, repo, tag, nil)
		if err != nil {
			return nil, err
		}
		want = m.Digest.String()
	}
	tags := i.tags(repo)
	if len(tags) == 0 {
		return nil, &engine.Error{Kind: engine.KindNotFound, Msg: "no tag of " + repo.String() + " is cached on this berth"}
	}
	checked := map[string]time.Time{}
	for _, t := range tags {
		if t.Checked.After(checked[t.Digest]) {
			checked[t.Digest] = t.Checked
		}
	}
	digests := make([]string, 0, len(checked))
	for d := range checked {
		digests = append(digests, d)
	}
	sort.Slice(digests, func(a, b int) bool { return checked[digests[a]].After(checked[digests[b]]) })
	if len(digests) > maxVersions {
		digests = digests[:maxVersions]
	}
	if want != "" && !slices.Contains(digests, want) {
		digests = append(digests, want)
	}
	out := &mbImage{ImageName: mbName(repo.Upstream, repo.Name), ImageURL: "/ui/image/" + repo.Upstream + "/" + repo.Name}
	latest, shown := -1, -1 // indices in out.Versions
	for _, ds := range digests {
		ver, err := i.microBadgerVersion(ctx, repo, ds)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			continue
		}
		out.Versions = append(out.Versions, ver)
		k := len(out.Versions) - 1
		// The latest tag wins; without one, the most recently created version.
		if latest < 0 || hasTag(&ver, "latest") || (!hasTag(&out.Versions[latest], "latest") && ver.Created.After(out.Versions[latest].Created)) {
			latest = k
		}
		if ds == want {
			shown = k
		}
	}
	if latest < 0 || (want != "" && shown < 0) {
		return nil, &engine.Error{Kind: engine.KindNotFound, Msg: "no version of " + repo.String() + " could be inspected"}
	}
	if shown < 0 {
		shown = latest
	}
	out.LatestSHA = out.Versions[latest].SHA
	out.LastUpdated = out.Versions[latest].Created
	v := out.Versions[shown]
	out.ID = v.SHA
	out.Author = v.Author
	out.Labels = v.Labels
	out.LayerCount = v.LayerCount
	out.DownloadSize = v.DownloadSize
	out.LatestVersion = longestTag(v.Tags)
	out.UpdatedAt = v.inspected.UTC()
	out.Description = v.description
	out.Microscaling = microscaling(v.Labels)
	return out, nil
}

// longestTag is MicroBadger's LatestVersion (api/api.go, getLongestTag):
// the version's longest tag, "latest" only when it has no other.
func longestTag(tags []TagRef) string {
	longest, hasLatest := "", false
	for _, t := range tags {
		if t.Tag == "latest" {
			hasLatest = true
		} else if len(t.Tag) > len(longest) {
			longest = t.Tag
		}
	}
	if longest == "" && hasLatest {
		return "latest"
	}
	return longest
}

func hasTag(v *mbVersion, tag string) bool {
	for _, t := range v.Tags {
		if t.Tag == tag {
			return true
		}
	}
	return false
}

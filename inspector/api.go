package inspector

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
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

// MicroBadger's /v1/images/{namespace}/{image} answer, field for field.
type mbImage struct {
	ImageName     string            `json:"ImageName"`
	ImageURL      string            `json:"ImageURL"`
	Author        string            `json:"Author"`
	LatestSHA     string            `json:"LatestSHA"`
	LatestVersion string            `json:"LatestVersion"`
	LastUpdated   string            `json:"LastUpdated"`
	Labels        map[string]string `json:"Labels"`
	LabelCount    int               `json:"LabelCount"`
	LayerCount    int               `json:"LayerCount"`
	DownloadSize  int64             `json:"DownloadSize"`
	Versions      []mbVersion       `json:"Versions"`
	// Microscaling is berth's addition: the com.microscaling.* labels of
	// the latest version, parsed.
	Microscaling *Microscaling `json:"Microscaling,omitempty"`
}

type mbVersion struct {
	SHA                string            `json:"SHA"`
	Tags               []TagRef          `json:"Tags"`
	ImageName          string            `json:"ImageName"`
	Author             string            `json:"Author"`
	Labels             map[string]string `json:"Labels"`
	LabelCount         int               `json:"LabelCount"`
	LayerCount         int               `json:"LayerCount"`
	DownloadSize       int64             `json:"DownloadSize"`
	Created            string            `json:"Created"`
	LabelSchemaVersion string            `json:"LabelSchemaVersion,omitempty"`
	Layers             []mbLayer         `json:"Layers"`
	License            *mbLicense        `json:"License,omitempty"`
	VersionControl     *mbVCS            `json:"VersionControl,omitempty"`
	Platform           string            `json:"Platform,omitempty"` // berth: the platform shown, for an index
}

type mbLayer struct {
	BlobSum      string `json:"BlobSum"`
	Command      string `json:"Command"`
	DownloadSize int64  `json:"DownloadSize"`
}

type mbLicense struct {
	Code string `json:"Code"`
	URL  string `json:"URL"`
}

type mbVCS struct {
	Type   string `json:"Type"`
	URL    string `json:"URL"`
	Commit string `json:"Commit"`
}

// maxVersions bounds the cached digests a MicroBadger answer inspects.
const maxVersions = 50

func (i *Inspector) serveMicroBadger(w http.ResponseWriter, r *http.Request) {
	repo, err := i.eng.Resolve("", r.PathValue("name"))
	if err != nil {
		apiError(w, err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	mb, err := i.MicroBadger(ctx, repo)
	if err != nil {
		apiError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, mb)
}

// MicroBadger builds MicroBadger's answer for a repository from the tags
// this host has cached: one version per digest.
func (i *Inspector) MicroBadger(ctx context.Context, repo engine.Repo) (*mbImage, error) {
	tags := i.tags(repo)
	if len(tags) == 0 {
		return nil, &engine.Error{Kind: engine.KindNotFound, Msg: "no tag of " + repo.String() + " is cached on this berth"}
	}
	byDigest := map[string][]string{}
	checked := map[string]time.Time{}
	for _, t := range tags {
		byDigest[t.Digest] = append(byDigest[t.Digest], t.Tag)
		if t.Checked.After(checked[t.Digest]) {
			checked[t.Digest] = t.Checked
		}
	}
	digests := make([]string, 0, len(byDigest))
	for d := range byDigest {
		digests = append(digests, d)
	}
	sort.Slice(digests, func(a, b int) bool { return checked[digests[a]].After(checked[digests[b]]) })
	if len(digests) > maxVersions {
		digests = digests[:maxVersions]
	}
	name := imageName(repo.Upstream, repo.Name)
	out := &mbImage{ImageName: name, ImageURL: "/ui/image/" + repo.Upstream + "/" + repo.Name, Labels: map[string]string{}, Versions: []mbVersion{}}
	latest := -1 // index in out.Versions
	var latestCreated time.Time
	for _, ds := range digests {
		d, err := digest.Parse(ds)
		if err != nil {
			continue
		}
		rec, err := i.Inspect(ctx, repo, d)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			continue
		}
		v := i.view(rec)
		img, platform := v.Image, ""
		if v.Index != nil {
			if p := nodePlatform(v); p != nil {
				img, platform = p.Image, p.Platform()
			}
		}
		ver := mbVersion{SHA: ds, Tags: []TagRef{}, ImageName: name, Labels: map[string]string{}, Layers: []mbLayer{}, Platform: platform}
		sort.Strings(byDigest[ds])
		for _, t := range byDigest[ds] {
			ver.Tags = append(ver.Tags, TagRef{t})
		}
		var created time.Time
		if img != nil {
			ver.Author = img.Author
			if img.Labels != nil {
				ver.Labels = img.Labels
			}
			ver.LabelCount = len(img.Labels)
			ver.LayerCount = len(img.Layers)
			ver.DownloadSize = img.DownloadSize
			if img.Created != nil {
				created = *img.Created
				ver.Created = created.Format(time.RFC3339)
			}
			ver.LabelSchemaVersion = img.Labels["org.label-schema.schema-version"]
			for _, l := range img.Layers {
				ver.Layers = append(ver.Layers, mbLayer{BlobSum: l.Digest, Command: l.Command, DownloadSize: l.Size})
			}
			if lic := img.Annotations["org.opencontainers.image.licenses"]; lic != "" {
				ver.License = &mbLicense{Code: lic}
			}
			if src := img.Annotations["org.opencontainers.image.source"]; src != "" {
				ver.VersionControl = &mbVCS{Type: "git", URL: src, Commit: img.Annotations["org.opencontainers.image.revision"]}
			}
		}
		out.Versions = append(out.Versions, ver)
		isLatest := false
		for _, t := range byDigest[ds] {
			if t == "latest" {
				isLatest = true
			}
		}
		// The latest tag wins; without one, the most recently created version.
		if latest < 0 || isLatest || (!hasTag(&out.Versions[latest], "latest") && created.After(latestCreated)) {
			latest, latestCreated = len(out.Versions)-1, created
		}
	}
	if latest < 0 {
		return nil, &engine.Error{Kind: engine.KindNotFound, Msg: "no version of " + repo.String() + " could be inspected"}
	}
	l := out.Versions[latest]
	out.LatestSHA = l.SHA
	out.LatestVersion = l.Labels["org.opencontainers.image.version"]
	if out.LatestVersion == "" {
		out.LatestVersion = l.Labels["org.label-schema.version"]
	}
	if out.LatestVersion == "" && len(l.Tags) > 0 {
		out.LatestVersion = l.Tags[0].Tag
	}
	out.LastUpdated = l.Created
	out.Author = l.Author
	out.Labels = l.Labels
	out.LabelCount = l.LabelCount
	out.LayerCount = l.LayerCount
	out.DownloadSize = l.DownloadSize
	out.Microscaling = microscaling(l.Labels)
	return out, nil
}

func hasTag(v *mbVersion, tag string) bool {
	for _, t := range v.Tags {
		if t.Tag == tag {
			return true
		}
	}
	return false
}

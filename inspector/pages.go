package inspector

import (
	"context"
	"embed"
	"fmt"
	"html/template"
	"net/http"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/healthcheck"
	"github.com/berth-dev/berth/inspector/web"
)

//go:embed web/templates/*.html
var templateFS embed.FS

// funcs are the inspector's own, beside web.Funcs.
var funcs = template.FuncMap{
	"maxLayer": func(ls []Layer) int64 {
		var m int64
		for _, l := range ls {
			m = max(m, l.Size)
		}
		return m
	},
	"last": func(as []Attempt) *Attempt {
		if len(as) == 0 {
			return nil
		}
		return &as[len(as)-1]
	},
}

// templates: one per page, each with the layout.
var templates = func() map[string]*template.Template {
	out := map[string]*template.Template{}
	for _, page := range []string{"images", "image", "webhooks", "node"} {
		out[page] = web.Parse(page, funcs, templateFS, "web/templates/"+page+".html")
	}
	return out
}()

// nav is the inspector pages' navigation bar.
var nav = []web.Link{{Href: "/ui/", Text: "Images"}, {Href: "/ui/webhooks", Text: "Webhooks"}, {Href: "/ui/node", Text: "Node"}}

type page struct {
	Title  string
	Ref    string
	Data   any
	Images []pageImage
	Nav    []web.Link
}

type pageImage struct {
	Title string
	Image *Image
}

func (i *Inspector) render(w http.ResponseWriter, status int, name string, p page) {
	p.Nav = nav
	web.Render(w, status, templates[name], p)
}

func (i *Inspector) pages(mux *http.ServeMux) {
	mux.Handle("GET "+web.StaticPrefix, web.Static())
	mux.HandleFunc("GET /ui/{$}", i.pageImages)
	mux.HandleFunc("GET /ui/image/{ref...}", i.pageImage)
	mux.HandleFunc("GET /ui/webhooks", i.pageWebhooks)
	mux.HandleFunc("GET /ui/node", i.pageNode)
	mux.HandleFunc("GET /ui", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/ui/", http.StatusMovedPermanently) })
}

type listedTag struct {
	TagInfo
	Inspected bool
	Size      int64
	Kind      string
}

type listedRepo struct {
	Upstream, Repository string
	Tags                 []listedTag
}

func (i *Inspector) pageImages(w http.ResponseWriter, r *http.Request) {
	repos, err := i.Repositories()
	if err != nil {
		i.pageError(w, err)
		return
	}
	var out []listedRepo
	for _, rp := range repos {
		lr := listedRepo{Upstream: rp.Upstream, Repository: rp.Repository}
		for _, t := range rp.Tags {
			lt := listedTag{TagInfo: t}
			if d, err := digest.Parse(t.Digest); err == nil {
				if rec, ok := i.lookup(r.Context(), rp.Upstream, d); ok {
					v := i.view(rec)
					lt.Inspected, lt.Size, lt.Kind = true, v.DownloadSize, rec.Kind
				}
			}
			lr.Tags = append(lr.Tags, lt)
		}
		out = append(out, lr)
	}
	i.render(w, http.StatusOK, "images", page{Title: "Images", Data: out})
}

func (i *Inspector) pageImage(w http.ResponseWriter, r *http.Request) {
	ref := r.PathValue("ref")
	repo, tod, err := i.resolveRef(ref)
	if err != nil {
		i.pageError(w, err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	v, err := i.Image(ctx, repo, tod)
	if err != nil {
		i.pageError(w, err)
		return
	}
	p := page{Title: ref, Ref: ref, Data: v}
	if v.Image != nil {
		p.Images = append(p.Images, pageImage{Title: "Image", Image: v.Image})
	}
	for _, pl := range v.Platforms {
		if pl.Image != nil {
			p.Images = append(p.Images, pageImage{Title: "Platform " + pl.Platform(), Image: pl.Image})
		}
	}
	i.render(w, http.StatusOK, "image", p)
}

func (i *Inspector) pageWebhooks(w http.ResponseWriter, r *http.Request) {
	i.render(w, http.StatusOK, "webhooks", page{Title: "Webhooks", Data: map[string]any{"Webhooks": i.Webhooks(), "Deliveries": i.Deliveries()}})
}

type nodeData struct {
	CacheBytes, CacheBudget int64
	CacheBlobs              int
	Feed                    Feed
	Health                  *healthcheck.Report
}

func (i *Inspector) pageNode(w http.ResponseWriter, r *http.Request) {
	d := nodeData{Feed: i.Feed(), CacheBudget: i.local.Budget()}
	d.CacheBytes, d.CacheBlobs = i.local.Usage()
	if i.o.Health != nil {
		rep := i.o.Health.Report()
		d.Health = &rep
	}
	i.render(w, http.StatusOK, "node", page{Title: "Node", Data: d})
}

func (i *Inspector) pageError(w http.ResponseWriter, err error) {
	rec := &statusRecorder{}
	apiError(rec, err)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(rec.status)
	fmt.Fprintln(w, err.Error())
}

type statusRecorder struct {
	status int
	h      http.Header
}

func (s *statusRecorder) Header() http.Header {
	if s.h == nil {
		s.h = http.Header{}
	}
	return s.h
}
func (s *statusRecorder) Write(b []byte) (int, error) { return len(b), nil }
func (s *statusRecorder) WriteHeader(c int)           { s.status = c }

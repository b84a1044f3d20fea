package inspector

import (
	"bytes"
	"context"
	"embed"
	"encoding/json"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/healthcheck"
)

//go:embed web/templates/*.html
var templateFS embed.FS

//go:embed web/static
var staticFS embed.FS

var funcs = template.FuncMap{
	"short": func(d string) string {
		if pd, err := digest.Parse(d); err == nil && len(pd.Encoded()) > 12 {
			return string(pd.Algorithm()) + ":" + pd.Encoded()[:12]
		}
		return d
	},
	"bytes": humanBytes,
	"when": func(t any) string {
		switch v := t.(type) {
		case time.Time:
			if v.IsZero() {
				return ""
			}
			return v.UTC().Format("2006-01-02 15:04:05 UTC")
		case *time.Time:
			if v == nil {
				return ""
			}
			return v.UTC().Format("2006-01-02 15:04:05 UTC")
		}
		return fmt.Sprint(t)
	},
	"json": func(v any) string { b, _ := json.Marshal(v); return string(b) },
	"inc":  func(n int) int { return n + 1 },
	"pct": func(n, of int64) string {
		if of <= 0 {
			return "0"
		}
		return fmt.Sprintf("%.1f", min(100, 100*float64(n)/float64(of)))
	},
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
	"int64": func(f float64) int64 { return int64(f) },
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// templates: one per page, each with the layout.
var templates = func() map[string]*template.Template {
	out := map[string]*template.Template{}
	for _, page := range []string{"images", "image", "webhooks", "node"} {
		out[page] = template.Must(template.New(page).Funcs(funcs).ParseFS(templateFS, "web/templates/layout.html", "web/templates/"+page+".html"))
	}
	return out
}()

type page struct {
	Title  string
	Ref    string
	Data   any
	Images []pageImage
}

type pageImage struct {
	Title string
	Image *Image
}

func (i *Inspector) render(w http.ResponseWriter, status int, name string, p page) {
	var buf bytes.Buffer
	if err := templates[name].ExecuteTemplate(&buf, "layout", p); err != nil {
		http.Error(w, "template: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	// No script runs on these pages: a label that tries is text, and
	// would be refused anyway.
	w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

func (i *Inspector) pages(mux *http.ServeMux) {
	static, _ := fs.Sub(staticFS, "web/static")
	mux.Handle("GET /ui/static/", http.StripPrefix("/ui/static/", http.FileServerFS(static)))
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

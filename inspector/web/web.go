// Package web is what berth's pages share, the inspector's on every node
// and the coordinator's fleet page: the layout, the style sheet and icon,
// the template functions that format sizes, digests and times, and how a
// page is answered. Pages are rendered on the server by html/template, so
// every string a user controls (a label, an image reference) is escaped,
// and the answer's Content-Security-Policy lets no script run at all.
package web

import (
	"bytes"
	"embed"
	"encoding/json"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"time"

	"github.com/opencontainers/go-digest"
)

//go:embed templates/layout.html
var layoutFS embed.FS

//go:embed static
var staticFS embed.FS

// StaticPrefix is where every page expects the style sheet and icon.
const StaticPrefix = "/ui/static/"

// Link is one entry of a page's navigation bar.
type Link struct{ Href, Text string }

// Funcs are the formatting functions every page's templates may use.
var Funcs = template.FuncMap{
	"short": func(d string) string {
		if pd, err := digest.Parse(d); err == nil && len(pd.Encoded()) > 12 {
			return string(pd.Algorithm()) + ":" + pd.Encoded()[:12]
		}
		return d
	},
	"bytes": Bytes,
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
	"int64": func(f float64) int64 { return int64(f) },
}

// Bytes formats a size in binary units: 1.5 MiB.
func Bytes(n int64) string {
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

// Parse builds one page: the shared layout, which calls the page's
// "content" template, and the page's files from fsys. extra adds or
// overrides functions for this page.
func Parse(name string, extra template.FuncMap, fsys fs.FS, patterns ...string) *template.Template {
	t := template.New(name).Funcs(Funcs).Funcs(extra)
	t = template.Must(t.ParseFS(layoutFS, "templates/layout.html"))
	return template.Must(t.ParseFS(fsys, patterns...))
}

// Static serves the style sheet and icon; mount it at StaticPrefix.
func Static() http.Handler {
	sub, _ := fs.Sub(staticFS, "static")
	return http.StripPrefix(StaticPrefix, http.FileServerFS(sub))
}

// Render answers with t's layout executed over data, which the layout
// reads .Title and .Nav from. A template error is a 500, never half a page.
func Render(w http.ResponseWriter, status int, t *template.Template, data any) {
	var buf bytes.Buffer
	if err := t.ExecuteTemplate(&buf, "layout", data); err != nil {
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

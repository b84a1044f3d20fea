package mirror

import (
	"bytes"
	"net/http"
	"strings"
	"time"

	v2 "github.com/distribution/distribution/v3/registry/api/v2"

	"github.com/berth-dev/berth/engine"
)

func (s *Server) routeManifest(w *responseWriter, r *http.Request) {
	repo, vars, ok := s.readTarget(w, r)
	if !ok {
		return
	}
	ref := vars["reference"]
	if strings.Contains(ref, ":") {
		if _, ok := parseDigest(w, ref); !ok {
			return
		}
	}
	m, err := s.eng.Manifest(r.Context(), repo, ref, r.Header.Values("Accept"))
	if err != nil {
		if r.Context().Err() == nil {
			s.engineError(w, err, v2.ErrorCodeManifestUnknown)
		}
		return
	}
	writeManifest(w, r, m)
}

func writeManifest(w *responseWriter, r *http.Request, m engine.Manifest) {
	h := w.Header()
	if m.Stale != "" {
		h.Set("Warning", `110 berth "Response is Stale"`)
		h.Set("Berth-Stale", "true")
	}
	h.Set("Content-Type", m.MediaType)
	h.Set("Docker-Content-Digest", m.Digest.String())
	h.Set("ETag", `"`+m.Digest.String()+`"`)
	// berth stores a manifest before it serves it: its bytes are local.
	w.source = "local"
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(m.Content))
}

package mirror

import (
	"context"
	"errors"
	"io"
	"math"
	"net/http"
	"strconv"
	"time"

	v2 "github.com/distribution/distribution/v3/registry/api/v2"
	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/storage"
)

func (s *Server) routeBlob(w *responseWriter, r *http.Request) {
	repo, vars, ok := s.readTarget(w, r)
	if !ok {
		return
	}
	d, ok := parseDigest(w, vars["digest"])
	if !ok {
		return
	}
	switch {
	case r.Header.Get(engine.PeerHeader) != "":
		// Another berth: from disk or a download already running, never
		// by starting one (nor by asking the upstream), so two hosts can
		// never wait on each other.
		b, err := s.eng.PeerBlob(r.Context(), storage.Key{Upstream: repo.Upstream, Digest: d})
		if errors.Is(err, storage.ErrNotFound) {
			serveError(w, v2.ErrorCodeBlobUnknown.WithMessage("not on this berth and not downloading"))
			return
		}
		if err == nil && r.Method == http.MethodHead && !b.Seekable() {
			// A download in progress: its size, not its bytes.
			b.Close()
			blobHeaders(w, d)
			if b.Size >= 0 {
				w.Header().Set("Content-Length", strconv.FormatInt(b.Size, 10))
			}
			w.WriteHeader(http.StatusOK)
			return
		}
		s.sendBlob(w, r, b, err)
	case r.Method == http.MethodHead:
		s.headBlob(w, r, repo, d)
	default:
		b, err := s.eng.Blob(r.Context(), repo, d)
		s.sendBlob(w, r, b, err)
	}
}

// sendBlob answers with b: ranges and conditional requests when it can
// seek, the whole stream otherwise.
func (s *Server) sendBlob(w *responseWriter, r *http.Request, b *engine.Blob, err error) {
	if err != nil {
		s.engineError(w, err, v2.ErrorCodeBlobUnknown)
		return
	}
	defer b.Close()
	blobHeaders(w, b.Digest)
	w.source = b.Source
	if b.Seekable() {
		http.ServeContent(w, r, "", time.Time{}, b)
	} else {
		if b.Size >= 0 {
			w.Header().Set("Content-Length", strconv.FormatInt(b.Size, 10))
		}
		w.WriteHeader(http.StatusOK)
		w.ReadFrom(&io.LimitedReader{R: b, N: math.MaxInt64})
	}
	if err := b.Err(); err != nil && !errors.Is(err, context.Canceled) {
		// Headers are gone already: cut the connection so the client sees a
		// short body, never a complete wrong one.
		panic(http.ErrAbortHandler)
	}
}

func (s *Server) headBlob(w *responseWriter, r *http.Request, repo engine.Repo, d digest.Digest) {
	if b := s.eng.Cached(repo, d); b != nil {
		s.sendBlob(w, r, b, nil)
		return
	}
	size, err := s.eng.StatBlob(r.Context(), repo, d)
	if err != nil {
		s.engineError(w, err, v2.ErrorCodeBlobUnknown)
		return
	}
	blobHeaders(w, d)
	if size >= 0 {
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	}
	w.WriteHeader(http.StatusOK)
}

func blobHeaders(w http.ResponseWriter, d digest.Digest) {
	h := w.Header()
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Content-Type", "application/octet-stream")
	h.Set("ETag", `"`+d.String()+`"`)
	h.Set("Cache-Control", "max-age=31536000, immutable")
}

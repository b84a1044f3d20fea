package mirror

import (
	"io"
	"net/http"

	"github.com/berth-dev/berth/engine"
)

// responseWriter records what a handler answered: the status (and the
// time to it) and the body's bytes by where they came from, for metrics.
// Its ReadFrom keeps sendfile working: http.ServeContent copies through
// io.CopyN, which hands it an *io.LimitedReader around the engine's Blob,
// and the Blob sends what is on disk as a file section.
type responseWriter struct {
	http.ResponseWriter
	status   int
	onHeader func()
	source   string // local, s3, peer or upstream; "" counts no bytes
	n        int64
}

func (w *responseWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
		if w.onHeader != nil {
			w.onHeader()
		}
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *responseWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	n, err := w.ResponseWriter.Write(p)
	w.n += int64(n)
	return n, err
}

func (w *responseWriter) ReadFrom(r io.Reader) (int64, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	var n int64
	var err error
	if lr, ok := r.(*io.LimitedReader); ok {
		if b, ok := lr.R.(*engine.Blob); ok {
			n, err = b.SendTo(w.ResponseWriter, lr.N)
			lr.N -= n
			w.n += n
			return n, err
		}
	}
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(r)
	} else {
		n, err = io.Copy(struct{ io.Writer }{w.ResponseWriter}, r)
	}
	w.n += n
	return n, err
}

func (w *responseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	v2 "github.com/distribution/distribution/v3/registry/api/v2"
	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/storage"
)

func (s *Server) serveBlob(w http.ResponseWriter, r *http.Request, up *upstream, repo string, dgst digest.Digest) {
	key := storage.Key{Upstream: up.host, Digest: dgst}
	for attempt := 0; attempt < 3; attempt++ {
		if s.serveLocalBlob(w, r, key) {
			return
		}
		if r.Method == http.MethodHead {
			s.headUpstreamBlob(w, r, up, repo, dgst)
			return
		}
		if r.Header.Get(peerHeader) != "" {
			s.servePeer(w, r, key)
			return
		}
		rd, err := s.joinFlight(r.Context(), key, up, repo)
		if errors.Is(err, errCachedMeanwhile) {
			continue
		}
		if errors.Is(err, errRelayMissed) {
			s.passthrough(w, r, up, repo, dgst)
			return
		}
		if err != nil {
			s.blobError(w, err)
			return
		}
		s.serveFlight(w, r, rd, up, repo)
		return
	}
	s.blobError(w, errors.New("blob kept vanishing from the cache"))
}

// servePeer answers another berth from a download in progress (the local
// disk was tried already), and never starts one.
func (s *Server) servePeer(w http.ResponseWriter, r *http.Request, key storage.Key) {
	s.mu.Lock()
	fl, ok := s.flights[key]
	var rd *flightReader
	if ok {
		rd = fl.newReader(r.Context())
	}
	s.mu.Unlock()
	if ok && rd == nil {
		serveError(w, v2.ErrorCodeBlobUnknown.WithMessage("relayed uncached on this berth and past its start"))
		return
	}
	if !ok {
		if s.serveLocalBlob(w, r, key) { // committed since the miss
			return
		}
		serveError(w, v2.ErrorCodeBlobUnknown.WithMessage("not on this berth and not downloading"))
		return
	}
	s.serveFlight(w, r, rd, nil, "")
}

// serveLocalBlob answers a cache hit from disk with sendfile. It reports
// false on a miss.
func (s *Server) serveLocalBlob(w http.ResponseWriter, r *http.Request, key storage.Key) bool {
	return s.sendBlobFile(w, r, key, "local", func() { s.metrics.lookups.WithLabelValues("blob", "hit").Inc() })
}

// sendBlobFile serves a committed blob from disk, its bytes counted under
// label; hit runs when the blob is there.
func (s *Server) sendBlobFile(w http.ResponseWriter, r *http.Request, key storage.Key, label string, hit func()) bool {
	f, _, release, err := s.local.OpenBlob(key)
	if err != nil {
		return false
	}
	defer release()
	defer f.Close()
	if hit != nil {
		hit()
	}
	blobHeaders(w, key.Digest)
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, "", time.Time{}, f)
	s.metrics.bytesServed.WithLabelValues(label).Add(float64(cw.n))
	return true
}

func blobHeaders(w http.ResponseWriter, d digest.Digest) {
	h := w.Header()
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Content-Type", "application/octet-stream")
	h.Set("ETag", `"`+d.String()+`"`)
	h.Set("Cache-Control", "max-age=31536000, immutable")
}

var (
	errCachedMeanwhile = errors.New("blob was cached meanwhile")
	errRelayMissed     = errors.New("blob is relayed uncached and its start has gone by")
)

// joinFlight attaches the request to the blob's download, starting one if
// none runs. The download belongs to no request: a client that goes away
// does not cut it short for the others.
func (s *Server) joinFlight(ctx context.Context, key storage.Key, up *upstream, repo string) (*flightReader, error) {
	s.mu.Lock()
	if fl, ok := s.flights[key]; ok {
		rd := fl.newReader(ctx)
		s.mu.Unlock()
		if rd == nil {
			return nil, errRelayMissed
		}
		return rd, nil
	}
	// Flights leave the map only after their commit, so with the lock held
	// and no flight, a blob that landed since the miss is on disk now.
	if _, ok := s.local.HasBlob(key); ok {
		s.mu.Unlock()
		return nil, errCachedMeanwhile
	}
	fl := &flight{key: key, size: -1, started: make(chan struct{})}
	fl.cond = sync.NewCond(&fl.mu)
	s.flights[key] = fl
	rd := fl.newReader(ctx)
	s.mu.Unlock()
	s.metrics.lookups.WithLabelValues("blob", "miss").Inc()
	s.wg.Add(1)
	go s.download(fl, up, repo)
	return rd, nil
}

func (s *Server) download(fl *flight, up *upstream, repo string) {
	defer s.wg.Done()
	s.metrics.inflight.Inc()
	defer s.metrics.inflight.Dec()
	ctx := s.downloadCtx
	log := s.log.WithFields(logrus.Fields{"upstream": up.host, "repo": repo, "digest": fl.key.Digest})
	end := func(err error, release func()) {
		s.mu.Lock()
		delete(s.flights, fl.key)
		s.mu.Unlock()
		fl.finish(err, release)
	}
	src, err := s.openBlobSource(ctx, fl.key, up, repo)
	if err != nil {
		end(err, nil)
		close(fl.started)
		return
	}
	if src.lease != nil {
		defer s.keepLease(src.lease)()
	}
	w, err := s.local.CreateBlob(fl.key, src.size)
	if errors.Is(err, storage.ErrNoSpace) {
		s.relay(fl, src, up, log, end)
		return
	}
	if err == nil {
		fl.rf, err = os.Open(w.Path())
		if err != nil {
			w.Abort()
		}
	}
	if err != nil {
		src.body.Close()
		s.afterDownload(fl.key, src, err, log)
		end(err, nil)
		close(fl.started)
		return
	}
	fl.size, fl.label = src.size, src.label
	close(fl.started)
	start := time.Now()
	err = fl.run(w, src, func(n int) {
		if src.label == "upstream" {
			s.metrics.upstreamBytes.WithLabelValues(up.host).Add(float64(n))
		}
	})
	if err != nil {
		if errors.Is(err, storage.ErrDigestMismatch) {
			s.metrics.mismatches.WithLabelValues(src.label).Inc()
		}
		log.WithError(err).WithField("source", src.label).Warn("blob download failed; nothing kept")
		end(err, nil)
		s.afterDownload(fl.key, src, err, log)
		return
	}
	release, _ := s.local.Pin(fl.key)
	log.WithFields(logrus.Fields{"bytes": fl.size, "source": src.label, "seconds": time.Since(start).Seconds()}).Info("blob cached")
	end(nil, release)
	s.afterDownload(fl.key, src, nil, log)
}

// relay serves a download the disk has no room for to the clients that
// joined it, through a bounded window of memory, and caches nothing. The
// source opened for it is used, not thrown away: one fetch however many
// clients asked at once.
func (s *Server) relay(fl *flight, src source, up *upstream, log *logrus.Entry, end func(error, func())) {
	s.metrics.passthrough.Inc()
	fl.size, fl.label = src.size, src.label
	fl.startRelay()
	// What comes from the upstream also goes to the bucket, as one more
	// reader of the relay, so the fleet still fetches it once. The upload
	// only ends well if the relay verified the blob: its reader fails, and
	// the upload is aborted, on anything else.
	var uploaded chan error
	if st, ok := s.shared().(blobStreamer); ok && src.label == "upstream" {
		rd := fl.newReader(s.downloadCtx)
		uploaded = make(chan error, 1)
		go func() {
			defer rd.Close()
			uploaded <- st.PutBlobStream(s.downloadCtx, fl.key, rd)
		}()
	}
	close(fl.started)
	log.WithField("source", src.label).Warn("no room on disk for blob; relaying it to its clients uncached")
	err := fl.runRelay(src, func(n int) {
		if src.label == "upstream" {
			s.metrics.upstreamBytes.WithLabelValues(up.host).Add(float64(n))
		}
	})
	if errors.Is(err, storage.ErrDigestMismatch) {
		s.metrics.mismatches.WithLabelValues(src.label).Inc()
	}
	if err != nil && !errors.Is(err, errRelayAbandoned) {
		log.WithError(err).WithField("source", src.label).Warn("relayed blob download failed")
	}
	end(err, nil)
	if uploaded != nil {
		// The lease is released only after this, so hosts waiting on it
		// find the blob in the bucket.
		if uerr := <-uploaded; err == nil && uerr != nil {
			s.sharedFailed("put blob", uerr)
		}
	}
	// This releases the lease and deletes a corrupt bucket object; there
	// is no file for it to upload.
	s.afterDownload(fl.key, src, err, log)
}

func (s *Server) serveFlight(w http.ResponseWriter, r *http.Request, rd *flightReader, up *upstream, repo string) {
	defer rd.Close()
	fl := rd.f
	select {
	case <-fl.started:
	case <-r.Context().Done():
		return
	}
	fl.mu.Lock()
	err, size := fl.err, fl.size
	fl.mu.Unlock()
	if errors.Is(err, storage.ErrNoSpace) && up != nil {
		s.passthrough(w, r, up, repo, fl.key.Digest)
		return
	}
	if err != nil {
		s.blobError(w, err)
		return
	}
	if size < 0 && fl.relay {
		blobHeaders(w, fl.key.Digest)
		w.WriteHeader(http.StatusOK)
		cw := &countingWriter{ResponseWriter: w}
		io.Copy(cw, rd)
		s.metrics.bytesServed.WithLabelValues(fl.label).Add(float64(cw.n))
		if rd.err != nil {
			panic(http.ErrAbortHandler)
		}
		return
	}
	if size < 0 {
		// Without a length the flight cannot be seeked to its end, which
		// ServeContent needs, even when it has finished: wait for it, then
		// serve it from disk.
		// The request counted as a miss when it joined, and its bytes
		// came from the flight's source.
		io.Copy(io.Discard, rd)
		if !s.sendBlobFile(w, r, fl.key, fl.label, nil) {
			s.blobError(w, errFlightAborted)
		}
		return
	}
	blobHeaders(w, fl.key.Digest)
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, "", time.Time{}, rd)
	s.metrics.bytesServed.WithLabelValues(fl.label).Add(float64(cw.n))
	if rd.err != nil && !errors.Is(rd.err, context.Canceled) {
		// Headers are gone already: cut the connection so the client sees a
		// short body, never a complete wrong one.
		panic(http.ErrAbortHandler)
	}
}

func (s *Server) headUpstreamBlob(w http.ResponseWriter, r *http.Request, up *upstream, repo string, dgst digest.Digest) {
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	resp, err := s.upstreamDo(ctx, up, repo, "blob", http.MethodHead, up.url(repo, "blobs", dgst.String()), nil)
	if err != nil {
		s.blobError(w, err)
		return
	}
	resp.Body.Close()
	s.metrics.lookups.WithLabelValues("blob", "miss").Inc()
	blobHeaders(w, dgst)
	if resp.ContentLength >= 0 {
		w.Header().Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	}
	w.WriteHeader(http.StatusOK)
}

// passthrough streams a blob straight to one client, still verifying it:
// the last chunk is sent only once the digest matches. It serves clients
// that came too late to join a relay, from the bucket when it has the blob.
func (s *Server) passthrough(w http.ResponseWriter, r *http.Request, up *upstream, repo string, dgst digest.Digest) {
	s.metrics.passthrough.Inc()
	src, err := s.passthroughSource(r.Context(), storage.Key{Upstream: up.host, Digest: dgst}, up, repo)
	if err != nil {
		s.blobError(w, err)
		return
	}
	defer src.body.Close()
	blobHeaders(w, dgst)
	if src.size >= 0 {
		w.Header().Set("Content-Length", strconv.FormatInt(src.size, 10))
	}
	w.WriteHeader(http.StatusOK)
	n, err := verifyingCopy(w, src.body, dgst)
	if src.label == "upstream" {
		s.metrics.upstreamBytes.WithLabelValues(up.host).Add(float64(n))
	}
	s.metrics.bytesServed.WithLabelValues(src.label).Add(float64(n))
	if err != nil {
		if errors.Is(err, storage.ErrDigestMismatch) {
			s.metrics.mismatches.WithLabelValues(src.label).Inc()
		}
		panic(http.ErrAbortHandler)
	}
}

func (s *Server) passthroughSource(ctx context.Context, key storage.Key, up *upstream, repo string) (source, error) {
	if sh := s.shared(); sh != nil {
		body, size, err := sh.GetBlob(ctx, key)
		if err == nil {
			s.sharedT.avoided.WithLabelValues("blob").Inc()
			return source{body: body, size: size, label: "s3"}, nil
		}
		if !errors.Is(err, storage.ErrNotFound) {
			s.sharedFailed("get blob", err)
		}
	}
	return s.openUpstreamBlob(ctx, key, up, repo)
}

// verifyingCopy copies src to dst holding back the last chunk until the
// whole stream hashes to want.
func verifyingCopy(dst io.Writer, src io.Reader, want digest.Digest) (int64, error) {
	h := want.Algorithm().Hash() // routes only admit digests that digest.Parse accepted
	buf, held := make([]byte, 256<<10), make([]byte, 0, 256<<10)
	var total int64
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if len(held) > 0 {
				if _, werr := dst.Write(held); werr != nil {
					return total, werr
				}
			}
			held = append(held[:0], buf[:n]...)
			h.Write(buf[:n])
			total += int64(n)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return total, err
		}
	}
	if got := digest.NewDigest(want.Algorithm(), h); got != want {
		return total, fmt.Errorf("%w: want %s, got %s", storage.ErrDigestMismatch, want, got)
	}
	_, err := dst.Write(held)
	return total, err
}

func (s *Server) blobError(w http.ResponseWriter, err error) {
	s.upstreamFailure(w, err, v2.ErrorCodeBlobUnknown)
}

// upstreamFailure answers a request that could not be served from cache.
func (s *Server) upstreamFailure(w http.ResponseWriter, err error, notFound errcode.ErrorCode) {
	ue, ok := asUpstreamError(err)
	switch {
	case errors.Is(err, storage.ErrDigestMismatch):
		serveError(w, errcode.ErrorCodeUnavailable.WithMessage("upstream sent content that does not match its digest; nothing was kept"))
	case !ok:
		s.log.WithError(err).Warn("request failed")
		serveError(w, errcode.ErrorCodeUnavailable.WithMessage("berth could not serve this: "+err.Error()))
	case ue.status == http.StatusNotFound:
		serveError(w, notFound.WithMessage("not found at upstream "+ue.host))
	case ue.status == http.StatusTooManyRequests:
		if ue.retryAfter != "" {
			w.Header().Set("Retry-After", ue.retryAfter)
		}
		serveError(w, errcode.ErrorCodeTooManyRequests.WithMessage("upstream "+ue.host+" is rate limiting berth and nothing is cached"))
	case ue.status == http.StatusUnauthorized || ue.status == http.StatusForbidden:
		serveError(w, errcode.ErrorCodeDenied.WithMessage("upstream "+ue.host+" denied access (repository missing, private, or berth's credentials lack access)"))
	default:
		serveError(w, errcode.ErrorCodeUnavailable.WithMessage(ue.Error()))
	}
}

// countingWriter counts body bytes and keeps the connection's ReadFrom
// reachable so serving an *os.File still uses sendfile.
type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) ReadFrom(r io.Reader) (int64, error) {
	// ServeContent copies a flight through io.CopyN: a LimitedReader around it.
	if lr, ok := r.(*io.LimitedReader); ok {
		if fr, ok := lr.R.(*flightReader); ok {
			n, err := fr.sendTo(c.ResponseWriter, lr.N)
			lr.N -= n
			c.n += n
			return n, err
		}
	}
	if rf, ok := c.ResponseWriter.(io.ReaderFrom); ok {
		n, err := rf.ReadFrom(r)
		c.n += n
		return n, err
	}
	n, err := io.Copy(struct{ io.Writer }{c.ResponseWriter}, r)
	c.n += n
	return n, err
}

func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

package engine

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/storage"
)

// Blob is a blob being read: a file of the local cache, or the one shared
// download of it. Close it.
type Blob struct {
	Digest digest.Digest
	Size   int64  // -1 when the source did not say
	Source string // where the bytes come from: local, s3, peer or upstream

	file    *os.File // a cached blob
	release func()
	rd      *reader // a download in progress
	stream  bool    // rd is read once, front to back: a relay, or of unknown size
}

// Read reads the blob. On a download that fails, it returns an error
// before the last byte: a reader never gets the whole of a wrong blob.
func (b *Blob) Read(p []byte) (int, error) {
	if b.file != nil {
		return b.file.Read(p)
	}
	return b.rd.Read(p)
}

// Seekable reports whether Seek works: not for a relay, which keeps only
// a window of the blob, nor for a download whose size is unknown.
func (b *Blob) Seekable() bool { return b.file != nil || !b.stream }

func (b *Blob) Seek(offset int64, whence int) (int64, error) {
	switch {
	case b.file != nil:
		return b.file.Seek(offset, whence)
	case !b.stream:
		return b.rd.Seek(offset, whence)
	default:
		return 0, errors.New("blob is streamed once and cannot seek")
	}
}

// SendTo writes up to n bytes to w the fastest way there is: what is on
// disk as an *os.File section, so a connection's ReadFrom can use sendfile.
func (b *Blob) SendTo(w io.Writer, n int64) (int64, error) {
	if b.file != nil {
		return io.Copy(w, &io.LimitedReader{R: b.file, N: n})
	}
	return b.rd.sendTo(w, n)
}

// Err is what cut reading short, if anything: the download failed, the
// digest did not match, or the reader fell too far behind a relay. A
// caller that has sent part of the blob must then make sure its client
// sees a cut, never a complete body.
func (b *Blob) Err() error {
	if b.rd != nil {
		return b.rd.err
	}
	return nil
}

func (b *Blob) Close() error {
	if b.file != nil {
		err := b.file.Close()
		b.release()
		return err
	}
	return b.rd.Close()
}

// openCached opens a blob of the local disk, or returns nil.
func (e *Engine) openCached(key storage.Key, source string) *Blob {
	f, size, release, err := e.local.OpenBlob(key)
	if err != nil {
		return nil
	}
	return &Blob{Digest: key.Digest, Size: size, Source: source, file: f, release: release}
}

// Blob returns blob d of repo: from the local disk, or by joining (or
// starting) the one download of it. The download belongs to no caller: one
// that goes away does not cut it short for the others. ctx bounds the
// wait for the download's first bytes and, for a reader, its reads.
func (e *Engine) Blob(ctx context.Context, repo Repo, d digest.Digest) (*Blob, error) {
	key := storage.Key{Upstream: repo.Upstream, Digest: d}
	for range 3 {
		if b := e.Cached(repo, d); b != nil {
			return b, nil
		}
		up, err := e.upstreamOf(repo)
		if err != nil {
			return nil, err
		}
		dl, rd, err := e.join(ctx, key, up, repo.Name, true, holderHint{})
		if errors.Is(err, errCachedMeanwhile) {
			continue
		}
		if errors.Is(err, errRelayMissed) {
			return e.uncached(ctx, key, up, repo.Name)
		}
		if err != nil {
			return nil, err
		}
		return e.fromDownload(ctx, dl, rd)
	}
	return nil, errors.New("blob kept vanishing from the cache")
}

// PeerBlob answers another berth: from this host's disk or a download
// already running, never by starting one. ErrNotFound otherwise.
func (e *Engine) PeerBlob(ctx context.Context, key storage.Key) (*Blob, error) {
	e.mu.Lock()
	dl, ok := e.downloads[key]
	var rd *reader
	if ok {
		rd = dl.newReader(ctx)
	}
	e.mu.Unlock()
	if !ok {
		if b := e.openCached(key, "local"); b != nil { // committed since a miss
			return b, nil
		}
		return nil, storage.ErrNotFound
	}
	if rd == nil {
		return nil, storage.ErrNotFound // relayed uncached and past its start
	}
	return e.fromDownload(ctx, dl, rd)
}

// fromDownload waits for the download to start and makes a Blob of it.
func (e *Engine) fromDownload(ctx context.Context, dl *download, rd *reader) (*Blob, error) {
	select {
	case <-dl.started:
	case <-ctx.Done():
		rd.Close()
		return nil, ctx.Err()
	}
	dl.mu.Lock()
	err, relaying := dl.err, dl.relaying
	dl.mu.Unlock()
	if err != nil {
		rd.Close()
		return nil, err
	}
	// Without a length a download cannot be seeked to its end, which ranges
	// need: it is read front to back, like a relay.
	return &Blob{Digest: dl.key.Digest, Size: dl.size, Source: dl.label, rd: rd, stream: relaying || dl.size < 0}, nil
}

// uncached serves a blob, without caching it, to one caller too late to
// join its relay: a relay of its own, from the bucket when it has the blob.
func (e *Engine) uncached(ctx context.Context, key storage.Key, up *upstream, repo string) (*Blob, error) {
	e.metrics.passthrough.Inc()
	src, err := e.openUncached(ctx, key, up, repo)
	if err != nil {
		return nil, err
	}
	dl := newDownload(key, e.opts.RelayStall)
	rd := dl.newReader(ctx)
	dl.beginRelay(src.size, src.label)
	h := &hold{e: e, label: src.label} // no lease: nothing of this is shared
	e.goBackground(func() {
		_, err := dl.fill(src, nil, e.idleTimeout, e.countBytes(up, h), nil, e.resumer(key, up, repo, src, h))
		e.downloadFailed(key, h.source(), err)
		dl.finish(err, nil)
	})
	return &Blob{Digest: key.Digest, Size: src.size, Source: src.label, rd: rd, stream: true}, nil
}

var errCachedMeanwhile = errors.New("blob was cached meanwhile")

// join attaches a reader (when read is true) to the blob's download,
// starting one if none runs; a download it starts looks for the blob's
// lease holder before the bucket as hint says (PrefetchOptions).
func (e *Engine) join(ctx context.Context, key storage.Key, up *upstream, repo string, read bool, hint holderHint) (*download, *reader, error) {
	e.mu.Lock()
	if dl, ok := e.downloads[key]; ok {
		var rd *reader
		if read {
			if rd = dl.newReader(ctx); rd == nil {
				e.mu.Unlock()
				return nil, nil, errRelayMissed
			}
		}
		e.mu.Unlock()
		return dl, rd, nil
	}
	// Downloads leave the map only after their commit, so with the lock
	// held and no download, a blob that landed since the miss is on disk now.
	if _, ok := e.local.HasBlob(key); ok {
		e.mu.Unlock()
		return nil, nil, errCachedMeanwhile
	}
	dl := newDownload(key, e.opts.RelayStall)
	e.downloads[key] = dl
	var rd *reader
	if read {
		rd = dl.newReader(ctx)
	}
	e.mu.Unlock()
	e.metrics.lookups.WithLabelValues("blob", "miss").Inc()
	e.goBackground(func() { e.fetch(dl, up, repo, hint) })
	return dl, rd, nil
}

// fetch runs one download: find a source, write it to disk (or relay it
// when the disk has no room), verify, commit, share with the fleet.
func (e *Engine) fetch(dl *download, up *upstream, repo string, hint holderHint) {
	e.metrics.inflight.Inc()
	defer e.metrics.inflight.Dec()
	log := e.log.WithFields(logrus.Fields{"upstream": up.host, "repo": repo, "digest": dl.key.Digest})
	end := func(err error, release func()) {
		e.mu.Lock()
		delete(e.downloads, dl.key)
		e.mu.Unlock()
		dl.finish(err, release)
	}
	src, err := e.openSource(e.life, dl.key, up, repo, hint)
	if err != nil {
		e.mu.Lock()
		delete(e.downloads, dl.key)
		e.mu.Unlock()
		dl.fail(err)
		return
	}
	h := e.newHold(src)
	var uploaded chan error // a relayed blob's upload to the bucket
	relay := func() {
		e.metrics.passthrough.Inc()
		log.WithField("source", src.label).Warn("no room on disk for blob; relaying it to its readers uncached")
		uploaded = e.shareRelay(dl, src)
	}
	w, err := e.local.CreateBlob(dl.key, src.size)
	if errors.Is(err, storage.ErrNoSpace) {
		w, err = nil, nil
		dl.beginRelay(src.size, src.label)
		relay()
	} else if err == nil {
		var rf *os.File
		if rf, err = os.Open(w.Path()); err != nil {
			w.Abort()
		} else {
			dl.begin(src.size, src.label, rf)
		}
	}
	if err != nil {
		src.body.Close()
		e.downloadFailed(dl.key, src.label, err)
		h.done(log)
		e.mu.Lock()
		delete(e.downloads, dl.key)
		e.mu.Unlock()
		dl.fail(err)
		return
	}
	start := time.Now()
	_, err = dl.fill(src, w, e.idleTimeout, e.countBytes(up, h), relay, e.resumer(dl.key, up, repo, src, h))
	label := h.source() // the source the download ended with
	if err != nil && !errors.Is(err, errRelayAbandoned) {
		log.WithError(err).WithField("source", label).Warn("blob download failed; nothing kept")
	}
	if dl.relaying || err != nil {
		end(err, nil)
		if uploaded != nil {
			// The lease is released only after this, so hosts waiting on it
			// find the blob in the bucket.
			if uerr := <-uploaded; err == nil && uerr != nil {
				e.fleet.failed("put blob", uerr)
			}
		}
		e.downloadFailed(dl.key, label, err)
		h.done(log)
		return
	}
	release, _ := e.local.Pin(dl.key)
	log.WithFields(logrus.Fields{"bytes": dl.written, "source": label, "seconds": time.Since(start).Seconds()}).Info("blob cached")
	end(nil, release)
	e.publish(Event{Kind: BlobCached, Repo: Repo{Upstream: up.host, Name: repo}, Digest: dl.key.Digest, Size: dl.written})
	if label == "upstream" {
		e.shareBlob(dl.key, log)
	}
	h.done(log)
}

// countBytes counts what a download's source sends; only the upstream's
// bytes are berth_upstream_bytes_total.
func (e *Engine) countBytes(up *upstream, h *hold) func(int) {
	c := e.metrics.upstreamBytes.WithLabelValues(up.host)
	return func(n int) {
		if h.source() == "upstream" {
			c.Add(float64(n))
		}
	}
}

// downloadFailed counts a digest mismatch and deletes a corrupt bucket
// object, so the next reader fetches it again.
func (e *Engine) downloadFailed(key storage.Key, label string, err error) {
	if !errors.Is(err, storage.ErrDigestMismatch) {
		return
	}
	e.metrics.mismatches.WithLabelValues(label).Inc()
	if label == "s3" && e.fleet != nil {
		e.log.WithField("blob", key.String()).Warn("corrupt blob in S3; deleting it so it is fetched again")
		if derr := e.fleet.bucket.DeleteBlob(context.WithoutCancel(e.life), key); derr != nil {
			e.fleet.failed("delete blob", derr)
		}
	}
}

// shareRelay streams a relayed blob from the upstream into the bucket as
// one more reader of the relay, so the fleet still fetches it once. The
// upload only ends well if the relay verified the blob: its reader fails,
// and the upload is aborted, on anything else. Nil when there is nothing
// to share.
func (e *Engine) shareRelay(dl *download, src source) chan error {
	b := e.fleet.use()
	if b == nil || src.label != "upstream" {
		return nil
	}
	rd := dl.newReader(e.life)
	if rd == nil {
		return nil
	}
	done := make(chan error, 1)
	go func() {
		defer rd.Close()
		done <- b.PutBlobStream(e.life, dl.key, rd)
	}()
	return done
}

// shareBlob puts a blob this host fetched from the upstream into the
// bucket, before the lease is released, so waiting hosts find it.
func (e *Engine) shareBlob(key storage.Key, log *logrus.Entry) {
	b := e.fleet.use()
	if b == nil {
		return
	}
	f, size, release, err := e.local.OpenBlob(key)
	if err != nil {
		return // evicted already; the next host to miss fetches it
	}
	defer release()
	defer f.Close()
	start := time.Now()
	if err := b.PutBlob(e.life, key, f, size); err != nil {
		e.fleet.failed("put blob", err)
		return
	}
	log.WithFields(logrus.Fields{"bytes": size, "seconds": time.Since(start).Seconds()}).Debug("blob shared to S3")
}

// StatBlob returns a blob's size without fetching it: from the local
// disk, a download in progress, the bucket, or a HEAD to the upstream.
func (e *Engine) StatBlob(ctx context.Context, repo Repo, d digest.Digest) (int64, error) {
	key := storage.Key{Upstream: repo.Upstream, Digest: d}
	if size, ok := e.local.HasBlob(key); ok {
		e.metrics.lookups.WithLabelValues("blob", "hit").Inc()
		return size, nil
	}
	e.mu.Lock()
	dl, ok := e.downloads[key]
	e.mu.Unlock()
	if ok {
		select {
		case <-dl.started:
			if dl.size >= 0 {
				return dl.size, nil
			}
		default:
		}
	}
	e.metrics.lookups.WithLabelValues("blob", "miss").Inc()
	if b := e.fleet.use(); b != nil {
		size, err := b.StatBlob(ctx, key)
		if err == nil {
			return size, nil
		}
		if !errors.Is(err, storage.ErrNotFound) {
			e.fleet.failed("stat blob", err)
		}
	}
	up, err := e.upstreamOf(repo)
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := e.upstreamDo(ctx, up, repo.Name, "blob", http.MethodHead, up.url(repo.Name, "blobs", d.String()), nil)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.ContentLength, nil
}

// Cached returns blob d of repo if it is on the local disk, else nil.
func (e *Engine) Cached(repo Repo, d digest.Digest) *Blob {
	b := e.openCached(storage.Key{Upstream: repo.Upstream, Digest: d}, "local")
	if b != nil {
		e.metrics.lookups.WithLabelValues("blob", "hit").Inc()
	}
	return b
}

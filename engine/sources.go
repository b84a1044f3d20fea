package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/storage"
)

// source is where a download reads a blob from.
type source struct {
	body   io.ReadCloser
	size   int64         // the whole blob's; -1 when unknown
	label  string        // "upstream", "s3" or "peer"
	lease  storage.Lease // held while fetching from the upstream for the fleet
	holder string        // peer: the berth it streams from
	skip   int64         // resumed without a range: bytes before the resume point
}

// openSource finds a blob for a download: the bucket, else the upstream
// under the fleet's lease, else (lease held elsewhere) the holder's berth
// when it advertises a URL, else the bucket once the holder has put it there.
// A hint sends it to the holder first.
func (e *Engine) openSource(ctx context.Context, key storage.Key, up *upstream, repo string, hint holderHint) (source, error) {
	f := e.fleet
	b := f.use()
	if b == nil {
		return e.openUpstreamBlob(ctx, key, up, repo)
	}
	if hint.holder != "" && hint.holder != f.self {
		if src, err := e.fromPeer(ctx, hint.holder, key, repo); err == nil {
			return src, nil
		}
	}
	if hint.lookup {
		if holder := e.leaseHolderURL(ctx, b, key); holder != "" {
			if src, err := e.fromPeer(ctx, holder, key, repo); err == nil {
				return src, nil
			}
		}
	}
	waited := false
	giveUp := time.Now().Add(2 * f.leaseTTL)
	var holderExpires time.Time // of the lease we wait on, as last seen
	for {
		body, size, err := b.GetBlob(ctx, key, 0)
		if err == nil {
			f.avoided.WithLabelValues("blob").Inc()
			return source{body: body, size: size, label: "s3"}, nil
		}
		if !errors.Is(err, storage.ErrNotFound) {
			f.failed("get blob", err)
			return e.openUpstreamBlob(ctx, key, up, repo)
		}
		lease, err := b.AcquireLease(ctx, storage.BlobLeaseName(key), f.leaseTTL)
		switch {
		case err == nil:
			// Another host may have uploaded and released between our miss
			// and our lease: look again before fetching upstream.
			if _, serr := b.StatBlob(ctx, key); serr == nil {
				lease.Release(context.WithoutCancel(ctx))
				continue
			}
			event := "taken"
			if lease.TookOver() {
				event = "taken_over"
			}
			f.leases.WithLabelValues("blob", event).Inc()
			src, err := e.openUpstreamBlob(ctx, key, up, repo)
			if err != nil {
				lease.Release(context.WithoutCancel(ctx))
				return src, err
			}
			src.lease = lease
			return src, nil
		case !errors.Is(err, storage.ErrLeaseHeld):
			f.failed("acquire lease", err)
			return e.openUpstreamBlob(ctx, key, up, repo)
		}
		if !waited {
			waited = true
			f.leases.WithLabelValues("blob", "waited").Inc()
		}
		var held *storage.LeaseHeldError
		if errors.As(err, &held) && !held.Expires.IsZero() && !held.Expires.Equal(holderExpires) {
			if !holderExpires.IsZero() {
				// Renewed or taken over since we last looked: a live host
				// is fetching, and waiting for it still beats a second fetch.
				giveUp = time.Now().Add(2 * f.leaseTTL)
			}
			holderExpires = held.Expires
		}
		retryPeer := ""
		if held != nil && isURL(held.Holder) && held.Holder != f.self {
			src, err := e.fromPeer(ctx, held.Holder, key, repo)
			if err == nil {
				return src, nil
			}
			if errors.Is(err, errPeerNotYet) {
				retryPeer = held.Holder
			}
			if unreachable(err) {
				// The holder's berth is gone or hung: waiting for its
				// lease to expire would only delay the fleet.
				if lease, err := b.TakeOver(ctx, held, f.leaseTTL); err == nil {
					f.leases.WithLabelValues("blob", "taken_over").Inc()
					e.log.WithFields(logrus.Fields{"blob": key.String(), "holder": held.Holder}).Warn("lease holder unreachable; took over its fetch")
					src, err := e.openUpstreamBlob(ctx, key, up, repo)
					if err != nil {
						lease.Release(context.WithoutCancel(ctx))
						return src, err
					}
					src.lease = lease
					return src, nil
				}
			}
		}
		if time.Now().After(giveUp) {
			e.log.WithField("blob", key.String()).Warn("waited too long for another host's fetch; fetching from the upstream")
			return e.openUpstreamBlob(ctx, key, up, repo)
		}
		// Wait for the holder's upload, checking cheaply, and try the lease
		// again now and then in case its holder died. A holder that has
		// the lease but no download yet (it took the lease over a moment
		// ago) is asked again on every poll, at no S3 cost: streaming
		// from it as soon as it can means that, should it die too, this
		// host resumes from the bytes it has instead of fetching again.
		var fromPeer source
		poll(ctx, time.Now().Add(f.leaseTTL/2), func() bool {
			if retryPeer != "" {
				src, err := e.fromPeer(ctx, retryPeer, key, repo)
				if err == nil {
					fromPeer = src
					return true
				}
				if !errors.Is(err, errPeerNotYet) {
					return true // gone or refusing: the next round finds out
				}
			}
			_, err := b.StatBlob(ctx, key)
			return !errors.Is(err, storage.ErrNotFound) // there now, or S3 failing: the next round finds out
		})
		if fromPeer.body != nil {
			return fromPeer, nil
		}
		if ctx.Err() != nil {
			return source{}, ctx.Err()
		}
	}
}

// holderHint is where a download looks before the bucket: the berth at
// holder (a URL read from a lease in the bucket), then, with lookup, the
// holder its own blob's lease names.
type holderHint struct {
	holder string
	lookup bool
}

// leaseHolderURL reads the berth that holds key's lease, "" when the lease
// is free or its holder is not another berth's URL.
func (e *Engine) leaseHolderURL(ctx context.Context, b storage.Bucket, key storage.Key) string {
	holder, err := b.LeaseHolder(ctx, storage.BlobLeaseName(key))
	if err != nil {
		if !errors.Is(err, storage.ErrNotFound) {
			e.fleet.failed("read lease", err)
		}
		return ""
	}
	if !isURL(holder) || holder == e.fleet.self {
		return ""
	}
	return holder
}

// fromPeer streams a whole blob from the berth at holder, counted as a
// bucket read avoided.
func (e *Engine) fromPeer(ctx context.Context, holder string, key storage.Key, repo string) (source, error) {
	src, err := e.openPeerAt(ctx, holder, key, repo, 0)
	if err == nil {
		e.fleet.avoided.WithLabelValues("blob").Inc()
	}
	return src, err
}

// poll checks cond at growing intervals until it holds, ctx ends or
// until passes; it reports whether cond held.
func poll(ctx context.Context, until time.Time, cond func() bool) bool {
	for wait := firstLeasePoll; ; wait = min(wait*3/2, maxLeasePoll) {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(wait):
		}
		if cond() {
			return true
		}
		if time.Now().After(until) {
			return false
		}
	}
}

func (e *Engine) openUpstreamBlob(ctx context.Context, key storage.Key, up *upstream, repo string) (source, error) {
	return e.openUpstreamAt(ctx, key, up, repo, 0)
}

// openUpstreamAt GETs a blob from offset with a Range request.
func (e *Engine) openUpstreamAt(ctx context.Context, key storage.Key, up *upstream, repo string, offset int64) (source, error) {
	resp, err := e.upstreamDo(ctx, up, repo, "blob", http.MethodGet, up.url(repo, "blobs", key.Digest.String()), rangeHeader(offset))
	if err != nil {
		return source{}, err
	}
	src, err := ranged(resp, offset)
	src.label = "upstream"
	return src, err
}

func rangeHeader(offset int64) http.Header {
	if offset == 0 {
		return nil
	}
	return http.Header{"Range": {fmt.Sprintf("bytes=%d-", offset)}}
}

// ranged makes a source of an answer to a request from offset: a 206
// from there, or a 200 from the start (skip says how much precedes it).
func ranged(resp *http.Response, offset int64) (source, error) {
	if offset == 0 || resp.StatusCode == http.StatusOK {
		return source{body: resp.Body, size: resp.ContentLength, skip: offset}, nil
	}
	var start, end, total int64
	cr := resp.Header.Get("Content-Range")
	if resp.StatusCode != http.StatusPartialContent {
		resp.Body.Close()
		return source{}, fmt.Errorf("answered %s to a range request", resp.Status)
	}
	if _, err := fmt.Sscanf(cr, "bytes %d-%d/%d", &start, &end, &total); err != nil || start != offset {
		resp.Body.Close()
		return source{}, fmt.Errorf("answered a range request from %d with Content-Range %q", offset, cr)
	}
	return source{body: resp.Body, size: total}, nil
}

// PeerHeader marks a request from another berth: it is answered from this
// host's disk or a download already running, never by starting one, so
// two hosts can never wait on each other.
const PeerHeader = "Berth-Peer"

// NewPeerTransport is the transport settings for requests to peers: a
// peer that does not connect within 2s or answer within 10s is given up
// on, so a host never waits long on a dead peer (the engine gives up on a
// silent one sooner, after Options.PeerIdleTimeout). It is the default of
// Options.PeerTransport, and the base to build a credentialed one on
// (auth.PeerOptions.Base).
func NewPeerTransport() *http.Transport {
	return &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
		TLSHandshakeTimeout:   5 * time.Second,
		ResponseHeaderTimeout: 10 * time.Second,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
	}
}

var defaultPeerTransport = NewPeerTransport()

func isURL(s string) bool { return strings.HasPrefix(s, "http://") || strings.HasPrefix(s, "https://") }

// errPeerSilent is a peer that took a connection and then sent no answer
// for Options.PeerIdleTimeout: hung, frozen or overloaded, it counts as
// dead.
var errPeerSilent = errors.New("peer sent no answer")

// errPeerNotYet is a peer that answered 404: it has neither the blob nor
// a download of it, yet. A host that just took a lease over is so until
// its download starts.
var errPeerNotYet = errors.New("no download of it yet")

// unreachable reports an error that says a peer's berth is not there: its
// address refuses connections or does not answer them, or it took the
// connection and sent nothing.
func unreachable(err error) bool {
	var op *net.OpError
	return (errors.As(err, &op) && op.Op == "dial") || errors.Is(err, errPeerSilent)
}

// idleTimeout is how long src may send nothing before a download gives up
// on it: a peer is judged sooner than the upstream or the bucket.
func (e *Engine) idleTimeout(src source) time.Duration {
	if src.label == "peer" {
		return e.peerIdleTimeout()
	}
	return time.Duration(e.sourceIdle.Load())
}

func (e *Engine) peerIdleTimeout() time.Duration { return time.Duration(e.peerIdle.Load()) }

// openPeerAt GETs a blob from another berth from offset. A peer that sends
// no response headers within PeerIdleTimeout fails with errPeerSilent; once
// they came, the download's idle timer watches the body.
func (e *Engine) openPeerAt(ctx context.Context, holder string, key storage.Key, repo string, offset int64) (source, error) {
	u := holder + "/v2/" + repo + "/blobs/" + key.Digest.String() + "?ns=" + url.QueryEscape(key.Upstream)
	ctx, cancel := context.WithCancelCause(ctx)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		cancel(nil)
		return source{}, err
	}
	req.Header.Set(PeerHeader, "1")
	if offset > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", offset))
	}
	wait := e.peerIdleTimeout()
	silent := time.AfterFunc(wait, func() { cancel(errPeerSilent) })
	resp, err := e.peers.Do(req)
	silent.Stop()
	if err != nil {
		if errors.Is(context.Cause(ctx), errPeerSilent) {
			err = fmt.Errorf("peer %s: %w within %v", holder, errPeerSilent, wait)
		}
		cancel(nil)
		return source{}, err
	}
	// The request's context lives as long as its body.
	resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: func() { cancel(nil) }}
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusPartialContent {
		resp.Body.Close()
		if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
			e.peerRefused(holder, resp.StatusCode)
		}
		if resp.StatusCode == http.StatusNotFound {
			return source{}, fmt.Errorf("peer %s answered %s: %w", holder, resp.Status, errPeerNotYet)
		}
		return source{}, fmt.Errorf("peer %s answered %s", holder, resp.Status)
	}
	src, err := ranged(resp, offset)
	src.label, src.holder = "peer", holder
	return src, err
}

type cancelOnClose struct {
	io.ReadCloser
	cancel func()
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}

// peerRefused logs, once per peer and status, that a peer refused this
// host's fleet credential. Like any other refusal it costs no client
// anything: the download waits for the holder's upload to the bucket.
// Neither the credential nor the peer's answer is logged.
func (e *Engine) peerRefused(holder string, status int) {
	if _, seen := e.peerRefusals.LoadOrStore(fmt.Sprintf("%s %d", holder, status), struct{}{}); seen {
		return
	}
	peer := holder
	if u, err := url.Parse(holder); err == nil {
		peer = u.Redacted()
	}
	e.log.WithFields(logrus.Fields{"peer": peer, "status": status}).Warn("peer refused this host's fleet credential (check fleet.token_file or the fleet's TLS certificates); reading blobs it holds from the bucket once uploaded")
}

// openUncached is the source of a blob that is served without caching it
// to a caller too late to join its relay: the bucket when it has the
// blob, else the upstream.
func (e *Engine) openUncached(ctx context.Context, key storage.Key, up *upstream, repo string) (source, error) {
	if b := e.fleet.use(); b != nil {
		body, size, err := b.GetBlob(ctx, key, 0)
		if err == nil {
			e.fleet.avoided.WithLabelValues("blob").Inc()
			return source{body: body, size: size, label: "s3"}, nil
		}
		if !errors.Is(err, storage.ErrNotFound) {
			e.fleet.failed("get blob", err)
		}
	}
	return e.openUpstreamBlob(ctx, key, up, repo)
}

// hold is what a download knows of its sources as it goes: the kind it
// reads from now, and the fleet lease it holds, taken at the start or,
// when the host it streamed from died, taken over on the way. The lease
// is renewed while the download runs and released by done.
type hold struct {
	e     *Engine
	mu    sync.Mutex
	label string
	lease storage.Lease
	stop  func()
}

func (e *Engine) newHold(src source) *hold {
	h := &hold{e: e, label: src.label}
	if src.lease != nil {
		h.lease, h.stop = src.lease, e.keepLease(src.lease)
	}
	return h
}

func (h *hold) setLabel(l string) {
	h.mu.Lock()
	h.label = l
	h.mu.Unlock()
}

func (h *hold) source() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.label
}

// claim takes the blob's lease for this host if it has none: free, or
// held by dead, the holder that just failed it. When another host holds
// it (one that took it over from dead first) it returns that holder, so
// this host streams from it rather than fetching the blob once more.
func (h *hold) claim(key storage.Key, dead string) (other string) {
	e := h.e
	b := e.fleet.use()
	h.mu.Lock()
	defer h.mu.Unlock()
	if b == nil || h.lease != nil {
		return ""
	}
	ttl := e.fleet.leaseTTL
	name := storage.BlobLeaseName(key)
	l, err := b.AcquireLease(e.life, name, ttl)
	var held *storage.LeaseHeldError
	if errors.As(err, &held) && held.Holder == dead && dead != "" {
		if l, err = b.TakeOver(e.life, held, ttl); err != nil {
			// Another host took it over on the same sighting: look again
			// to learn which.
			l, err = b.AcquireLease(e.life, name, ttl)
		}
	}
	if errors.As(err, &held) && held.Holder != dead {
		return held.Holder
	}
	if err != nil {
		return "" // the bucket fails: one more upstream fetch, never a wrong byte
	}
	event := "taken"
	if l.TookOver() {
		event = "taken_over"
	}
	e.fleet.leases.WithLabelValues("blob", event).Inc()
	h.lease, h.stop = l, e.keepLease(l)
	return ""
}

func (h *hold) holds() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lease != nil
}

// done stops renewing and releases the lease, if any.
func (h *hold) done(log *logrus.Entry) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.lease == nil {
		return
	}
	h.stop()
	if err := h.lease.Release(context.WithoutCancel(h.e.life)); err != nil {
		log.WithError(err).Warn("could not release blob lease")
	}
	h.lease = nil
}

// keepLease renews a blob lease while its download runs; the returned
// function stops renewing.
func (e *Engine) keepLease(lease storage.Lease) func() {
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(e.fleet.leaseTTL / 3)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				if err := lease.Renew(e.life); err != nil {
					e.log.WithError(err).Warn("could not renew blob lease")
				}
			}
		}
	}()
	return func() { close(done) }
}

// maxResumeTries bounds how often a download tries its sources again
// without getting further into the blob; each try opens every kind of
// source from the failed one's on until one answers.
const maxResumeTries = 4

// resumer continues a download whose source stalled, broke or ended early,
// from the byte reached: the same kind of source first, then the next
// (peer, then the bucket, then the upstream), with backoff between tries
// and the upstream's Retry-After honoured. Progress into the blob earns
// fresh tries; a source that keeps failing at the same byte runs out of them.
func (e *Engine) resumer(key storage.Key, up *upstream, repo string, first source, h *hold) resumeFunc {
	kinds := []string{"peer", "s3", "upstream"}
	kinds = kinds[max(0, slices.Index(kinds, first.label)):]
	tries, reached := 0, int64(-1)
	label, peer := first.label, first.holder
	return func(offset int64, reason string) (source, error) {
		e.metrics.resumes.WithLabelValues(label, reason).Inc()
		if label == "peer" && h != nil {
			// The holder this host streamed from failed: fetch the rest
			// for the fleet under the blob's lease, or, when another host
			// took the lease over first, stream from that host.
			if other := h.claim(key, peer); isURL(other) && other != e.fleet.self {
				peer = other
			}
		}
		if offset > reached {
			tries, reached = 0, offset
		}
		var last error
		for ; tries < maxResumeTries; tries++ {
			if tries > 0 {
				wait := time.Duration(250<<tries) * time.Millisecond
				if ra, err := strconv.Atoi(RetryAfter(last)); err == nil && ra > 0 {
					wait = min(time.Duration(ra)*time.Second, 30*time.Second)
				}
				select {
				case <-time.After(wait):
				case <-e.life.Done():
					return source{}, e.life.Err()
				}
			}
			for _, kind := range kinds {
				if kind == "peer" && h != nil && h.holds() {
					continue // this host fetches it for the fleet now
				}
				src, err := e.openAt(kind, key, up, repo, peer, offset)
				if err != nil {
					last = err
					continue
				}
				tries++
				label = src.label
				if h != nil {
					h.setLabel(src.label)
				}
				if src.skip > 0 {
					e.metrics.rerequested.WithLabelValues(src.label).Add(float64(src.skip))
					if src.label == "upstream" {
						e.metrics.upstreamBytes.WithLabelValues(up.host).Add(float64(src.skip))
					}
				}
				e.log.WithFields(logrus.Fields{"blob": key.String(), "source": src.label, "offset": offset, "reason": reason}).Info("download resumed")
				return src, nil
			}
		}
		if last == nil {
			last = errors.New("it failed at the same byte every time")
		}
		return source{}, fmt.Errorf("no source could resume the blob at byte %d: %w", offset, last)
	}
}

// openAt opens one kind of source of a blob from offset.
func (e *Engine) openAt(kind string, key storage.Key, up *upstream, repo, holder string, offset int64) (source, error) {
	switch kind {
	case "peer":
		if holder == "" {
			return source{}, errors.New("no peer")
		}
		return e.openPeerAt(e.life, holder, key, repo, offset)
	case "s3":
		b := e.fleet.use()
		if b == nil {
			return source{}, errors.New("no bucket")
		}
		body, size, err := b.GetBlob(e.life, key, offset)
		if err != nil {
			if !errors.Is(err, storage.ErrNotFound) {
				e.fleet.failed("get blob", err)
			}
			return source{}, err
		}
		return source{body: body, size: size, label: "s3"}, nil
	default:
		return e.openUpstreamAt(e.life, key, up, repo, offset)
	}
}

package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/storage"
)

// source is where a download reads a blob from.
type source struct {
	body  io.ReadCloser
	size  int64
	label string        // "upstream", "s3" or "peer"
	lease storage.Lease // held while fetching from the upstream for the fleet
}

// openSource finds a blob for a download: the bucket, else the upstream
// under the fleet's lease, else (lease held elsewhere) the holder's berth
// when it advertises a URL, else the bucket once the holder has put it there.
func (e *Engine) openSource(ctx context.Context, key storage.Key, up *upstream, repo string) (source, error) {
	f := e.fleet
	b := f.use()
	if b == nil {
		return e.openUpstreamBlob(ctx, key, up, repo)
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
		if held != nil {
			if src, ok := e.openPeerBlob(ctx, held.Holder, key, repo); ok {
				return src, nil
			}
		}
		if time.Now().After(giveUp) {
			e.log.WithField("blob", key.String()).Warn("waited too long for another host's fetch; fetching from the upstream")
			return e.openUpstreamBlob(ctx, key, up, repo)
		}
		// Wait for the holder's upload, checking cheaply, and try the lease
		// again now and then in case its holder died.
		poll(ctx, time.Now().Add(f.leaseTTL/2), func() bool {
			_, err := b.StatBlob(ctx, key)
			return !errors.Is(err, storage.ErrNotFound) // there now, or S3 failing: the next round finds out
		})
		if ctx.Err() != nil {
			return source{}, ctx.Err()
		}
	}
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
	resp, err := e.upstreamDo(ctx, up, repo, "blob", http.MethodGet, up.url(repo, "blobs", key.Digest.String()), nil)
	if err != nil {
		return source{}, err
	}
	return source{body: resp.Body, size: resp.ContentLength, label: "upstream"}, nil
}

// PeerHeader marks a request from another berth: it is answered from this
// host's disk or a download already running, never by starting one, so
// two hosts can never wait on each other.
const PeerHeader = "Berth-Peer"

// NewPeerTransport is the transport settings for requests to peers: a
// peer that does not connect within 2s or answer within 10s is given up
// on, so a host never waits long on a dead peer. It is the default of
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

// openPeerBlob streams a blob from the lease holder's berth.
func (e *Engine) openPeerBlob(ctx context.Context, holder string, key storage.Key, repo string) (source, bool) {
	if !strings.HasPrefix(holder, "http://") && !strings.HasPrefix(holder, "https://") || holder == e.fleet.self {
		return source{}, false
	}
	u := holder + "/v2/" + repo + "/blobs/" + key.Digest.String() + "?ns=" + url.QueryEscape(key.Upstream)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return source{}, false
	}
	req.Header.Set(PeerHeader, "1")
	resp, err := e.peers.Do(req)
	if err != nil {
		return source{}, false
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
			e.peerRefused(holder, resp.StatusCode)
		}
		return source{}, false
	}
	e.fleet.avoided.WithLabelValues("blob").Inc()
	return source{body: resp.Body, size: resp.ContentLength, label: "peer"}, true
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

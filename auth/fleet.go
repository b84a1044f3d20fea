package auth

import (
	"net/http"
	"strings"
	"sync/atomic"

	"github.com/distribution/distribution/v3/registry/api/errcode"
)

// FleetRealm is the realm of the fleet port's Bearer challenge.
const FleetRealm = "berth-fleet"

// RequireFleetCredential lets a request through to next when it carries a
// fleet credential: `Authorization: Bearer <token>` with a token in force
// in tokens, or a client certificate the TLS handshake verified against the
// fleet's client CA (see ServerTLS). tokens may be nil when the fleet port
// relies on client certificates alone.
//
// Anything else gets 401 UNAUTHORIZED with the registry error JSON and
// `WWW-Authenticate: Bearer realm="berth-fleet"`, and next never sees it.
// The credential is neither echoed nor logged, and it is removed from the
// request before next runs, so nothing downstream can log or forward it.
//
// It guards what it wraps: berth leaves /healthz and /readyz on the fleet
// port unwrapped, and /metrics too unless fleet.metrics_auth is set.
func RequireFleetCredential(tokens *Tokens, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ok := VerifiedClient(r) || tokens.Valid(bearerToken(r))
		r.Header.Del("Authorization")
		if !ok {
			unauthorized(w, `Bearer realm="`+FleetRealm+`"`)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// VerifiedClient reports whether r came over TLS with a client certificate
// that the handshake verified. A server verifies client certificates only
// when it has a client CA (ServerTLS with a client CA file), so this is
// false on a port without mutual TLS.
func VerifiedClient(r *http.Request) bool {
	return r.TLS != nil && len(r.TLS.VerifiedChains) > 0
}

// bearerToken is the token of an `Authorization: Bearer` header, or "".
func bearerToken(r *http.Request) string {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(tok)
}

// unauthorized answers 401 UNAUTHORIZED in the registry's JSON with the
// given challenge.
func unauthorized(w http.ResponseWriter, challenge string) {
	h := w.Header()
	h.Set("WWW-Authenticate", challenge)
	h.Set("Docker-Distribution-API-Version", "registry/2.0")
	_ = errcode.ServeJSON(w, errcode.ErrorCodeUnauthorized)
}

// PeerOptions say how this host calls its peers' fleet ports.
type PeerOptions struct {
	// Base is the transport whose settings (timeouts, idle connections) peer
	// requests use; it is cloned, never changed. Nil: http.DefaultTransport's.
	Base *http.Transport
	// Tokens supplies the bearer token sent with every request (Current).
	// Nil sends none, for fleets that use client certificates alone.
	Tokens *Tokens
	// CAFile holds the CA certificates that peers' certificates must chain
	// to, for https:// peers. Empty: the system's CAs.
	CAFile string
	// CertFile and KeyFile are this host's certificate and key, presented
	// to peers that ask for a client certificate (mutual TLS). Both or none.
	CertFile, KeyFile string
	// ServerName is the name peers' certificates are checked against.
	// Empty: the host of the URL called. A fleet sharing one certificate
	// (one cert-manager Certificate for a DaemonSet) names it here.
	ServerName string
}

// PeerTransport is the http.RoundTripper for requests to peers' fleet ports:
// it adds the current fleet token and speaks TLS with the fleet's CA and
// this host's client certificate. Prepare re-reads the TLS files; the token
// is the one its Tokens has in force at each request.
type PeerTransport struct {
	opts PeerOptions
	cur  atomic.Pointer[http.Transport]
}

// NewPeerTransport reads the TLS files of o and builds the transport.
func NewPeerTransport(o PeerOptions) (*PeerTransport, error) {
	p := &PeerTransport{opts: o}
	apply, err := p.Prepare()
	if err != nil {
		return nil, err
	}
	apply()
	return p, nil
}

// Prepare re-reads the CA, certificate and key files and returns the func
// that puts the transport built on them in force. On error the error says
// which file was not taken; until apply the transport in force stays.
// Requests in flight finish on the connections they have; new ones use the
// new files.
func (p *PeerTransport) Prepare() (apply func(), err error) {
	conf, err := ClientTLSConfig(p.opts.CAFile, p.opts.CertFile, p.opts.KeyFile, p.opts.ServerName)
	if err != nil {
		return nil, err
	}
	var t *http.Transport
	if p.opts.Base != nil {
		t = p.opts.Base.Clone()
	} else {
		t = http.DefaultTransport.(*http.Transport).Clone()
	}
	t.TLSClientConfig = conf
	t.ForceAttemptHTTP2 = false // the fleet port speaks HTTP/1.1 (see ServerTLS)
	return func() {
		if old := p.cur.Swap(t); old != nil {
			old.CloseIdleConnections()
		}
	}, nil
}

// RoundTrip sends r with the current fleet token.
func (p *PeerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if p.opts.Tokens != nil {
		r = r.Clone(r.Context()) // a RoundTripper must not change the caller's request
		p.opts.Tokens.SetAuthorization(r)
	}
	return p.cur.Load().RoundTrip(r)
}

// CloseIdleConnections closes the idle connections to peers.
func (p *PeerTransport) CloseIdleConnections() { p.cur.Load().CloseIdleConnections() }

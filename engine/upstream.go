package engine

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"golang.org/x/sync/singleflight"

	"github.com/berth-dev/berth/config"
)

// maxRepoTransports bounds the per-repository transports (each holds a
// token) an upstream keeps; the least recently used are dropped and
// fetch a new token when needed again.
const maxRepoTransports = 512

// handshakeTimeout bounds a token handshake, which runs for every caller
// of the repository at once and so belongs to none of them.
const handshakeTimeout = 30 * time.Second

// upstream is one registry berth may fetch from. Token auth and credentials
// are go-containerregistry's: a transport per repository carries that
// repository's pull scope and refreshes its token on 401.
type upstream struct {
	host     string // the name clients use, e.g. docker.io
	endpoint *url.URL
	reg      name.Registry
	auth     authn.Authenticator
	base     http.RoundTripper
	life     context.Context // the engine's: handshakes outlive requests

	transports *lru[string, http.RoundTripper] // by repository
	creating   singleflight.Group
}

func newUpstream(life context.Context, host string, c config.Upstream) (*upstream, error) {
	u, err := url.Parse(c.URL)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", host, err)
	}
	opts := []name.Option{name.StrictValidation}
	if u.Scheme == "http" {
		opts = append(opts, name.Insecure)
	}
	reg, err := name.NewRegistry(u.Host, opts...)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", host, err)
	}
	tlsConf := &tls.Config{InsecureSkipVerify: c.InsecureSkipVerify} //nolint:gosec // operator's explicit choice
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("upstream %s: %w", host, err)
		}
		pool, _ := x509.SystemCertPool()
		if pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("upstream %s: %s holds no PEM certificates", host, c.CAFile)
		}
		tlsConf.RootCAs = pool
	}
	base := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       tlsConf,
		TLSHandshakeTimeout:   5 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		ExpectContinueTimeout: time.Second,
		MaxIdleConnsPerHost:   32,
		IdleConnTimeout:       90 * time.Second,
		ForceAttemptHTTP2:     true,
	}
	var auth authn.Authenticator = authn.Anonymous
	if c.Username != "" || c.Password != "" {
		auth = &authn.Basic{Username: c.Username, Password: c.Password}
	} else if keyReg, err := name.NewRegistry(host); err == nil {
		// The Docker config file names registries as clients do (docker.io), not by endpoint.
		if a, err := authn.DefaultKeychain.Resolve(keyReg); err == nil {
			auth = a
		}
	}
	return &upstream{host: host, endpoint: u, reg: reg, auth: auth, base: base, life: life,
		transports: newLRU[string, http.RoundTripper](maxRepoTransports)}, nil
}

// transport returns the authenticated transport for repo, pinging the
// registry the first time. Failures are not cached, so a registry that
// comes back is used again at once.
func (u *upstream) transport(ctx context.Context, repo string) (http.RoundTripper, error) {
	if t, ok := u.transports.get(repo); ok {
		return t, nil
	}
	ch := u.creating.DoChan(repo, func() (any, error) {
		// Every caller for repo waits on this handshake: it runs on the
		// engine's context, so the first caller leaving does not fail the rest.
		hctx, cancel := context.WithTimeout(u.life, handshakeTimeout)
		defer cancel()
		scope := u.reg.Repo(repo).Scope(transport.PullScope)
		t, err := transport.NewWithContext(hctx, u.reg, u.auth, u.base, []string{scope})
		if err != nil {
			return nil, err
		}
		u.transports.put(repo, t)
		return t, nil
	})
	var res singleflight.Result
	select {
	case res = <-ch:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if res.Err != nil {
		ue := &UpstreamError{Host: u.host, err: res.Err}
		var te *transport.Error
		if errors.As(res.Err, &te) {
			// The token endpoint refused berth's credentials: that is a denial, not an outage.
			ue.Status = te.StatusCode
		}
		return nil, ue
	}
	return res.Val.(http.RoundTripper), nil
}

func (u *upstream) url(repo, kind, ref string) string {
	e := *u.endpoint
	e.Path = strings.TrimSuffix(e.Path, "/") + "/v2/" + repo + "/" + kind + "/" + ref
	return e.String()
}

// do sends one request for repo and maps failures to UpstreamError. The
// caller closes the body of a successful (2xx) response.
func (u *upstream) do(ctx context.Context, repo, method, target string, hdr http.Header) (*http.Response, error) {
	t, err := u.transport(ctx, repo)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, method, target, nil)
	if err != nil {
		return nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := (&http.Client{Transport: t}).Do(req)
	if err != nil {
		return nil, &UpstreamError{Host: u.host, err: err}
	}
	if resp.StatusCode/100 != 2 {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		return nil, &UpstreamError{Host: u.host, Status: resp.StatusCode, RetryAfter: resp.Header.Get("Retry-After"), body: strings.TrimSpace(string(body))}
	}
	return resp, nil
}

// ping checks the registry's /v2/ answers below 500 (401 included: it is
// there and wants a token).
func (u *upstream) ping(ctx context.Context) error {
	e := *u.endpoint
	e.Path = strings.TrimSuffix(e.Path, "/") + "/v2/"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, e.String(), nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Transport: u.base}).Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode >= 500 {
		return fmt.Errorf("upstream %s answered %s", u.host, resp.Status)
	}
	return nil
}

// manifestAccept is every manifest type berth stores and serves.
var manifestAccept = strings.Join([]string{
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}, ", ")

// UpstreamError is a failed upstream exchange: no answer (Status 0) or an
// unwanted status.
type UpstreamError struct {
	Host       string
	Status     int
	RetryAfter string // the upstream's Retry-After, with a 429
	body       string
	err        error
}

func (e *UpstreamError) Error() string {
	if e.Status == 0 {
		return fmt.Sprintf("upstream %s: %v", e.Host, e.err)
	}
	return fmt.Sprintf("upstream %s answered %d %s", e.Host, e.Status, http.StatusText(e.Status))
}

func (e *UpstreamError) Unwrap() error { return e.err }

// Unavailable reports a failure that stale-if-error covers: no answer,
// rate limiting, or a server error.
func (e *UpstreamError) Unavailable() bool {
	return e.Status == 0 || e.Status == http.StatusTooManyRequests || e.Status >= 500
}

func asUpstreamError(err error) (*UpstreamError, bool) {
	var ue *UpstreamError
	ok := errors.As(err, &ue)
	return ue, ok
}

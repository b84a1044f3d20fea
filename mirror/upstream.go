package mirror

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
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"golang.org/x/sync/singleflight"

	"github.com/berth-dev/berth/config"
)

// upstream is one registry berth may fetch from. Token auth and credentials
// are go-containerregistry's: a transport per repository carries that
// repository's pull scope and refreshes its token on 401.
type upstream struct {
	host     string // the name clients use, e.g. docker.io
	endpoint *url.URL
	reg      name.Registry
	auth     authn.Authenticator
	base     http.RoundTripper

	mu         sync.Mutex
	transports map[string]http.RoundTripper // by repository
	creating   singleflight.Group
}

func newUpstream(host string, c config.Upstream) (*upstream, error) {
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
	return &upstream{host: host, endpoint: u, reg: reg, auth: auth, base: base, transports: map[string]http.RoundTripper{}}, nil
}

// transport returns the authenticated transport for repo, pinging the
// registry the first time. Failures are not cached, so a registry that
// comes back is used again at once.
func (u *upstream) transport(ctx context.Context, repo string) (http.RoundTripper, error) {
	u.mu.Lock()
	t, ok := u.transports[repo]
	u.mu.Unlock()
	if ok {
		return t, nil
	}
	v, err, _ := u.creating.Do(repo, func() (any, error) {
		scope := u.reg.Repo(repo).Scope(transport.PullScope)
		t, err := transport.NewWithContext(ctx, u.reg, u.auth, u.base, []string{scope})
		if err != nil {
			return nil, err
		}
		u.mu.Lock()
		u.transports[repo] = t
		u.mu.Unlock()
		return t, nil
	})
	if err != nil {
		ue := &upstreamError{host: u.host, err: err}
		var te *transport.Error
		if errors.As(err, &te) {
			// The token endpoint refused berth's credentials: that is a denial, not an outage.
			ue.status = te.StatusCode
		}
		return nil, ue
	}
	return v.(http.RoundTripper), nil
}

func (u *upstream) url(repo, kind, ref string) string {
	e := *u.endpoint
	e.Path = strings.TrimSuffix(e.Path, "/") + "/v2/" + repo + "/" + kind + "/" + ref
	return e.String()
}

// do sends one request for repo and maps failures to upstreamError. The
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
		return nil, &upstreamError{host: u.host, err: err}
	}
	if resp.StatusCode/100 != 2 {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		return nil, &upstreamError{host: u.host, status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After"), body: strings.TrimSpace(string(body))}
	}
	return resp, nil
}

// manifestAccept is every manifest type berth stores and serves.
var manifestAccept = strings.Join([]string{
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}, ", ")

// upstreamError is a failed upstream exchange: no answer (status 0) or an
// unwanted status.
type upstreamError struct {
	host       string
	status     int
	retryAfter string
	body       string
	err        error
}

func (e *upstreamError) Error() string {
	if e.status == 0 {
		return fmt.Sprintf("upstream %s: %v", e.host, e.err)
	}
	return fmt.Sprintf("upstream %s answered %d %s", e.host, e.status, http.StatusText(e.status))
}

func (e *upstreamError) Unwrap() error { return e.err }

// unavailable reports a failure that stale-if-error covers: no answer,
// rate limiting, or a server error.
func (e *upstreamError) unavailable() bool {
	return e.status == 0 || e.status == http.StatusTooManyRequests || e.status >= 500
}

func asUpstreamError(err error) (*upstreamError, bool) {
	var ue *upstreamError
	ok := errors.As(err, &ue)
	return ue, ok
}

func isNotFound(err error) bool {
	ue, ok := asUpstreamError(err)
	return ok && ue.status == http.StatusNotFound
}

func retryAfterSeconds(v string) int {
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0
	}
	return n
}

// PingUpstream returns a health check of the named upstream: its /v2/
// answering below 500 (401 included: it is there and wants a token).
func (s *Server) PingUpstream(host string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		_, ups := s.config()
		u, ok := ups[host]
		if !ok {
			return fmt.Errorf("upstream %s is no longer configured", host)
		}
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
			return fmt.Errorf("upstream %s answered %s", host, resp.Status)
		}
		return nil
	}
}

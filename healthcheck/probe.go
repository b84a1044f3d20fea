package healthcheck

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"strings"
	"syscall"
)

// DialAddr turns the address berth listens on into one a client on the same
// host can dial: an unspecified host (":5000", "0.0.0.0:5000") becomes
// 127.0.0.1 and "[::]:5000" becomes [::1]. "localhost" also becomes
// 127.0.0.1, since a scratch image has no /etc/hosts to resolve it with.
func DialAddr(listen string) (string, error) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("listen address %q: %w", listen, err)
	}
	if port == "" {
		return "", fmt.Errorf("listen address %q has no port", listen)
	}
	switch host {
	case "", "0.0.0.0", "localhost":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
		if ip.To4() == nil {
			host = "::1"
		}
	}
	return net.JoinHostPort(host, port), nil
}

// ProbeURL is the URL Probe fetches for a listen address and a path.
func ProbeURL(listen, path string) (string, error) {
	addr, err := DialAddr(listen)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	return "http://" + addr + path, nil
}

// ErrNotListening is wrapped by Probe's error when nothing accepts
// connections at the address.
var ErrNotListening = errors.New("nothing is listening")

// Probe fetches path from the berth listening at listen and returns nil if
// it answers 200. Otherwise its error is one line fit for a Docker health
// log or a kubelet event: the status and the failing checks, or that nothing
// listens (wrapping ErrNotListening). ctx bounds the whole probe.
func Probe(ctx context.Context, listen, path string) error {
	url, err := ProbeURL(listen, path)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "berth-healthcheck")
	// No proxy from the environment (the probe is for this host) and no
	// kept-alive connection (the process exits right after).
	client := &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		switch {
		case errors.Is(err, syscall.ECONNREFUSED):
			return fmt.Errorf("%w on %s (is berth running?)", ErrNotListening, req.URL.Host)
		case ctx.Err() != nil:
			return fmt.Errorf("no answer from %s before the timeout", url)
		}
		var ue *neturl.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("cannot reach %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<10))
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	msg := fmt.Sprintf("%s answered %s", url, resp.Status)
	if why := summarize(string(body)); why != "" {
		msg += ": " + why
	}
	return errors.New(msg)
}

// summarize keeps the failing lines of a /healthz or /readyz answer, or the
// first line of any other body, on one line.
func summarize(body string) string {
	var failed []string
	var first string
	for _, l := range strings.Split(body, "\n") {
		l = strings.TrimSpace(l)
		if l == "" {
			continue
		}
		if first == "" {
			first = l
		}
		if strings.HasPrefix(l, "[-]") {
			failed = append(failed, strings.TrimPrefix(l, "[-]"))
		}
	}
	s := first
	if len(failed) > 0 {
		s = strings.Join(failed, "; ")
	}
	const max = 400
	if len(s) > max {
		s = s[:max] + "..."
	}
	return s
}

package coordinator

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
)

// Discovery finds the fleet's nodes: a static list, a file of URLs, or DNS.
type Discovery struct {
	Static []string // node API base URLs
	File   string   // one URL a line (# comments); re-read at every Nodes call
	// DNSName: SRV records (target and port each) or, with Port, the
	// A/AAAA records of the name (a headless Service gives both).
	DNSName string
	Port    int
	Scheme  string // http (default) or https
	// Resolver asks DNS; nil: Go's default resolver.
	Resolver *net.Resolver
}

// Empty reports whether no source of nodes is set.
func (d Discovery) Empty() bool { return len(d.Static) == 0 && d.File == "" && d.DNSName == "" }

// Nodes lists the node URLs now, deduplicated and sorted.
func (d Discovery) Nodes(ctx context.Context) ([]string, error) {
	var out []string
	for _, s := range d.Static {
		u, err := NormalizeNodeURL(s, d.scheme())
		if err != nil {
			return nil, err
		}
		out = append(out, u)
	}
	if d.File != "" {
		f, err := os.Open(d.File)
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(f)
		line := 0
		for sc.Scan() {
			line++
			t := strings.TrimSpace(sc.Text())
			if t == "" || strings.HasPrefix(t, "#") {
				continue
			}
			u, err := NormalizeNodeURL(t, d.scheme())
			if err != nil {
				f.Close()
				return nil, fmt.Errorf("%s line %d: %v", d.File, line, err)
			}
			out = append(out, u)
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return nil, err
		}
	}
	if d.DNSName != "" {
		got, err := d.dns(ctx)
		if err != nil {
			return nil, err
		}
		out = append(out, got...)
	}
	out = dedupe(out)
	sort.Strings(out)
	return out, nil
}

func (d Discovery) scheme() string {
	if d.Scheme == "" {
		return "http"
	}
	return d.Scheme
}

func (d Discovery) dns(ctx context.Context) ([]string, error) {
	r := d.Resolver
	if r == nil {
		r = net.DefaultResolver
	}
	var out []string
	if d.Port == 0 {
		_, srvs, err := r.LookupSRV(ctx, "", "", d.DNSName)
		if err != nil {
			return nil, fmt.Errorf("--nodes-dns %s: no SRV records (%v); for A/AAAA records give the port (--nodes-port)", d.DNSName, err)
		}
		for _, s := range srvs {
			out = append(out, d.scheme()+"://"+net.JoinHostPort(strings.TrimSuffix(s.Target, "."), strconv.Itoa(int(s.Port))))
		}
		return out, nil
	}
	addrs, err := r.LookupHost(ctx, d.DNSName)
	if err != nil {
		return nil, fmt.Errorf("--nodes-dns %s: %v", d.DNSName, err)
	}
	for _, a := range addrs {
		out = append(out, d.scheme()+"://"+net.JoinHostPort(a, strconv.Itoa(d.Port)))
	}
	return out, nil
}

// NormalizeNodeURL accepts http(s)://host:port or host:port.
func NormalizeNodeURL(s, scheme string) (string, error) {
	s = strings.TrimSpace(s)
	if !strings.Contains(s, "://") {
		s = scheme + "://" + s
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.User != nil {
		return "", fmt.Errorf("node %q is not http(s)://HOST:PORT", s)
	}
	return u.Scheme + "://" + u.Host, nil
}

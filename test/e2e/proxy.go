package e2e

import (
	"testing"

	"github.com/berth-dev/berth/internal/testsupport"
)

// Proxy is the byte-counting, hangable TCP proxy tests put in front of an
// upstream; see testsupport.Proxy.
type Proxy = testsupport.Proxy

// StartProxy listens on a free loopback port and forwards every connection
// to target (host:port), without a rate limit. It is closed at cleanup.
func StartProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	p, err := testsupport.NewProxy(target, 0)
	if err != nil {
		t.Fatalf("proxy listen: %v", err)
	}
	t.Cleanup(p.Close)
	return p
}

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

var build struct {
	once sync.Once
	dir  string
	bin  string
	err  error
}

// raceBuild reports whether this test binary was built with -race; berth is
// then built with -race too, so races in the daemon fail e2e tests.
func raceBuild() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// BerthBinary builds ./cmd/berth once per test process and returns its path.
// A build failure fails the test: it is never a reason to skip.
func BerthBinary(t testing.TB) string {
	t.Helper()
	build.once.Do(func() {
		root, err := testsupport.ModuleRoot()
		if err != nil {
			build.err = err
			return
		}
		build.dir, err = os.MkdirTemp("", "berth-e2e-build")
		if err != nil {
			build.err = err
			return
		}
		build.bin = filepath.Join(build.dir, "berth")
		args := []string{"build", "-o", build.bin}
		if raceBuild() {
			args = append(args, "-race")
		}
		args = append(args, "./cmd/berth")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			build.err = fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	})
	if build.err != nil {
		t.Fatalf("building berth: %v", build.err)
	}
	return build.bin
}

// RemoveBuilds deletes the berth binary built by BerthBinary; TestMain calls
// it after the tests.
func RemoveBuilds() {
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
}

// Berth is a running `berth serve`.
type Berth struct {
	*Process
	Host string // 127.0.0.1:PORT
	URL  string // http://127.0.0.1:PORT
	Data string // --data directory
}

// UpstreamArgs makes berth fetch both docker.io names and names of
// registryHost (the upstream registry's own 127.0.0.1:PORT, which is what
// containerd sends as ?ns=) from upstreamURL: the registry itself, or a Proxy
// in front of it. The 1s tag TTL lets tests see tag moves quickly.
func UpstreamArgs(registryHost, upstreamURL string) []string {
	return []string{
		"--upstream", "docker.io=" + upstreamURL,
		"--upstream", registryHost + "=" + upstreamURL,
		"--tag-ttl", "1s",
	}
}

// StartBerth runs `berth serve --listen 127.0.0.1:FREE --data TMP args...`
// (with --data left out if args has one) and waits until /readyz answers 200.
// Berth gets SIGTERM at cleanup and must exit by itself; a data race it
// reports in its log fails the test.
func StartBerth(t testing.TB, args ...string) *Berth {
	t.Helper()
	bin := BerthBinary(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	hasData := false
	for _, a := range args {
		if a == "--data" || strings.HasPrefix(a, "--data=") {
			hasData = true
		}
	}
	var full []string
	noReadyz := false
	p, addr := startOnFreePort(t, 60*time.Second, "ready (/readyz 200)", func(addr string) (*Process, func(context.Context) bool) {
		full = []string{"serve", "--listen", addr}
		if !hasData {
			full = append(full, "--data", data)
		}
		full = append(full, args...)
		cmd := exec.Command(bin, full...)
		cmd.Env = berthEnv()
		p := StartProcess(t, "berth", filepath.Join(dir, "berth.log"), cmd)
		t.Cleanup(func() {
			// Runs before StartProcess's cleanup (cleanups run last
			// first): stopping here lets the whole log, shutdown
			// included, be checked.
			p.Stop(t)
			if p.LogContains("WARNING: DATA RACE") {
				t.Errorf("berth reported a data race; see its log")
			}
		})
		return p, func(ctx context.Context) bool { return berthReady(ctx, "http://"+addr, &noReadyz) }
	})
	if noReadyz {
		t.Logf("berth answers 404 on /readyz; took /v2/ 200 as ready")
	}
	t.Logf("berth %s listening on %s", strings.Join(full[1:], " "), addr)
	return &Berth{Process: p, Host: addr, URL: "http://" + addr, Data: data}
}

// berthReady: /readyz answers 200. A berth without /readyz (404) counts as
// ready once /v2/ answers 200, so pull tests can run against a daemon whose
// health endpoints are not written yet.
func berthReady(ctx context.Context, url string, noReadyz *bool) bool {
	switch httpStatus(ctx, url+"/readyz") {
	case 200:
		return true
	case 404:
		*noReadyz = httpStatus(ctx, url+"/v2/") == 200
		return *noReadyz
	}
	return false
}

// WaitReady waits for berth to be ready again, e.g. after a restart of its
// upstream.
func (b *Berth) WaitReady(t testing.TB, timeout time.Duration) {
	t.Helper()
	var noReadyz bool
	b.WaitUntil(t, timeout, "ready (/readyz 200)", func(ctx context.Context) bool {
		return berthReady(ctx, b.URL, &noReadyz)
	})
}

// berthEnv is this process's environment without BERTH_* variables, so a
// developer's shell settings cannot change what a test starts.
func berthEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BERTH_") {
			env = append(env, kv)
		}
	}
	return env
}

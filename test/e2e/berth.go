package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// Berth is a running `berth serve`.
type Berth struct {
	*Process
	Host string // 127.0.0.1:PORT
	URL  string // http://127.0.0.1:PORT
	Data string // the --data directory berth runs with
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
// (with --data left out if args has one; "{listen}" in args is replaced by
// the chosen address) and waits until /readyz answers 200.
// Berth gets SIGTERM at cleanup and must exit by itself; a data race it
// reports in its log fails the test.
func StartBerth(t testing.TB, args ...string) *Berth {
	t.Helper()
	bin := testsupport.BerthBinary(t)
	dir := t.TempDir()
	data, hasData := dataArg(args)
	if !hasData {
		data = filepath.Join(dir, "data")
	}
	var full []string
	noReadyz := false
	p, addr := startOnFreePort(t, 60*time.Second, "ready (/readyz 200)", func(addr string) (*Process, func(context.Context) bool) {
		full = []string{"serve", "--listen", addr}
		if !hasData {
			full = append(full, "--data", data)
		}
		for _, a := range args {
			// "{listen}" stands for the address chosen here, for flags
			// such as --s3-advertise that name berth's own address.
			full = append(full, strings.ReplaceAll(a, "{listen}", addr))
		}
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

// dataArg returns the value of the last --data in args, which is the one
// berth uses, as "--data DIR" or "--data=DIR".
func dataArg(args []string) (dir string, ok bool) {
	for i, a := range args {
		if v, found := strings.CutPrefix(a, "--data="); found {
			dir, ok = v, true
		} else if a == "--data" && i+1 < len(args) {
			dir, ok = args[i+1], true
		}
	}
	return dir, ok
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

package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/berth-dev/berth/internal/testsupport"
)

func TestMain(m *testing.M) { testsupport.Main(m) }

// slowUpstream is an in-process registry whose blob responses are paced so
// a pull is still running when the test acts.
func slowUpstream(t *testing.T, bytesPerSec int) *httptest.Server {
	t.Helper()
	reg := registry.New(registry.Logger(nilLogger()))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
			reg.ServeHTTP(&pacedWriter{ResponseWriter: w, rate: bytesPerSec}, r)
			return
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv
}

type pacedWriter struct {
	http.ResponseWriter
	rate int
}

func (p *pacedWriter) Write(b []byte) (int, error) {
	written := 0
	for len(b) > 0 {
		n := min(len(b), 64<<10)
		m, err := p.ResponseWriter.Write(b[:n])
		written += m
		if err != nil {
			return written, err
		}
		if f, ok := p.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		time.Sleep(time.Duration(float64(n) / float64(p.rate) * float64(time.Second)))
		b = b[n:]
	}
	return written, nil
}

type berthProc struct {
	cmd    *exec.Cmd
	addr   string
	data   string
	log    *bytes.Buffer
	logMu  *sync.Mutex
	exited chan error
}

type lockedBuffer struct {
	mu  *sync.Mutex
	buf *bytes.Buffer
}

func (l lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (b *berthProc) logText() string {
	b.logMu.Lock()
	defer b.logMu.Unlock()
	return b.log.String()
}

// startBerth runs the built binary: lifecycle is about signals and exit
// codes, which only a real process shows.
func startBerth(t *testing.T, args ...string) *berthProc {
	t.Helper()
	b := &berthProc{addr: testsupport.FreeAddr(t), data: t.TempDir(), log: &bytes.Buffer{}, logMu: &sync.Mutex{}, exited: make(chan error, 1)}
	args = append([]string{"serve", "--listen", b.addr, "--data", b.data}, args...)
	b.cmd = exec.Command(testsupport.BerthBinary(t), args...)
	b.cmd.Stdout = lockedBuffer{b.logMu, b.log}
	b.cmd.Stderr = lockedBuffer{b.logMu, b.log}
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { b.exited <- b.cmd.Wait() }()
	t.Cleanup(func() {
		b.cmd.Process.Kill()
		if t.Failed() {
			t.Logf("berth log:\n%s", b.logText())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get("http://" + b.addr + "/v2/"); err == nil {
			resp.Body.Close()
			return b
		}
		select {
		case err := <-b.exited:
			t.Fatalf("berth exited early: %v\n%s", err, b.logText())
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("berth did not start:\n%s", b.logText())
	return nil
}

func pushImage(t *testing.T, upstream, repo string, layerSize int64) (tag string, blobs []string) {
	t.Helper()
	img, err := random.Image(layerSize, 1)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(strings.TrimPrefix(upstream, "http://")+"/"+repo+":v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}
	layers, _ := img.Layers()
	for _, l := range layers {
		d, _ := l.Digest()
		blobs = append(blobs, d.String())
	}
	return "v1", blobs
}

func TestSIGTERMLetsAPullFinish(t *testing.T) {
	up := slowUpstream(t, 4<<20)
	_, blobs := pushImage(t, up.URL, "library/big", 6<<20)
	b := startBerth(t, "--upstream", "docker.io="+up.URL, "--shutdown-timeout", "30s")

	resp, err := http.Get("http://" + b.addr + "/v2/big/blobs/" + blobs[0])
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	h := sha256.New()
	if _, err := io.CopyN(h, resp.Body, 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(h, resp.Body); err != nil {
		t.Fatalf("pull cut short by SIGTERM: %v", err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != blobs[0] {
		t.Fatalf("digest %s, want %s", got, blobs[0])
	}
	select {
	case err := <-b.exited:
		if err != nil {
			t.Fatalf("berth exited with %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("berth did not exit after SIGTERM")
	}
	tmp, _ := os.ReadDir(filepath.Join(b.data, "tmp"))
	if len(tmp) != 0 {
		t.Fatalf("partial files left behind: %v", tmp)
	}
	if !strings.Contains(b.logText(), "shutting down") {
		t.Fatalf("no shutdown log:\n%s", b.logText())
	}
}

func TestSIGTERMCutsDownloadsAtDeadlineLeavingNothingPartial(t *testing.T) {
	up := slowUpstream(t, 1<<20)
	_, blobs := pushImage(t, up.URL, "library/big", 8<<20)
	b := startBerth(t, "--upstream", "docker.io="+up.URL, "--shutdown-timeout", "500ms")
	resp, err := http.Get("http://" + b.addr + "/v2/big/blobs/" + blobs[0])
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	io.CopyN(io.Discard, resp.Body, 1024)
	b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("berth did not exit after its shutdown deadline")
	}
	tmp, _ := os.ReadDir(filepath.Join(b.data, "tmp"))
	if len(tmp) != 0 {
		t.Fatalf("partial files left behind: %v", tmp)
	}
	blobFiles, _ := filepath.Glob(filepath.Join(b.data, "blobs", "*", "sha256", "*"))
	if len(blobFiles) != 0 {
		t.Fatalf("an unfinished blob became visible: %v", blobFiles)
	}
}

func TestSIGHUPReloadsAndRejectsBadConfig(t *testing.T) {
	up := slowUpstream(t, 64<<20)
	pushImage(t, up.URL, "team/app", 1024)
	cfgPath := filepath.Join(t.TempDir(), "berth.yml")
	write := func(body string) {
		if err := os.WriteFile(cfgPath, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(fmt.Sprintf("upstreams:\n  docker.io:\n    url: %s\n", up.URL))
	b := startBerth(t, "--config", cfgPath)
	status := func(path string) int {
		resp, err := http.Get("http://" + b.addr + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := status("/v2/quay.test/team/app/manifests/v1"); got != 404 {
		t.Fatalf("unconfigured registry answered %d, want 404", got)
	}
	waitLog := func(want string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !strings.Contains(b.logText(), want) {
			if time.Now().After(deadline) {
				t.Fatalf("log never said %q:\n%s", want, b.logText())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	write(fmt.Sprintf("upstreams:\n  docker.io:\n    url: %s\n  quay.test:\n    url: %s\ntag_ttl: 1m\nsource_idle_timeout: 2s\n", up.URL, up.URL))
	b.cmd.Process.Signal(syscall.SIGHUP)
	waitLog("configuration reloaded")
	for _, change := range []string{"tag_ttl: 5m0s -> 1m0s", "source_idle_timeout: 15s -> 2s"} {
		if !strings.Contains(b.logText(), change) {
			t.Errorf("reload log does not say %q:\n%s", change, b.logText())
		}
	}
	if got := status("/v2/quay.test/team/app/manifests/v1"); got != 200 {
		t.Fatalf("after reload the new upstream answered %d, want 200", got)
	}

	write(fmt.Sprintf("upstreams:\n  docker.io:\n    url: %s\ntag_ttl: later\n", up.URL))
	b.cmd.Process.Signal(syscall.SIGHUP)
	waitLog("configuration reload rejected")
	if !strings.Contains(b.logText(), "line 4") {
		t.Errorf("rejection does not name the line:\n%s", b.logText())
	}
	if got := status("/v2/quay.test/team/app/manifests/v1"); got != 200 {
		t.Fatalf("a rejected reload changed the running config: %d", got)
	}
}

func TestServeRefusesBadConfig(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		body string
		args []string
		want string
	}{
		{"bogus: true\n", nil, `line 1: unknown key "bogus"`},
		{"tag_ttl: 5 minutes\n", nil, `line 1: "5 minutes" is not a duration`},
		{"cache:\n  size: huge\n", nil, `line 2: "huge" is not a size`},
		{"data: /proc/1/berth\n", nil, "line 1: data: cannot create /proc/1/berth"},
		{"", []string{"--upstream", "docker.io"}, `--upstream: "docker.io" is not HOST=URL`},
	}
	for i, tc := range cases {
		p := filepath.Join(dir, fmt.Sprintf("c%d.yml", i))
		os.WriteFile(p, []byte(tc.body), 0o644)
		args := append([]string{"serve", "--config", p}, tc.args...)
		if tc.body == "" {
			args = append([]string{"serve", "--data", dir}, tc.args...)
		}
		var stderr bytes.Buffer
		cmd := exec.Command(testsupport.BerthBinary(t), args...)
		cmd.Stderr = &stderr
		err := cmd.Run()
		ee, ok := err.(*exec.ExitError)
		if !ok || ee.ExitCode() != 2 {
			t.Errorf("%q: exit %v, want 2", tc.body, err)
		}
		msg := strings.TrimSpace(stderr.String())
		if !strings.Contains(msg, tc.want) || strings.Contains(msg, "\n") {
			t.Errorf("%q: stderr %q, want one line containing %q", tc.body, msg, tc.want)
		}
	}
}

func TestConfigSubcommand(t *testing.T) {
	var out, errb bytes.Buffer
	if code := configMain([]string{"default"}, &out, &errb); code != 0 {
		t.Fatalf("config default exit %d", code)
	}
	p := filepath.Join(t.TempDir(), "default.yml")
	os.WriteFile(p, bytes.ReplaceAll(out.Bytes(), []byte(`data: ""`), []byte("data: "+t.TempDir())), 0o644)
	out.Reset()
	if code := configMain([]string{"check", p}, &out, &errb); code != 0 || !strings.Contains(out.String(), "ok") {
		t.Fatalf("the printed default must check ok: exit %d, %s %s", code, out.String(), errb.String())
	}
	bad := filepath.Join(t.TempDir(), "bad.yml")
	os.WriteFile(bad, []byte("listen: here\n"), 0o644)
	errb.Reset()
	if code := configMain([]string{"check", bad}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "line 1: listen") {
		t.Fatalf("bad file: exit %d, %s", code, errb.String())
	}
	if code := configMain([]string{"frobnicate"}, &out, &errb); code != 2 {
		t.Fatalf("unknown subcommand exit %d", code)
	}
}

func nilLogger() *log.Logger { return log.New(io.Discard, "", 0) }

// berth answers /v2/ before its first health round is done (an upstream
// that hangs holds that round for its timeout); a SIGHUP in that window is
// a reload, not the end of the process.
func TestSIGHUPWhileStarting(t *testing.T) {
	hang, err := net.Listen("tcp", "127.0.0.1:0") // accepts, never answers
	if err != nil {
		t.Fatal(err)
	}
	defer hang.Close()
	b := startBerth(t, "--upstream", "docker.io=http://"+hang.Addr().String())
	if err := b.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-b.exited:
		t.Fatalf("SIGHUP during start-up ended berth: %v\n%s", err, b.logText())
	case <-time.After(2 * time.Second):
	}
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(b.logText(), "configuration reloaded") {
		if time.Now().After(deadline) {
			t.Fatalf("the early SIGHUP was never handled:\n%s", b.logText())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

package main

import (
	"bytes"
	"debug/elf"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// healthcheckServer answers every request with code and body, as a berth
// would on /readyz.
func healthcheckServer(t *testing.T, code int, body string) (addr string) {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/readyz" && r.URL.Path != "/healthz" {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(code)
		w.Write([]byte(body))
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

func noEnv(string) (string, bool) { return "", false }

func runHealthcheckForTest(args []string, env func(string) (string, bool)) (code int, stdout, stderr string) {
	var o, e bytes.Buffer
	code = healthcheckMain(args, env, &o, &e)
	return code, o.String(), e.String()
}

func TestHealthcheckExitCodes(t *testing.T) {
	healthy := healthcheckServer(t, 200, "ok\n")
	unhealthy := healthcheckServer(t, 503, "[+]data-dir ok\n[-]store failed: index not open\nreadyz check failed\n")
	closed := testsupport.FreeAddr(t)
	_, healthyPort, _ := net.SplitHostPort(healthy)

	for _, tc := range []struct {
		name   string
		args   []string
		env    map[string]string
		code   int
		stderr string
	}{
		{name: "healthy", args: []string{"--listen", healthy}, code: 0},
		{name: "any-address listen", args: []string{"--listen", "0.0.0.0:" + healthyPort}, code: 0},
		{name: "port-only listen", args: []string{"--listen=:" + healthyPort, "--path", "/healthz"}, code: 0},
		{name: "listen from BERTH_LISTEN", env: map[string]string{"BERTH_LISTEN": ":" + healthyPort}, code: 0},
		{name: "flag beats BERTH_LISTEN", args: []string{"--listen", healthy}, env: map[string]string{"BERTH_LISTEN": closed}, code: 0},
		{name: "unhealthy", args: []string{"--listen", unhealthy}, code: 1,
			stderr: "berth healthcheck: unhealthy: http://" + unhealthy + "/readyz answered 503 Service Unavailable: store failed: index not open\n"},
		{name: "not running", args: []string{"--listen", closed}, code: 1,
			stderr: "berth healthcheck: unhealthy: nothing is listening on " + closed + " (is berth running?)\n"},
		{name: "not berth", args: []string{"--listen", healthy, "--path", "/v2/"}, code: 1, stderr: "answered 404"},
		{name: "unknown flag", args: []string{"--nope"}, code: 2, stderr: "flag provided but not defined"},
		{name: "bad timeout", args: []string{"--timeout", "soon"}, code: 2, stderr: "invalid value"},
		{name: "zero timeout", args: []string{"--timeout", "0s"}, code: 2, stderr: "--timeout must be positive"},
		{name: "bad listen", args: []string{"--listen", "5000"}, code: 2, stderr: "--listen: listen address \"5000\""},
		{name: "bad BERTH_LISTEN", env: map[string]string{"BERTH_LISTEN": "nohost"}, code: 2, stderr: "$BERTH_LISTEN"},
		{name: "extra argument", args: []string{"now"}, code: 2, stderr: `unexpected argument "now"`},
		{name: "help", args: []string{"--help"}, code: 0, stderr: "Exit status: 0 healthy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := func(k string) (string, bool) { v, ok := tc.env[k]; return v, ok }
			code, stdout, stderr := runHealthcheckForTest(tc.args, env)
			if code != tc.code {
				t.Fatalf("exit %d; want %d\nstdout: %s\nstderr: %s", code, tc.code, stdout, stderr)
			}
			if code == 0 && tc.stderr == "" && !strings.HasPrefix(stdout, "healthy: ") {
				t.Errorf("stdout %q", stdout)
			}
			if !strings.Contains(stderr, tc.stderr) {
				t.Errorf("stderr %q lacks %q", stderr, tc.stderr)
			}
			if code == 1 && strings.Count(stderr, "\n") != 1 {
				t.Errorf("want one line on stderr, got %q", stderr)
			}
		})
	}
}

func TestHealthcheckTimeout(t *testing.T) {
	hang := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-hang:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(hang)
	start := time.Now()
	code, _, stderr := runHealthcheckForTest([]string{"--listen", srv.Listener.Addr().String(), "--timeout", "200ms"}, noEnv)
	if code != 1 || !strings.Contains(stderr, "(--timeout 200ms)") {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Fatalf("a 200ms timeout took %s", took)
	}
}

func TestHealthcheckListenFromConfigFile(t *testing.T) {
	addr := healthcheckServer(t, 200, "ok\n")
	cfg := filepath.Join(t.TempDir(), "berth.yaml")
	if err := os.WriteFile(cfg, []byte("listen: "+addr+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runHealthcheckForTest([]string{"--config", cfg}, noEnv); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	// BERTH_LISTEN wins over the file, as it does for berth serve.
	env := func(k string) (string, bool) { return testsupport.FreeAddr(t), k == "BERTH_LISTEN" }
	if code, _, _ := runHealthcheckForTest([]string{"--config", cfg}, env); code != 1 {
		t.Fatalf("exit %d; want 1 from the closed port in $BERTH_LISTEN", code)
	}
	if code, _, stderr := runHealthcheckForTest([]string{"--config", filepath.Join(t.TempDir(), "missing.yaml")}, noEnv); code != 2 || !strings.Contains(stderr, "missing.yaml") {
		t.Fatalf("missing config: exit %d, %q", code, stderr)
	}
}

// TestHealthcheckBinary builds berth as a container image would (static,
// no cgo) and runs the subcommand the way Docker's HEALTHCHECK runs it:
// exec'd directly, judged by its exit status alone.
func TestHealthcheckBinary(t *testing.T) {
	if testing.Short() && !testsupport.InCI() {
		t.Skip("-short: not building the berth binary")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "berth")
	build := exec.Command(goTool, "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("berth is dynamically linked; a scratch image cannot run it")
		}
	}
	f.Close()

	healthy := healthcheckServer(t, 200, "ok\n")
	unhealthy := healthcheckServer(t, 503, "[-]data-dir failed: read-only file system\nhealthz check failed\n")
	closed := testsupport.FreeAddr(t)
	for _, tc := range []struct {
		args []string
		code int
		out  string
	}{
		{[]string{"healthcheck", "--listen", healthy}, 0, "healthy: "},
		{[]string{"healthcheck", "--listen", unhealthy}, 1, "data-dir failed: read-only file system"},
		{[]string{"healthcheck", "--listen", closed}, 1, "nothing is listening on " + closed},
		{[]string{"healthcheck", "--timeout", "x"}, 2, "invalid value"},
	} {
		cmd := exec.Command(bin, tc.args...)
		// An empty environment, as in a scratch image.
		cmd.Env = []string{}
		out, err := cmd.CombinedOutput()
		code := 0
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			code = exit.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != tc.code || !strings.Contains(string(out), tc.out) {
			t.Errorf("berth %s: exit %d, output %q; want exit %d with %q", strings.Join(tc.args, " "), code, out, tc.code, tc.out)
		}
	}
}

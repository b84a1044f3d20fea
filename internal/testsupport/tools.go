package testsupport

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// InCI reports whether missing parts must fail tests instead of skipping them.
func InCI() bool { return os.Getenv("CI") == "true" }

// SkipOrFail skips with a reason a person can act on, or fails under CI=true,
// where a skip would let a broken environment look green.
func SkipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("CI=true, so this cannot be skipped: %s", msg)
	}
	t.Skipf("SKIP: %s", msg)
}

// RequireTool returns the path of an executable found on PATH, or skips the
// test (fails it under CI=true) when it is missing.
func RequireTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		SkipOrFail(t, "%s is not on PATH (scripts/test installs it into ./bin or with apt)", name)
	}
	return p
}

// RequireRoot skips (fails under CI=true) unless the test runs as root, which
// dockerd and containerd need for mounts and device nodes.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		SkipOrFail(t, "needs root (dockerd and containerd mount and chown)")
	}
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago. The
// port is released before return, so another process could take it first;
// the helpers that use it notice that as a start-up failure. Nothing listens
// there until something does, so it also serves as "a stopped server".
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// FreeAddr is FreePort as "127.0.0.1:PORT".
func FreeAddr(t testing.TB) string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(FreePort(t)))
}

// ServeLoopback serves h on a free 127.0.0.1 port until the test ends and
// returns "127.0.0.1:PORT". The listener is opened before return, so unlike
// FreeAddr no other process can take the port. Cleanup closes every
// connection at once rather than waiting for requests in flight, which may
// be stalled on purpose.
func ServeLoopback(t testing.TB, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening on loopback: %v", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// ModuleRoot is the directory holding berth's go.mod, found by walking up from
// the working directory (go test runs in the package directory).
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = parent
	}
}

// ShortTempDir makes a directory with a short path under /tmp and removes it
// at cleanup. Unix socket paths are limited to 107 bytes, and t.TempDir()
// paths carry the test name, so daemons' sockets go here instead.
func ShortTempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatalf("temp dir: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

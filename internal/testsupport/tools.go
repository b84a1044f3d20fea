package testsupport

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
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

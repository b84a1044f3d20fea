package testsupport

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
)

var build struct {
	once sync.Once
	dir  string
	bin  string
	err  error
}

// raceBuild reports whether this test binary was built with -race; berth is
// then built with -race too, so races in the daemon fail the tests that run
// it.
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
// A build failure fails the test: it is never a reason to skip. A package
// that uses it runs its tests through Main, which removes the build.
func BerthBinary(t testing.TB) string {
	t.Helper()
	build.once.Do(func() {
		root, err := ModuleRoot()
		if err != nil {
			build.err = err
			return
		}
		build.dir, err = os.MkdirTemp("", "berth-test-build")
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

// Main runs a package's tests, removes the binary BerthBinary built, if it
// built one, and exits; call it from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
	os.Exit(code)
}

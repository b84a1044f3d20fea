package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The testdata files are real `go test -json` output: mixed.json from a
// package with a passing, a failing, a skipped test and subtests, panic.json
// from a test that panics, buildfail.json from a package that does not
// compile, killed.json is panic.json cut off before its end events, as when
// the test binary is killed.
func runFile(t *testing.T, file string) (string, string, bool) {
	t.Helper()
	in, err := os.Open(filepath.Join("testdata", file))
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	var out bytes.Buffer
	logPath := filepath.Join(t.TempDir(), "full.log")
	ok, err := run(in, &out, logPath)
	if err != nil {
		t.Fatal(err)
	}
	log, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	return out.String(), string(log), ok
}

func wantLines(t *testing.T, got string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(got, w) {
			t.Errorf("output lacks %q:\n%s", w, got)
		}
	}
}

func TestMixedResults(t *testing.T) {
	out, log, ok := runFile(t, "mixed.json")
	if ok {
		t.Error("a run with failures reported success")
	}
	wantLines(t, out,
		"=== FAIL: bi TestFail",
		"broken thing",
		"=== FAIL: bi TestSub/b",
		"sub failed",
		"Skipped tests (1):\n  bi TestSkip: x_test.go:5: SKIP: crane is not on PATH\n",
		"Failed tests (3):",
		"\n2 passed, 3 failed, 1 skipped\n",
	)
	if strings.Contains(out, "fine") {
		t.Errorf("a passing test's output was printed:\n%s", out)
	}
	wantLines(t, log, "fine", "broken thing", "looking")
}

func TestPanicShowsStack(t *testing.T) {
	out, _, ok := runFile(t, "panic.json")
	if ok {
		t.Error("a panicking test reported success")
	}
	wantLines(t, out, "=== FAIL: bi/pk TestPanic", "panic: boom", "p_test.go:3", "=== PACKAGE FAILED: bi/pk", "0 passed, 1 failed, 0 skipped")
}

func TestBuildFailure(t *testing.T) {
	out, _, ok := runFile(t, "buildfail.json")
	if ok {
		t.Error("a build failure reported success")
	}
	wantLines(t, out, "=== BUILD FAILED: bi/bf", "undefined: undefined", "Failed packages: bi/bf")
}

func TestKilledBinary(t *testing.T) {
	out, _, ok := runFile(t, "killed.json")
	if ok {
		t.Error("a test with no end event reported success")
	}
	wantLines(t, out, "=== DID NOT FINISH: bi/pk TestPanic", "panic: boom", "0 passed, 1 failed, 0 skipped")
}

func TestAllPassing(t *testing.T) {
	in := strings.NewReader(`{"Action":"run","Package":"p","Test":"TestA"}
{"Action":"output","Package":"p","Test":"TestA","Output":"=== RUN   TestA\n"}
{"Action":"pass","Package":"p","Test":"TestA","Elapsed":1.5}
{"Action":"output","Package":"p","Output":"ok  \tp\t1.6s\n"}
{"Action":"pass","Package":"p","Elapsed":1.6}
`)
	var out bytes.Buffer
	ok, err := run(in, &out, "")
	if err != nil || !ok {
		t.Fatalf("ok=%v err=%v\n%s", ok, err, out.String())
	}
	wantLines(t, out.String(), "ok  \tp\t1.6s\n", "1.5s  p TestA", "\n1 passed, 0 failed, 0 skipped\n")
}

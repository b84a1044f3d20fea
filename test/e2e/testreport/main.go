// Command testreport turns `go test -json` into what a person reading a CI
// log needs: package results as they finish, the full output of every failed
// test, the reason of every skipped test, the slowest tests, and a closing
// "N passed, N failed, N skipped" line. Everything, passing tests included,
// also goes to the -log file.
//
//	go test -json ./... | go run ./test/e2e/testreport -log test.log
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"
)

// event is one line of `go test -json` (cmd/test2json), including the build
// events go test adds since Go 1.24.
type event struct {
	Time       time.Time
	Action     string
	Package    string
	ImportPath string
	Test       string
	Elapsed    float64
	Output     string
}

type testKey struct{ pkg, test string }

type result struct {
	key     testKey
	elapsed float64
	reason  string
}

type report struct {
	out, log io.Writer

	output   map[testKey][]string // buffered output per test; "" test is the package
	passed   int
	failed   []result
	skipped  []result
	timings  []result
	pkgFails []string
	builds   map[string][]string // build output per import path
}

func newReport(out, log io.Writer) *report {
	return &report{out: out, log: log, output: map[testKey][]string{}, builds: map[string][]string{}}
}

func (r *report) handle(e event) {
	switch e.Action {
	case "build-output":
		r.builds[e.ImportPath] = append(r.builds[e.ImportPath], e.Output)
		fmt.Fprint(r.log, e.Output)
		return
	case "build-fail":
		fmt.Fprintf(r.out, "\n=== BUILD FAILED: %s\n%s", e.ImportPath, strings.Join(r.builds[e.ImportPath], ""))
		return
	}
	k := testKey{e.Package, e.Test}
	switch e.Action {
	case "output":
		r.output[k] = append(r.output[k], e.Output)
		fmt.Fprint(r.log, e.Output)
	case "pass", "fail", "skip":
		if e.Test == "" {
			r.packageDone(e)
		} else {
			r.testDone(k, e)
		}
	}
}

func (r *report) testDone(k testKey, e event) {
	res := result{key: k, elapsed: e.Elapsed}
	lines := r.output[k]
	delete(r.output, k)
	switch e.Action {
	case "pass":
		r.passed++
	case "fail":
		r.failed = append(r.failed, res)
		fmt.Fprintf(r.out, "\n=== FAIL: %s %s (%.1fs)\n%s", k.pkg, k.test, e.Elapsed, strings.Join(lines, ""))
	case "skip":
		res.reason = skipReason(lines)
		r.skipped = append(r.skipped, res)
	}
	if !strings.Contains(k.test, "/") {
		r.timings = append(r.timings, res)
	}
}

// skipReason is the message given to t.Skip: the last line the test logged
// that is not test2json's own framing.
func skipReason(lines []string) string {
	for i := len(lines) - 1; i >= 0; i-- {
		l := strings.TrimSpace(lines[i])
		if l == "" || strings.HasPrefix(l, "=== ") || strings.HasPrefix(l, "--- ") {
			continue
		}
		return l
	}
	return "(no reason given)"
}

func (r *report) packageDone(e event) {
	k := testKey{e.Package, ""}
	lines := r.output[k]
	delete(r.output, k)
	if e.Action == "fail" {
		r.pkgFails = append(r.pkgFails, e.Package)
		// A panic, a -timeout or a failing TestMain shows up only here.
		fmt.Fprintf(r.out, "\n=== PACKAGE FAILED: %s\n%s", e.Package, strings.Join(lines, ""))
		return
	}
	for _, l := range lines {
		if strings.HasPrefix(l, "ok ") || strings.HasPrefix(l, "ok\t") || strings.HasPrefix(l, "?") {
			fmt.Fprint(r.out, l)
		}
	}
	if len(lines) == 0 {
		fmt.Fprintf(r.out, "%-5s %s\n", e.Action, e.Package)
	}
}

// finish prints the summary and reports whether everything passed.
func (r *report) finish() bool {
	// Tests still open had no end event: the binary died under them.
	var open []testKey
	for k := range r.output {
		if k.test != "" {
			open = append(open, k)
		}
	}
	sort.Slice(open, func(i, j int) bool { return open[i].pkg+open[i].test < open[j].pkg+open[j].test })
	for _, k := range open {
		r.failed = append(r.failed, result{key: k})
		fmt.Fprintf(r.out, "\n=== DID NOT FINISH: %s %s\n%s", k.pkg, k.test, strings.Join(r.output[k], ""))
	}

	sort.Slice(r.timings, func(i, j int) bool { return r.timings[i].elapsed > r.timings[j].elapsed })
	if n := min(len(r.timings), 10); n > 0 {
		fmt.Fprintf(r.out, "\nSlowest tests:\n")
		for _, t := range r.timings[:n] {
			fmt.Fprintf(r.out, "  %7.1fs  %s %s\n", t.elapsed, t.key.pkg, t.key.test)
		}
	}
	if len(r.skipped) > 0 {
		fmt.Fprintf(r.out, "\nSkipped tests (%d):\n", len(r.skipped))
		for _, s := range r.skipped {
			fmt.Fprintf(r.out, "  %s %s: %s\n", s.key.pkg, s.key.test, s.reason)
		}
	}
	if len(r.failed) > 0 {
		fmt.Fprintf(r.out, "\nFailed tests (%d):\n", len(r.failed))
		for _, f := range r.failed {
			fmt.Fprintf(r.out, "  %s %s\n", f.key.pkg, f.key.test)
		}
	}
	if len(r.pkgFails) > 0 {
		fmt.Fprintf(r.out, "\nFailed packages: %s\n", strings.Join(r.pkgFails, " "))
	}
	fmt.Fprintf(r.out, "\n%d passed, %d failed, %d skipped\n", r.passed, len(r.failed), len(r.skipped))
	return len(r.failed) == 0 && len(r.pkgFails) == 0
}

func run(in io.Reader, out io.Writer, logPath string) (bool, error) {
	log := io.Discard
	if logPath != "" {
		f, err := os.Create(logPath)
		if err != nil {
			return false, err
		}
		defer f.Close()
		log = f
	}
	r := newReport(out, log)
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			// go test prints some errors (a bad flag, a missing package)
			// as plain text.
			fmt.Fprintf(out, "%s\n", line)
			fmt.Fprintf(log, "%s\n", line)
			continue
		}
		r.handle(e)
	}
	if err := sc.Err(); err != nil {
		return false, err
	}
	return r.finish(), nil
}

func main() {
	logPath := flag.String("log", "", "write the full output of every test to `FILE`")
	flag.Parse()
	ok, err := run(os.Stdin, os.Stdout, *logPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testreport: %v\n", err)
		os.Exit(2)
	}
	if !ok {
		os.Exit(1)
	}
}

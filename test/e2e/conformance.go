package e2e

import (
	"context"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// ConformanceOptions runs the OCI distribution-spec conformance suite in
// pull-only mode against content that was seeded beforehand.
type ConformanceOptions struct {
	Registry  string   // host:port, plain HTTP
	Repo      string   // repository holding the seeded content
	Tags      []string // seeded tags
	Manifests []string // seeded manifest digests (images, indexes, children)
	Blobs     []string // seeded blob digests
	TagList   bool     // also test GET /v2/<repo>/tags/list
	Referrers bool     // also test the referrers API
}

// ConformanceResult is what the suite printed, parsed.
type ConformanceResult struct {
	Output string
	Counts map[string]int    // "Pass", "FAIL", "Error", "Skip", "Disabled"
	Tests  map[string]string // test name below "OCI Conformance Test/" → status
	Result string            // overall: "Pass" or "FAIL"
}

var (
	confCount  = regexp.MustCompile(`(?m)^  (Disabled|Skip|Pass|FAIL|Error)\.+:\s+(\d+)$`)
	confTest   = regexp.MustCompile(`(?m)^\s+OCI Conformance Test/(.+): (Pass|FAIL|Error|Skip|Disabled)$`)
	confResult = regexp.MustCompile(`(?m)^OCI Conformance Result: (\S+)`)
)

// RunConformance runs the `conformance` binary (built from
// github.com/opencontainers/distribution-spec/conformance) with push and
// delete turned off and the seeded content as its read-only data, and fails
// the test unless every enabled check passed and none was skipped.
//
// The verdict is read from the report the suite prints, not from its exit
// status: in pull-only mode the suite (v0.0.0-20260831232431-97274622c111)
// panics while writing results.yaml after printing its report, and in other
// cases returns 0 from an error path before it looks at the results.
func RunConformance(t testing.TB, o ConformanceOptions) *ConformanceResult {
	t.Helper()
	bin := testsupport.RequireTool(t, "conformance")
	dir := t.TempDir()
	env := []string{
		"OCI_REGISTRY=" + o.Registry,
		"OCI_TLS=disabled",
		"OCI_REPO1=" + o.Repo,
		"OCI_REPO2=" + o.Repo,
		"OCI_API_PULL=true",
		"OCI_API_PUSH=false",
		"OCI_API_BLOBS_DELETE=false",
		"OCI_API_MANIFESTS_DELETE=false",
		"OCI_API_TAGS_DELETE=false",
		"OCI_API_TAGS_LIST=" + strconv.FormatBool(o.TagList),
		"OCI_API_REFERRER=" + strconv.FormatBool(o.Referrers),
		"OCI_RO_DATA_TAGS=" + strings.Join(o.Tags, " "),
		"OCI_RO_DATA_MANIFESTS=" + strings.Join(o.Manifests, " "),
		"OCI_RO_DATA_BLOBS=" + strings.Join(o.Blobs, " "),
		"OCI_RESULTS_DIR=" + dir,
		"OCI_LOG=info",
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin)
	cmd.Dir = dir // the suite reads ./oci-conformance.yaml if there is one
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OCI_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("conformance suite did not finish within 5m:\n%s", out)
	}
	res := &ConformanceResult{Output: string(out), Counts: map[string]int{}, Tests: map[string]string{}}
	for _, m := range confCount.FindAllStringSubmatch(res.Output, -1) {
		n, _ := strconv.Atoi(m[2])
		res.Counts[m[1]] = n
	}
	for _, m := range confTest.FindAllStringSubmatch(res.Output, -1) {
		res.Tests[m[1]] = m[2]
	}
	if m := confResult.FindStringSubmatch(res.Output); m != nil {
		res.Result = m[1]
	}
	if err != nil && !strings.Contains(res.Output, "ReportResultsYAML") {
		t.Errorf("conformance suite failed: %v", err)
	}
	if res.Result != "Pass" || res.Counts["FAIL"] != 0 || res.Counts["Error"] != 0 || res.Counts["Skip"] != 0 || res.Counts["Pass"] == 0 {
		t.Errorf("conformance suite: result %q, counts %v (want Pass with no FAIL, Error or Skip)", res.Result, res.Counts)
	}
	for _, must := range []string{"ping", "read-only/head", "read-only/pull", "missing-manifest/by-digest", "missing-manifest/by-tag"} {
		if res.Tests[must] != "Pass" {
			t.Errorf("conformance check %q: %q, want Pass", must, res.Tests[must])
		}
	}
	if t.Failed() {
		t.Logf("conformance output:\n%s", res.Output)
	}
	return res
}

// SeedConformance pushes an image (tag "image") and a two-platform index
// (tag "index") to host/repo and returns the read-only data that describes
// them; the caller sets Registry to where the suite should pull from.
func SeedConformance(t testing.TB, host, repo string) ConformanceOptions {
	t.Helper()
	img := PushImage(t, OCI, host, repo, "image", 8<<10, 2)
	idx := PushIndex(t, OCI, host, repo, "index", 4<<10, 1)
	o := ConformanceOptions{
		Repo:      repo,
		Tags:      []string{"image", "index"},
		Manifests: []string{img.Digest, idx.Digest},
	}
	for _, b := range img.Blobs() {
		o.Blobs = append(o.Blobs, b.Digest)
	}
	for _, child := range idx.Images {
		o.Manifests = append(o.Manifests, child.Digest)
		for _, b := range child.Blobs() {
			o.Blobs = append(o.Blobs, b.Digest)
		}
	}
	return o
}

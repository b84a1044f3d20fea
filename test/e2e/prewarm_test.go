package e2e

// Pre-warm (docs/prewarm.md): `berth prewarm` against several `berth serve`
// nodes on one MinIO bucket in front of a real registry. Each blob crosses
// from the upstream once for the whole fleet, every node ends with the
// images on its own disk, and a pull afterwards asks neither the upstream
// nor the bucket for anything.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/berth-dev/berth/internal/testsupport"
)

// pwFleet is a fleet whose nodes have a fleet port (fleet token) and an
// admin token file: what `berth prewarm` talks to.
type pwFleet struct {
	*fleet
	fleetTokenFile string
	adminToken     string
	adminFile      string
}

type pwNode struct {
	*Berth
	FleetURL string
	args     []string
}

func newPWFleet(t *testing.T) *pwFleet {
	t.Helper()
	f := &pwFleet{fleet: startFleet(t)}
	dir := t.TempDir()
	f.fleetTokenFile = filepath.Join(dir, "fleet-tokens")
	writeTokenFile(t, f.fleetTokenFile, newHexToken(t))
	f.adminToken = newHexToken(t)
	f.adminFile = filepath.Join(dir, "admin-tokens")
	writeTokenFile(t, f.adminFile, f.adminToken)
	return f
}

func newHexToken(t *testing.T) string {
	t.Helper()
	b := make([]byte, 20)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func writeTokenFile(t *testing.T, path, tok string) {
	t.Helper()
	if err := os.WriteFile(path, []byte("# tokens\n"+tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// node starts one node with data in dir ("" for a new one) on fleetAddr
// ("" for a free one).
func (f *pwFleet) node(t *testing.T, dir, fleetAddr string, extra ...string) *pwNode {
	t.Helper()
	if fleetAddr == "" {
		fleetAddr = testsupport.FreeAddr(t)
	}
	u := "http://" + fleetAddr
	args := append([]string{"--fleet-listen", fleetAddr, "--s3-advertise", u, "--fleet-token-file", f.fleetTokenFile,
		"--admin-token-file", f.adminFile, "--tag-ttl", "5m"}, extra...)
	return &pwNode{Berth: f.host(t, dir, args...), FleetURL: u, args: extra}
}

func (f *pwFleet) nodes(t *testing.T, n int, extra ...string) []*pwNode {
	t.Helper()
	out := make([]*pwNode, n)
	for i := range out {
		out[i] = f.node(t, "", "", extra...)
	}
	return out
}

func nodeURLs(ns []*pwNode) string {
	var us []string
	for _, n := range ns {
		us = append(us, n.FleetURL)
	}
	return strings.Join(us, ",")
}

// prewarmRun is one `berth prewarm` process's outcome.
type prewarmRun struct {
	code           int
	stdout, stderr string
	events         []map[string]any
}

func (r prewarmRun) event(kind string) []map[string]any {
	var out []map[string]any
	for _, e := range r.events {
		if e["event"] == kind {
			out = append(out, e)
		}
	}
	return out
}

func runPrewarmCmd(t *testing.T, stdin string, args ...string) prewarmRun {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, testsupport.BerthBinary(t), append([]string{"prewarm"}, args...)...)
	cmd.Env = berthEnv()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	err := cmd.Run()
	r := prewarmRun{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("berth prewarm: %v", err)
	}
	sc := bufio.NewScanner(strings.NewReader(r.stdout))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var ev map[string]any
		if json.Unmarshal(sc.Bytes(), &ev) == nil {
			r.events = append(r.events, ev)
		}
	}
	t.Logf("berth prewarm %s: exit %d\nstderr:\n%s", strings.Join(args, " "), r.code, r.stderr)
	return r
}

func nodeGet(t *testing.T, url, token string) (int, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	buf.ReadFrom(resp.Body)
	return resp.StatusCode, buf.Bytes()
}

const deployYAML = `apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      initContainers:
        - {name: migrate, image: "docker.io/org/migrate:v1"}
      containers:
        - {name: web, image: "docker.io/org/web:v1"}
        - {name: sidecar, image: "org/sidecar:v1"}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report}
spec:
  jobTemplate:
    spec:
      template:
        spec:
          containers:
            - {name: report, image: "docker.io/org/web:v1"}
`

func TestPrewarmFiveNodes(t *testing.T) {
	f := newPWFleet(t)
	images := map[string]*PushedImage{
		"org/web":     PushImage(t, OCI, f.reg.Host, "org/web", "v1", 300<<10, 3),
		"org/migrate": PushImage(t, Docker, f.reg.Host, "org/migrate", "v1", 200<<10, 2),
		"org/sidecar": PushImage(t, OCI, f.reg.Host, "org/sidecar", "v1", 100<<10, 2),
	}
	nodes := f.nodes(t, 5)
	deploy := filepath.Join(t.TempDir(), "deploy.yaml")
	os.WriteFile(deploy, []byte(deployYAML), 0o644)

	r := runPrewarmCmd(t, "", "-f", deploy, "--nodes", nodeURLs(nodes), "--token-file", f.adminFile,
		"--pin", "1h", "--parallel", "2", "--output", "json")
	if r.code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s", r.code, r.stdout)
	}
	if s := r.event("summary"); len(s) != 1 || s[0]["met"] != true || s[0]["succeeded"] != float64(5) {
		t.Errorf("summary: %v", s)
	}
	if got := r.event("resolved"); len(got) != 3 {
		t.Errorf("resolved %d references, want 3: %v", len(got), got)
	}
	if len(r.event("progress")) == 0 || len(r.event("result")) != 5 {
		t.Errorf("progress events %d, results %d", len(r.event("progress")), len(r.event("result")))
	}
	if strings.Contains(r.stdout+r.stderr, f.adminToken) {
		t.Error("the admin token was printed")
	}
	for repo, img := range images {
		f.up.checkBlobGETs(t, "after pre-warm of "+repo, img.Blobs(), 1)
	}
	for _, n := range nodes {
		for _, img := range images {
			hostBlobs(t, n.Berth, img.Blobs())
		}
		if code, body := nodeGet(t, n.URL+"/berth/v1/warm", ""); code != 200 {
			t.Errorf("%s /berth/v1/warm: %d %s", n.Host, code, body)
		}
		if code, body := nodeGet(t, n.FleetURL+"/berth/v1/pins", f.adminToken); code != 200 || strings.Count(string(body), `"digest"`) != 10 {
			t.Errorf("%s pins: %d %s", n.Host, code, body)
		}
		if n.LogContains(f.adminToken) {
			t.Errorf("%s logged the admin token", n.Host)
		}
	}

	// A pull of every image on every node now asks nothing of the
	// upstream or the bucket.
	upBefore := len(f.up.requests())
	for _, n := range nodes {
		getsBefore := metric(t, n.Berth, "berth_s3_requests_total", "op", "GetObject")
		missBefore := metric(t, n.Berth, "berth_cache_lookups_total", "result", "miss")
		hitBefore := metric(t, n.Berth, "berth_cache_lookups_total", "result", "hit")
		for repo, img := range images {
			mustPull(t, n.Berth, repo, "v1", img)
		}
		if after := metric(t, n.Berth, "berth_s3_requests_total", "op", "GetObject"); after != getsBefore {
			t.Errorf("%s: pulls after pre-warm made %v S3 GETs", n.Host, after-getsBefore)
		}
		if miss := metric(t, n.Berth, "berth_cache_lookups_total", "result", "miss") - missBefore; miss != 0 {
			t.Errorf("%s: pulls after pre-warm missed the cache %v times", n.Host, miss)
		}
		if hits := metric(t, n.Berth, "berth_cache_lookups_total", "result", "hit") - hitBefore; hits < 10 {
			t.Errorf("%s: pulls after pre-warm hit the cache %v times, want at least one per blob (10)", n.Host, hits)
		}
	}
	if reqs := f.up.requests()[upBefore:]; len(reqs) != 0 {
		t.Errorf("pulls after pre-warm asked the upstream: %s", describe(reqs))
	}

	// A repeated pre-warm of warm nodes fetches nothing.
	r = runPrewarmCmd(t, "", "-f", deploy, "--nodes", nodeURLs(nodes), "--token-file", f.adminFile, "--output", "json")
	if r.code != 0 {
		t.Fatalf("repeat: exit %d\n%s", r.code, r.stdout)
	}
	for repo, img := range images {
		f.up.checkBlobGETs(t, "after the repeat of "+repo, img.Blobs(), 1)
	}

	// A node that is down: reported failed; the exit code follows --require.
	down := "http://" + testsupport.FreeAddr(t)
	all := nodeURLs(nodes) + "," + down
	r = runPrewarmCmd(t, "", "-f", deploy, "--nodes", all, "--token-file", f.adminFile, "--output", "json")
	if r.code != 1 || !strings.Contains(r.stderr, down) || !strings.Contains(r.stderr, "node_unreachable") {
		t.Errorf("a node down with --require all: exit %d, stderr %s", r.code, r.stderr)
	}
	for _, req := range []string{"5", "80%"} {
		if r := runPrewarmCmd(t, "", "-f", deploy, "--nodes", all, "--token-file", f.adminFile, "--output", "json", "--require", req); r.code != 0 {
			t.Errorf("a node down with --require %s: exit %d, want 0", req, r.code)
		}
	}
	if r := runPrewarmCmd(t, "", "-f", deploy, "--nodes", all, "--token-file", f.adminFile, "--output", "json", "--require", "6"); r.code != 1 {
		t.Errorf("a node down with --require 6: exit %d, want 1", r.code)
	}
}

func TestPrewarmBadInput(t *testing.T) {
	f := newPWFleet(t)
	img := PushImage(t, OCI, f.reg.Host, "org/app", "v1", 50<<10, 1)
	nodes := f.nodes(t, 2)

	// Bad references: each named with its kind; the good one is warmed; exit 1.
	r := runPrewarmCmd(t, "", "--nodes", nodeURLs(nodes), "--token-file", f.adminFile, "--output", "json",
		"org/app:v1", "org/app:missing", "Bad::Ref", "unknown.example/org/app:v1")
	if r.code != 1 {
		t.Errorf("bad references: exit %d, want 1", r.code)
	}
	kinds := map[string]string{}
	for _, e := range r.event("resolve_failed") {
		kinds[e["ref"].(string)] = e["error"].(map[string]any)["kind"].(string)
	}
	want := map[string]string{"org/app:missing": "not_found", "Bad::Ref": "invalid_reference", "unknown.example/org/app:v1": "unknown_registry"}
	for ref, k := range want {
		if kinds[ref] != k {
			t.Errorf("%s: kind %q, want %q (all: %v)", ref, kinds[ref], k, kinds)
		}
	}
	for _, n := range nodes {
		hostBlobs(t, n.Berth, img.Blobs())
	}

	// A wrong token: every node refuses; exit 1, the token not printed.
	wrong := filepath.Join(t.TempDir(), "wrong")
	writeTokenFile(t, wrong, "wrong-token-0123456789abcdef")
	r = runPrewarmCmd(t, "", "--nodes", nodeURLs(nodes), "--token-file", wrong, "--output", "json", "org/app:v1")
	if r.code != 1 || !strings.Contains(r.stderr, "unauthorized") || strings.Contains(r.stdout+r.stderr, "wrong-token-0123456789abcdef") {
		t.Errorf("wrong token: exit %d\n%s", r.code, r.stderr)
	}
	for _, n := range nodes {
		if n.LogContains("wrong-token-0123456789abcdef") {
			t.Errorf("%s logged the token", n.Host)
		}
	}

	// Bad usage: exit 2.
	for _, args := range [][]string{
		{"--nodes", nodeURLs(nodes)},
		{"org/app:v1"},
		{"--nodes", nodeURLs(nodes), "--require", "0", "org/app:v1"},
		{"--nodes", nodeURLs(nodes), "-f", "-"},
		{"--nodes", "ftp://x", "org/app:v1"},
	} {
		stdin := ""
		if strings.Contains(strings.Join(args, " "), "-f -") {
			stdin = "apiVersion: v1\nkind: Pod\nspec: {containers: [\n"
		}
		if r := runPrewarmCmd(t, stdin, args...); r.code != 2 {
			t.Errorf("%v: exit %d, want 2", args, r.code)
		}
	}
	// A manifest on stdin and a plain list work alike.
	r = runPrewarmCmd(t, "# list\norg/app:v1\n", "--nodes", nodeURLs(nodes), "--token-file", f.adminFile, "--output", "json", "-f", "-")
	if r.code != 0 {
		t.Errorf("plain list on stdin: exit %d", r.code)
	}

	// Nodes from DNS SRV records (a headless Service's), text output with
	// the summary table.
	name := "_fleet._tcp.berth.berth.svc.cluster.local."
	var srvs []dns.SRV
	for _, n := range nodes {
		_, port, _ := strings.Cut(strings.TrimPrefix(n.FleetURL, "http://"), ":")
		p, _ := strconv.Atoi(port)
		srvs = append(srvs, dns.SRV{Target: "localhost.", Port: uint16(p)})
	}
	dnsAddr := srvServer(t, name, srvs)
	r = runPrewarmCmd(t, "", "--nodes-dns", name, "--dns-server", dnsAddr, "--token-file", f.adminFile, "--output", "text", "org/app:v1")
	if r.code != 0 || !strings.Contains(r.stdout, "NODE") || !strings.Contains(r.stdout, "2 of 2 nodes warm; --require all met") {
		t.Errorf("nodes from SRV records, text output: exit %d\n%s", r.code, r.stdout)
	}
	if !strings.Contains(r.stdout, "http://localhost:") {
		t.Errorf("the summary does not name the nodes found by DNS:\n%s", r.stdout)
	}
}

// srvServer answers SRV queries for name on a loopback UDP port.
func srvServer(t *testing.T, name string, srvs []dns.SRV) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		if q := r.Question[0]; q.Qtype == dns.TypeSRV && q.Name == name {
			for _, rec := range srvs {
				rec.Hdr = dns.RR_Header{Name: name, Rrtype: dns.TypeSRV, Class: dns.ClassINET, Ttl: 5}
				m.Answer = append(m.Answer, &rec)
			}
		} else {
			m.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(m)
	})}
	go s.ActivateAndServe()
	t.Cleanup(func() { s.Shutdown() })
	return pc.LocalAddr().String()
}

func TestPrewarmPinSurvivesCachePressureAndRestart(t *testing.T) {
	f := newPWFleet(t)
	pinned := PushImage(t, OCI, f.reg.Host, "org/pinned", "v1", 1<<20, 2)
	others := []*PushedImage{
		PushImage(t, OCI, f.reg.Host, "org/other1", "v1", 1<<20, 2),
		PushImage(t, OCI, f.reg.Host, "org/other2", "v1", 1<<20, 2),
		PushImage(t, OCI, f.reg.Host, "org/other3", "v1", 1<<20, 2),
	}
	n := f.node(t, "", "", "--cache-size", "5MiB")
	r := runPrewarmCmd(t, "", "--nodes", n.FleetURL, "--token-file", f.adminFile, "--pin", "1h", "--output", "json", "org/pinned:v1")
	if r.code != 0 {
		t.Fatalf("exit %d", r.code)
	}
	for _, o := range others {
		mustPull(t, n.Berth, o.Repo, "v1", o)
	}
	if ev := metric(t, n.Berth, "berth_evictions_total"); ev == 0 {
		t.Fatalf("no eviction: the test put no pressure on the cache")
	}
	hostBlobs(t, n.Berth, pinned.Blobs())
	if code, body := nodeGet(t, n.URL+"/berth/v1/warm", ""); code != 200 {
		t.Errorf("warm after cache pressure: %d %s", code, body)
	}
	// A second pin that cannot fit beside the first is refused up front.
	big := PushImage(t, OCI, f.reg.Host, "org/big", "v1", 2<<20, 2)
	r = runPrewarmCmd(t, "", "--nodes", n.FleetURL, "--token-file", f.adminFile, "--pin", "1h", "--output", "json", "org/big:v1")
	if r.code != 1 || !strings.Contains(r.stderr, "no_space") {
		t.Errorf("a pin beyond the budget: exit %d, %s", r.code, r.stderr)
	}
	_ = big

	// Restart: the pin is still listed and held, the blobs still there.
	data, addr := n.Data, strings.TrimPrefix(n.FleetURL, "http://")
	n.Stop(t)
	n2 := f.node(t, data, addr, "--cache-size", "5MiB")
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, body := nodeGet(t, n2.URL+"/berth/v1/warm", "")
		if code == 200 && strings.Contains(string(body), `"pins":3`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after restart: warm %d %s", code, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, o := range others {
		mustPull(t, n2.Berth, o.Repo, "v1", o)
	}
	hostBlobs(t, n2.Berth, pinned.Blobs())
}

// A node listed under two URLs (its IP and a name) is one node: warmed
// once (one job on it), one row in the summary, counted once by --require;
// its node ID, which says so, survives a restart on the same data
// directory.
func TestPrewarmMergesTheURLsOfOneNode(t *testing.T) {
	f := newPWFleet(t)
	img := PushImage(t, OCI, f.reg.Host, "org/app", "v1", 200<<10, 2)
	a, b := f.node(t, "", ""), f.node(t, "", "")
	// Nodes are taken in URL order, the first filling the bucket: b, the
	// node listed twice, comes second, so it runs its own job only.
	if b.FleetURL < a.FleetURL {
		a, b = b, a
	}
	if !strings.HasPrefix(b.FleetURL, "http://127.0.0.1:") {
		t.Fatalf("the node's fleet URL %s is not on 127.0.0.1", b.FleetURL)
	}
	byName := strings.Replace(b.FleetURL, "127.0.0.1", "localhost", 1)
	facts := func(n *pwNode) map[string]any {
		t.Helper()
		code, body := nodeGet(t, n.FleetURL+"/berth/v1/node", f.adminToken)
		var m map[string]any
		if code != 200 || json.Unmarshal(body, &m) != nil {
			t.Fatalf("%s facts: %d %s", n.FleetURL, code, body)
		}
		return m
	}
	id := facts(b)["id"]
	if s, _ := id.(string); len(s) != 32 || id == facts(a)["id"] || facts(b)["hostname"] == "" {
		t.Fatalf("node IDs: %v and %v", facts(a), facts(b))
	}

	r := runPrewarmCmd(t, "", "--nodes", byName+","+a.FleetURL+","+b.FleetURL, "--token-file", f.adminFile, "--pin", "1h", "--output", "json", "org/app:v1")
	if r.code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s", r.code, r.stdout)
	}
	results := r.event("result")
	if len(results) != 2 {
		t.Fatalf("%d results for 3 URLs of 2 nodes: %v", len(results), results)
	}
	rb := results[1]
	if aliases, _ := rb["aliases"].([]any); rb["node"] != b.FleetURL || len(aliases) != 1 || aliases[0] != byName || rb["id"] != id || rb["state"] != "succeeded" {
		t.Errorf("the node listed twice: %v", rb)
	}
	if s := r.event("summary"); len(s) != 1 || s[0]["nodes"] != float64(2) || s[0]["urls"] != float64(3) || s[0]["succeeded"] != float64(2) {
		t.Errorf("summary: %v", s)
	}
	code, body := nodeGet(t, b.FleetURL+"/berth/v1/jobs", f.adminToken)
	var jobs []map[string]any
	if code != 200 || json.Unmarshal(body, &jobs) != nil || len(jobs) != 1 {
		t.Errorf("the node listed twice ran %d jobs, want 1: %d %s", len(jobs), code, body)
	}
	hostBlobs(t, b.Berth, img.Blobs())
	f.up.checkBlobGETs(t, "after pre-warm", img.Blobs(), 1)

	// The text summary: one row for b; and --require 3 over its 3 URLs
	// of 2 nodes is not met.
	r = runPrewarmCmd(t, "", "--nodes", a.FleetURL+","+b.FleetURL+","+byName, "--token-file", f.adminFile, "--output", "text", "--require", "3", "org/app:v1")
	if r.code != 1 || !strings.Contains(r.stderr, "--require 3 not met: 2 of 2 nodes warm (3 URLs") {
		t.Errorf("--require 3 over 3 URLs of 2 nodes: exit %d\n%s", r.code, r.stderr)
	}
	rows := 0
	for _, line := range strings.Split(r.stdout, "\n") {
		if (strings.HasPrefix(line, b.FleetURL+" ") || strings.HasPrefix(line, byName+" ")) && !strings.Contains(line, " is also ") {
			rows++
		}
	}
	if rows != 1 || !strings.Contains(r.stdout, b.FleetURL+" is also "+byName) {
		t.Errorf("%d summary rows for the node listed twice:\n%s", rows, r.stdout)
	}

	// A restart on the same data directory keeps the ID.
	data, addr := b.Data, strings.TrimPrefix(b.FleetURL, "http://")
	b.Stop(t)
	b2 := f.node(t, data, addr)
	if again := facts(b2)["id"]; again != id {
		t.Errorf("node ID after a restart on the same data directory: %v, was %v", again, id)
	}
}

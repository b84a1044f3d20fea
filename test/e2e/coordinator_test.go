package e2e

// The pre-warm coordinator (docs/prewarm.md) as a process of its own beside
// the nodes: jobs kept in the MinIO bucket survive a SIGKILL, a node that
// joins is warmed with the pins in force, and a push to the registry warms
// the fleet through the registry's notifications.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/coordinator"
	"github.com/berth-dev/berth/internal/testsupport"
)

type coordProc struct {
	*Process
	Addr, URL string
}

// startCoordinator runs `berth coordinator` on addr with the fleet's bucket.
func startCoordinator(t *testing.T, f *pwFleet, addr string, args ...string) *coordProc {
	t.Helper()
	full := append([]string{"coordinator", "--listen", addr, "--token-file", f.adminFile, "--api-token-file", f.adminFile,
		"--lease-ttl", "3s", "--poll", "200ms", "--interval", "500ms", "--log-level", "debug"}, f.bucket.Args()...)
	full = append(full, args...)
	cmd := exec.Command(testsupport.BerthBinary(t), full...)
	cmd.Env = berthEnv()
	dir := t.TempDir()
	p := StartProcess(t, "coordinator", filepath.Join(dir, "coordinator.log"), cmd)
	c := &coordProc{Process: p, Addr: addr, URL: "http://" + addr}
	p.WaitUntil(t, 30*time.Second, "coordinator /healthz", func(ctx context.Context) bool { return httpStatus(ctx, c.URL+"/healthz") == 200 })
	return c
}

func (c *coordProc) job(t *testing.T, token, id string) map[string]any {
	t.Helper()
	code, body := nodeGet(t, c.URL+"/berth/v1/coordinator/jobs/"+id, token)
	if code != 200 {
		return nil
	}
	var m map[string]any
	json.Unmarshal(body, &m)
	return m
}

func TestCoordinatorSurvivesSIGKILLMidJob(t *testing.T) {
	f := newPWFleet(t)
	img := PushImage(t, OCI, f.reg.Host, "org/big", "v1", 3<<20, 3)
	nodes := f.nodes(t, 3)
	addr := testsupport.FreeAddr(t)
	c := startCoordinator(t, f, addr, "--nodes", nodeURLs(nodes))
	f.up.rate.Store(2 << 20) // each layer takes ~1.5s from the upstream

	// The CLI hands the job over and follows it.
	cmd := exec.Command(testsupport.BerthBinary(t), "prewarm", "--coordinator", c.URL, "--token-file", f.adminFile,
		"--output", "json", "--pin", "1h", "--timeout", "3m", "docker.io/org/big:v1")
	cmd.Env = berthEnv()
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	cliDone := make(chan error, 1)
	go func() { cliDone <- cmd.Wait() }()

	// Kill the coordinator once the job is under way.
	var id string
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body := nodeGet(t, c.URL+"/berth/v1/coordinator/jobs", f.adminToken)
		var jobs []map[string]any
		if code == 200 && json.Unmarshal(body, &jobs) == nil && len(jobs) == 1 && jobs[0]["state"] == "running" {
			id = jobs[0]["id"].(string)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no running job: %d %s", code, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(1500 * time.Millisecond) // into the bucket fill
	if err := c.Cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-c.Exited()
	t.Logf("coordinator killed mid-job %s", id)
	c2 := startCoordinator(t, f, addr, "--nodes", nodeURLs(nodes))

	select {
	case err := <-cliDone:
		if err != nil {
			t.Fatalf("berth prewarm --coordinator: %v\nstdout:\n%s\nstderr:\n%s", err, out.String(), errb.String())
		}
	case <-time.After(3 * time.Minute):
		t.Fatal("berth prewarm --coordinator did not end")
	}
	rec := c2.job(t, f.adminToken, id)
	if rec["state"] != "succeeded" || rec["attempts"].(float64) < 2 {
		t.Errorf("job after the restart: state %v, attempts %v", rec["state"], rec["attempts"])
	}
	if !c2.LogContains("resuming a job another coordinator left") {
		t.Errorf("the second coordinator did not say it resumed the job")
	}
	f.up.checkBlobGETs(t, "job resumed after SIGKILL", img.Blobs(), 1)
	for _, n := range nodes {
		hostBlobs(t, n.Berth, img.Blobs())
		if code, body := nodeGet(t, n.URL+"/berth/v1/warm", ""); code != 200 {
			t.Errorf("%s warm: %d %s", n.Host, code, body)
		}
	}
	if !strings.Contains(out.String(), `"event":"summary"`) || !strings.Contains(out.String(), `"met":true`) {
		t.Errorf("CLI output:\n%s", out.String())
	}
}

const notifyingRegistryConfig = `version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
notifications:
  endpoints:
    - name: berth-coordinator
      url: %s
      headers:
        Authorization: [Bearer %s]
      timeout: 5s
      threshold: 3
      backoff: 1s
`

func TestCoordinatorWarmsOnPushAndNodesThatJoin(t *testing.T) {
	testsupport.RequireTool(t, "registry")
	testsupport.RequireTool(t, "minio")
	coordAddr := testsupport.FreeAddr(t)
	pw := &pwFleet{}
	dir := t.TempDir()
	pw.fleetTokenFile = filepath.Join(dir, "fleet-tokens")
	writeTokenFile(t, pw.fleetTokenFile, newHexToken(t))
	pw.adminToken = newHexToken(t)
	pw.adminFile = filepath.Join(dir, "admin-tokens")
	writeTokenFile(t, pw.adminFile, pw.adminToken)

	// A registry that tells the coordinator about every push.
	bin := testsupport.RequireTool(t, "registry")
	p, regAddr := startOnFreePort(t, 30*time.Second, "answering /v2/", func(addr string) (*Process, func(context.Context) bool) {
		cfg := filepath.Join(dir, "registry.yml")
		body := fmt.Sprintf(notifyingRegistryConfig, filepath.Join(dir, "storage"), addr, "http://"+coordAddr+"/berth/v1/coordinator/notifications", pw.adminToken)
		os.WriteFile(cfg, []byte(body), 0o644)
		cmd := exec.Command(bin, "serve", cfg)
		cmd.Env = append(os.Environ(), "OTEL_TRACES_EXPORTER=none")
		p := StartProcess(t, "registry", filepath.Join(dir, "registry.log"), cmd)
		return p, func(ctx context.Context) bool { return httpStatus(ctx, "http://"+addr+"/v2/") == 200 }
	})
	reg := &Registry{Process: p, Host: regAddr, URL: "http://" + regAddr, Dir: filepath.Join(dir, "storage")}
	pw.fleet = &fleet{reg: reg, up: startFleetUpstream(t, reg.URL), bucket: StartFleetBucket(t)}

	nodes := pw.nodes(t, 2)
	list := filepath.Join(dir, "nodes")
	os.WriteFile(list, []byte(nodes[0].FleetURL+"\n"+nodes[1].FleetURL+"\n"), 0o644)
	c := startCoordinator(t, pw, coordAddr, "--nodes-file", list, "--push-registry", "docker.io", "--push-rule", "team/*:v*", "--push-pin", "1h")

	// A push the rule does not select warms nothing; one it selects warms every node.
	other := PushImage(t, OCI, reg.Host, "scratch/thing", "v1", 100<<10, 1)
	img := PushImage(t, OCI, reg.Host, "team/app", "v1", 200<<10, 2)
	waitWarm := func(n *pwNode, what string) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			code, body := nodeGet(t, n.URL+"/berth/v1/warm", "")
			if code == 200 && !strings.Contains(string(body), `"pins":0`) {
				return
			}
			if time.Now().After(deadline) {
				c.ShowLog(t, 40)
				t.Fatalf("%s: %s not warmed: %d %s", what, n.Host, code, body)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	for _, n := range nodes {
		waitWarm(n, "after the push")
		hostBlobs(t, n.Berth, img.Blobs())
	}
	pw.up.checkBlobGETs(t, "warm on push", img.Blobs(), 1)
	pw.up.checkBlobGETs(t, "a push no rule selects", other.Blobs(), 0)

	// A node that joins later gets the pins in force.
	late := pw.node(t, "", "")
	os.WriteFile(list, []byte(nodes[0].FleetURL+"\n"+nodes[1].FleetURL+"\n"+late.FleetURL+"\n"), 0o644)
	waitWarm(late, "after joining")
	hostBlobs(t, late.Berth, img.Blobs())
	pw.up.checkBlobGETs(t, "a node that joined", img.Blobs(), 1)
	if c.LogContains(pw.adminToken) {
		t.Error("the coordinator logged a token")
	}
}

// Two coordinators on one bucket: a job runs on one of them only (its
// lease), and when that one is SIGKILLed the other takes the job over and
// completes it.
func TestTwoCoordinatorsRunAJobOnce(t *testing.T) {
	f := newPWFleet(t)
	img := PushImage(t, OCI, f.reg.Host, "org/big", "v1", 3<<20, 3)
	nodes := f.nodes(t, 2)
	coords := []*coordProc{
		startCoordinator(t, f, testsupport.FreeAddr(t), "--nodes", nodeURLs(nodes)),
		startCoordinator(t, f, testsupport.FreeAddr(t), "--nodes", nodeURLs(nodes)),
	}
	f.up.rate.Store(1 << 20) // each layer takes ~3s from the upstream

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cl := &coordinator.Client{Base: coords[0].URL, Token: f.adminToken}
	id, err := cl.Submit(ctx, coordinator.JobSpec{Refs: []string{"docker.io/org/big:v1"}, PinUntil: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	// runs counts the coordinator's attempts at the job, from its log.
	runs := func(c *coordProc) int { return countLines(c.Log(), "coordinator: running a job", "job="+id) }
	// bucketPhases counts the unpinned prefetches (the bucket phase) the
	// nodes were asked for; each run of the job asks one.
	bucketPhases := func() int {
		n := 0
		for _, nd := range nodes {
			n += countLines(nd.Log(), "pre-warm: job started", `pin_until="0001-01-01`)
		}
		return n
	}
	deadline := time.Now().Add(30 * time.Second)
	for bucketPhases() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no node was asked for the bucket phase; job %+v", coords[0].job(t, f.adminToken, id))
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Both coordinators poll the bucket every 200ms: give the second a few
	// rounds in which it could wrongly run the job too.
	time.Sleep(time.Second)
	rec := coords[0].job(t, f.adminToken, id)
	if rec == nil || rec["state"] != "running" {
		t.Fatalf("job before the kill: %v (slow the upstream further if it ended)", rec)
	}
	var runner, other *coordProc
	for i, c := range coords {
		if runs(c) > 0 {
			runner, other = c, coords[1-i]
		}
	}
	if runner == nil || runs(runner) != 1 || runs(other) != 0 || bucketPhases() != 1 {
		t.Fatalf("runs of the job: %d and %d by the two coordinators, %d bucket phases asked of the nodes; want one", runs(coords[0]), runs(coords[1]), bucketPhases())
	}
	if want := fmt.Sprintf("pid %d", runner.Cmd.Process.Pid); !strings.Contains(fmt.Sprint(rec["runner"]), want) {
		t.Errorf("the job's runner is %v, want the coordinator with %s", rec["runner"], want)
	}

	if err := runner.Cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-runner.Exited()
	t.Logf("killed the coordinator running job %s", id)
	deadline = time.Now().Add(2 * time.Minute)
	for {
		rec = other.job(t, f.adminToken, id)
		if rec != nil && rec["state"] == "succeeded" {
			break
		}
		if time.Now().After(deadline) || (rec != nil && rec["state"] == "failed") {
			other.ShowLog(t, 40)
			t.Fatalf("job after the kill: %v", rec)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if want := fmt.Sprintf("pid %d", other.Cmd.Process.Pid); !strings.Contains(fmt.Sprint(rec["runner"]), want) || rec["attempts"].(float64) < 2 {
		t.Errorf("job after the takeover: runner %v (want %s), attempts %v", rec["runner"], want, rec["attempts"])
	}
	if runs(other) != 1 || !other.LogContains("resuming a job another coordinator left") {
		t.Errorf("the surviving coordinator ran the job %d times, or did not say it resumed it", runs(other))
	}
	f.up.checkBlobGETs(t, "a job taken over from a killed coordinator", img.Blobs(), 1)
	for _, n := range nodes {
		hostBlobs(t, n.Berth, img.Blobs())
		if code, body := nodeGet(t, n.URL+"/berth/v1/warm", ""); code != 200 {
			t.Errorf("%s warm: %d %s", n.Host, code, body)
		}
	}
}

// countLines counts the lines of log that contain every one of subs.
func countLines(log string, subs ...string) int {
	n := 0
	for _, line := range strings.Split(log, "\n") {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(line, s)
		}
		if all {
			n++
		}
	}
	return n
}

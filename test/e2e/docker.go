package e2e

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// DockerdOptions is what goes into the daemon's own daemon.json.
type DockerdOptions struct {
	// Mirrors become registry-mirrors: docker tries them, in order, for
	// images of docker.io. Any port works; http:// mirrors on 127.0.0.0/8
	// need no insecure-registries entry, since docker treats that range as
	// insecure by default.
	Mirrors []string
	// Insecure become insecure-registries (plain HTTP allowed).
	Insecure []string
	// ConfigFile is a daemon.json to run with as it is, for tests of a file
	// written by someone else (berth configure docker, say). Mirrors and
	// Insecure must then be empty.
	ConfigFile string
	// Netns, when set, is a network namespace (NetnsHost.NS) to run the
	// daemon in: its pulls of 127.0.0.1:5000 reach that host's berth. The
	// socket is a file, so the CLI here reaches the daemon all the same.
	Netns string
}

// Dockerd is a private docker daemon: vfs storage (works inside any
// sandbox), no iptables, no bridge, its own data-root, exec-root, socket,
// pidfile and daemon.json, so it never touches a docker already on the host.
type Dockerd struct {
	*Process
	Host      string // DOCKER_HOST value, unix:///.../docker.sock
	dir       string
	cliConfig string
}

// StartDockerd starts dockerd as root and waits until /_ping answers.
func StartDockerd(t testing.TB, opts DockerdOptions) *Dockerd {
	t.Helper()
	testsupport.RequireRoot(t)
	bin := testsupport.RequireTool(t, "dockerd")
	testsupport.RequireTool(t, "docker")
	dir := testsupport.ShortTempDir(t, "dk")
	// Runs after the daemon's stop (registered before its start) and before
	// the dirs go: a daemon that was killed leaves its data-root bind mount
	// and its exec-root netns mount behind in this mount namespace, which
	// would keep its dirs.
	t.Cleanup(func() { unmountAll(func(p string) bool { return strings.HasPrefix(p, dir+"/") }) })
	cfgPath := opts.ConfigFile
	if cfgPath == "" {
		cfgPath = writeDaemonJSON(t, dir, opts)
	} else if len(opts.Mirrors)+len(opts.Insecure) > 0 {
		t.Fatal("StartDockerd: Mirrors and Insecure cannot be added to a given ConfigFile")
	}
	cliDir := filepath.Join(dir, "cli")
	if err := os.MkdirAll(cliDir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "docker.sock")
	args := []string{
		"--config-file", cfgPath,
		"--storage-driver=vfs", "--iptables=false", "--bridge=none",
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "docker.pid"),
		"-H", "unix://" + sock,
	}
	name := "dockerd"
	cmd := exec.Command(bin, args...)
	if opts.Netns != "" {
		// nsenter, not ip netns exec: that also mounts a sysfs of its own,
		// hiding the cgroup mounts dockerd refuses to start without.
		// nsenter execs dockerd itself, so the Process is dockerd and its
		// stop and kill reach it (and its containerd) directly.
		nsenter := testsupport.RequireTool(t, "nsenter")
		name = "dockerd-" + opts.Netns
		cmd = exec.Command(nsenter, append([]string{"--net=/run/netns/" + opts.Netns, "--", bin}, args...)...)
	}
	p := StartProcess(t, name, filepath.Join(dir, "dockerd.log"), cmd)
	d := &Dockerd{Process: p, Host: "unix://" + sock, dir: dir, cliConfig: cliDir}
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dialer net.Dialer
			return dialer.DialContext(ctx, "unix", sock)
		},
	}}
	p.WaitUntil(t, 60*time.Second, "answering /_ping", func(ctx context.Context) bool {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/_ping", nil)
		resp, err := client.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return d
}

// writeDaemonJSON writes opts as dir/daemon.json and returns its path.
func writeDaemonJSON(t testing.TB, dir string, opts DockerdOptions) string {
	t.Helper()
	cfg := map[string]any{"debug": true}
	if len(opts.Mirrors) > 0 {
		cfg["registry-mirrors"] = opts.Mirrors
	}
	if len(opts.Insecure) > 0 {
		cfg["insecure-registries"] = opts.Insecure
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "daemon.json")
	if err := os.WriteFile(path, cfgJSON, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// Env is what the docker CLI needs in its environment to use this daemon
// and nothing of the host's docker setup. DOCKER_BUILDKIT=0 picks the
// classic builder, which needs no buildx plugin.
func (d *Dockerd) Env() []string {
	return []string{"DOCKER_HOST=" + d.Host, "DOCKER_CONFIG=" + d.cliConfig, "DOCKER_BUILDKIT=0"}
}

// Docker runs the docker CLI against this daemon; failure fails the test.
func (d *Dockerd) Docker(t testing.TB, timeout time.Duration, args ...string) string {
	t.Helper()
	return Run(t, timeout, d.Env(), "docker", args...)
}

// DockerErr runs the docker CLI and returns its error instead of failing.
func (d *Dockerd) DockerErr(timeout time.Duration, args ...string) (string, error) {
	return RunErr(timeout, d.Env(), "docker", args...)
}

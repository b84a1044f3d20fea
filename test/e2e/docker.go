package e2e

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
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
	cfgPath := filepath.Join(dir, "daemon.json")
	cliDir := filepath.Join(dir, "cli")
	if err := os.WriteFile(cfgPath, cfgJSON, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(cliDir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "docker.sock")
	cmd := exec.Command(bin,
		"--config-file", cfgPath,
		"--storage-driver=vfs", "--iptables=false", "--bridge=none",
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "docker.pid"),
		"-H", "unix://"+sock,
	)
	p := StartProcess(t, "dockerd", filepath.Join(dir, "dockerd.log"), cmd)
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

func (d *Dockerd) env() []string {
	return []string{"DOCKER_HOST=" + d.Host, "DOCKER_CONFIG=" + d.cliConfig}
}

// Docker runs the docker CLI against this daemon; failure fails the test.
func (d *Dockerd) Docker(t testing.TB, timeout time.Duration, args ...string) string {
	t.Helper()
	return Run(t, timeout, d.env(), "docker", args...)
}

// DockerErr runs the docker CLI and returns its error instead of failing.
func (d *Dockerd) DockerErr(timeout time.Duration, args ...string) (string, error) {
	return RunErr(timeout, d.env(), "docker", args...)
}

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// Containerd is a private containerd: its own root, state, socket and
// config, with the CRI plugin off (ctr needs none of it, and it would try to
// set up networking).
type Containerd struct {
	*Process
	Address   string // gRPC socket, for ctr --address
	Namespace string
	dir       string
}

const containerdConfig = `version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q
`

// StartContainerd starts containerd as root and waits until `ctr version`
// answers.
func StartContainerd(t testing.TB) *Containerd {
	t.Helper()
	testsupport.RequireRoot(t)
	bin := testsupport.RequireTool(t, "containerd")
	ctr := testsupport.RequireTool(t, "ctr")
	dir := testsupport.ShortTempDir(t, "ctd")
	sock := filepath.Join(dir, "c.sock")
	cfg := filepath.Join(dir, "config.toml")
	body := fmt.Sprintf(containerdConfig,
		filepath.Join(dir, "root"), filepath.Join(dir, "state"),
		sock, sock+".ttrpc", filepath.Join(dir, "opt"))
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config", cfg, "--log-level", "debug")
	p := StartProcess(t, "containerd", filepath.Join(dir, "containerd.log"), cmd)
	c := &Containerd{Process: p, Address: sock, Namespace: "berth-e2e", dir: dir}
	p.WaitUntil(t, 60*time.Second, "answering ctr version", func(ctx context.Context) bool {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return exec.CommandContext(ctx, ctr, "--address", sock, "version").Run() == nil
	})
	return c
}

// Ctr runs ctr against this containerd in its namespace; failure fails the
// test.
func (c *Containerd) Ctr(t testing.TB, timeout time.Duration, args ...string) string {
	t.Helper()
	return Run(t, timeout, nil, "ctr", append([]string{"--address", c.Address, "--namespace", c.Namespace}, args...)...)
}

// CtrErr runs ctr and returns its error instead of failing.
func (c *Containerd) CtrErr(timeout time.Duration, args ...string) (string, error) {
	return RunErr(timeout, nil, "ctr", append([]string{"--address", c.Address, "--namespace", c.Namespace}, args...)...)
}

// HostsDir writes DIR/HOST/hosts.toml for `ctr images pull --hosts-dir DIR`
// and returns DIR. The file is containerd's registry host configuration:
// server is the registry itself, each mirror is tried first for pull and
// resolve. containerd sends ?ns=HOST on requests to mirrors, which is how
// berth knows the upstream.
func HostsDir(t testing.TB, host, server string, mirrors ...string) string {
	t.Helper()
	dir := t.TempDir()
	body := fmt.Sprintf("server = %q\n", server)
	for _, m := range mirrors {
		body += fmt.Sprintf("\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", m)
	}
	if err := os.MkdirAll(filepath.Join(dir, host), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, host, "hosts.toml"), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

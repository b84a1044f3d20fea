package main

import (
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// With its upstream and its S3 endpoint both gone, berth is alive and ready
// (it serves its cache) and says in /status what is degraded.
func TestHealthWithUpstreamAndS3Down(t *testing.T) {
	dead := testsupport.FreeAddr(t) // nothing listens here
	// Credentials in the environment keep the AWS chain from asking an
	// instance metadata service, which does not exist here.
	t.Setenv("AWS_ACCESS_KEY_ID", "berth-test")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "berth-test-secret")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	b := startBerth(t, "--upstream", "docker.io=http://"+dead,
		"--s3-bucket", "fleet", "--s3-endpoint", "http://"+testsupport.FreeAddr(t), "--s3-path-style=true")
	for _, p := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get("http://" + b.addr + p)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s = %d with upstream and S3 down; berth still serves its cache", p, resp.StatusCode)
		}
	}
	var report struct {
		Status string `json:"status"`
		Ready  bool   `json:"ready"`
		Checks []struct {
			Name, Kind, Status, Error string
		} `json:"checks"`
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + b.addr + "/status")
		if err != nil {
			t.Fatal(err)
		}
		report.Checks = nil
		err = json.NewDecoder(resp.Body).Decode(&report)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		states := map[string]string{}
		for _, c := range report.Checks {
			states[c.Name] = c.Status
		}
		if states["upstream:docker.io"] == "degraded" && states["s3"] == "degraded" {
			if report.Status != "degraded" || !report.Ready || states["data-dir"] != "ok" {
				t.Fatalf("status %q ready %v checks %+v", report.Status, report.Ready, report.Checks)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/status never showed upstream and s3 degraded: %+v", report.Checks)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Under systemd (NOTIFY_SOCKET), berth says READY=1 once it serves,
// RELOADING=1 then READY=1 around a SIGHUP, and STOPPING=1 on SIGTERM.
func TestSystemdNotifications(t *testing.T) {
	dir, err := os.MkdirTemp("", "sd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	up := slowUpstream(t, 64<<20)
	b := startBerth(t, "--upstream", "docker.io="+up.URL)

	read := func(want string) {
		t.Helper()
		buf := make([]byte, 4096)
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				t.Fatalf("waiting for %q: %v\n%s", want, err, b.logText())
			}
			if strings.Contains(string(buf[:n]), want) {
				return
			}
		}
	}
	read("READY=1")
	b.cmd.Process.Signal(syscall.SIGHUP)
	read("RELOADING=1")
	read("READY=1")
	b.cmd.Process.Signal(syscall.SIGTERM)
	read("STOPPING=1")
	select {
	case <-b.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("berth did not exit")
	}
}

package e2e

import (
	"net/http"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// drainFixture is a berth whose upstream sends a six-layer image through a
// slow link, so a pull of it takes a few seconds and many requests.
func drainFixture(t *testing.T, repo string) (*Berth, *PushedImage, *Proxy) {
	t.Helper()
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, repo, "1", 2<<20, 6)
	up := StartProxy(t, reg.Host)
	up.SetRate(4 << 20)
	b := StartBerth(t, append(UpstreamArgs(reg.Host, up.URL), "--shutdown-timeout", "60s")...)
	return b, img, up
}

// sigtermMidPull sends berth SIGTERM once the upstream has sent the first
// layer, checks berth turns unready at once, and returns when it exited.
func sigtermMidPull(t *testing.T, b *Berth, up *Proxy, pulled <-chan error) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for up.UpstreamBytes() < 2<<20 {
		if time.Now().After(deadline) {
			t.Fatal("the pull did not get going")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := b.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	unready := false
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end) && !unready; time.Sleep(50 * time.Millisecond) {
		resp, err := http.Get(b.URL + "/readyz")
		if err == nil {
			resp.Body.Close()
			unready = resp.StatusCode == http.StatusServiceUnavailable
		}
	}
	if !unready {
		t.Error("/readyz did not turn 503 after SIGTERM")
	}
	select {
	case err := <-pulled:
		if err != nil {
			t.Fatalf("the pull under way at SIGTERM failed: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the pull did not finish")
	}
	select {
	case <-b.Exited():
		if err := b.ExitErr(); err != nil {
			t.Errorf("berth exited with %v after draining", err)
		}
	case <-time.After(20 * time.Second):
		t.Error("berth did not exit by itself once the pull was done")
	}
}

// SIGTERM while crane pulls a six-layer image: berth keeps serving the
// pull (its later layers are new requests) and exits once it is done.
func TestDrainCranePull(t *testing.T) {
	testsupport.RequireTool(t, "crane")
	b, img, up := drainFixture(t, "library/drain")
	dir := filepath.Join(t.TempDir(), "layout")
	pulled := make(chan error, 1)
	go func() {
		out, err := RunErr(2*time.Minute, nil, "crane", "pull", "--insecure", "--format=oci", b.Host+"/library/drain:1", dir)
		if err != nil {
			err = &pullError{out: out, err: err}
		}
		pulled <- err
	}()
	sigtermMidPull(t, b, up, pulled)
	VerifyOCILayout(t, dir, img)
}

// The same with docker pull.
func TestDrainDockerPull(t *testing.T) {
	testsupport.RequireRoot(t)
	testsupport.RequireTool(t, "dockerd")
	b, img, up := drainFixture(t, "library/draindock")
	d := StartDockerd(t, DockerdOptions{})
	ref := b.Host + "/library/draindock:1"
	pulled := make(chan error, 1)
	go func() {
		out, err := d.DockerErr(2*time.Minute, "pull", ref)
		if err != nil {
			err = &pullError{out: out, err: err}
		}
		pulled <- err
	}()
	sigtermMidPull(t, b, up, pulled)
	if id := strings.TrimSpace(d.Docker(t, time.Minute, "image", "inspect", "--format", "{{.Id}}", ref)); id != img.Config.Digest {
		t.Errorf("docker pull %s: image id %s, want %s", ref, id, img.Config.Digest)
	}
}

type pullError struct {
	out string
	err error
}

func (e *pullError) Error() string { return e.err.Error() + ": " + e.out }

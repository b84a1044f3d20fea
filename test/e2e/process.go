package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// Process is a daemon started for one test. Its stdout and stderr go to
// LogPath; the tail of that log is shown when the test fails, and the whole
// log is copied to $BERTH_E2E_ARTIFACTS (if set) so CI keeps it.
type Process struct {
	Name    string
	LogPath string
	Cmd     *exec.Cmd

	done    chan struct{}
	waitErr error
	stopped sync.Once
}

// StopTimeout is how long a daemon may take to exit after SIGTERM before it
// and its process group are killed: more than berth's default 30s
// --shutdown-timeout, which in-flight pulls may use.
var StopTimeout = 45 * time.Second

// StartProcess starts cmd with its output in logPath and stops it at cleanup.
// The process gets its own process group so that helpers it spawns (dockerd's
// containerd, for one) can be killed with it if it does not exit by itself.
func StartProcess(t testing.TB, name, logPath string, cmd *exec.Cmd) *Process {
	t.Helper()
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("%s log: %v", name, err)
	}
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// Pdeathsig: a test binary killed by its -timeout must not leave daemons
	// behind holding ports and mounts.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("starting %s (%s): %v", name, cmd.Path, err)
	}
	p := &Process{Name: name, LogPath: logPath, Cmd: cmd, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Stop(t)
		if t.Failed() {
			p.ShowLog(t, 60)
			p.saveArtifact(t)
		}
	})
	return p
}

// Exited is closed once the process has exited.
func (p *Process) Exited() <-chan struct{} { return p.done }

// ExitErr is the process's exit status; valid after Exited is closed.
func (p *Process) ExitErr() error { return p.waitErr }

// Stop sends SIGTERM and waits StopTimeout, then kills the process group. A
// daemon that needed the kill fails the test: berth must shut down on SIGTERM.
func (p *Process) Stop(t testing.TB) {
	t.Helper()
	p.stopped.Do(func() {
		select {
		case <-p.done:
			// Killing the group catches any child left by a daemon that died.
			_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
			return
		default:
		}
		_ = p.Cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
			_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
		case <-time.After(StopTimeout):
			_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
			t.Errorf("%s did not exit within %v of SIGTERM; killed", p.Name, StopTimeout)
		}
	})
}

// Log returns the whole log so far.
func (p *Process) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	return string(b)
}

// ShowLog prints the last n lines of the log into the test output.
func (p *Process) ShowLog(t testing.TB, n int) {
	t.Helper()
	lines := strings.Split(strings.TrimRight(p.Log(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	t.Logf("---- last %d lines of %s log (%s) ----\n%s\n---- end of %s log ----",
		len(lines), p.Name, p.LogPath, strings.Join(lines, "\n"), p.Name)
}

var unsafeName = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

func (p *Process) saveArtifact(t testing.TB) {
	dir := os.Getenv("BERTH_E2E_ARTIFACTS")
	if dir == "" {
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return
	}
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return
	}
	name := unsafeName.ReplaceAllString(t.Name()+"-"+p.Name+"-"+filepath.Base(p.LogPath), "_")
	dst := filepath.Join(dir, name)
	if os.WriteFile(dst, b, 0o644) == nil {
		t.Logf("full %s log saved to %s", p.Name, dst)
	}
}

// Wait polls ready every 50ms until it returns true (nil), the process
// exits or the timeout passes (an error naming what was awaited).
func (p *Process) Wait(timeout time.Duration, what string, ready func(ctx context.Context) bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if ready(ctx) {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited before %s: %v", p.Name, what, p.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("%s: not %s within %v", p.Name, what, timeout)
		case <-tick.C:
		}
	}
}

// WaitUntil is Wait that fails the test, showing the log.
func (p *Process) WaitUntil(t testing.TB, timeout time.Duration, what string, ready func(ctx context.Context) bool) {
	t.Helper()
	if err := p.Wait(timeout, what, ready); err != nil {
		p.ShowLog(t, 40)
		t.Fatal(err)
	}
}

// lostPortRace reports whether the process exited because another process
// took its port between testsupport.FreeAddr and the daemon's listen.
func (p *Process) lostPortRace() bool {
	select {
	case <-p.done:
		return p.LogContains("address already in use")
	default:
		return false
	}
}

// startOnFreePort starts a daemon listening on a testsupport.FreeAddr and waits until
// ready; when the port was taken in the meantime it tries another one.
func startOnFreePort(t testing.TB, timeout time.Duration, what string,
	start func(addr string) (*Process, func(ctx context.Context) bool)) (*Process, string) {
	t.Helper()
	for attempt := 1; ; attempt++ {
		addr := testsupport.FreeAddr(t)
		p, ready := start(addr)
		err := p.Wait(timeout, what, ready)
		if err == nil {
			return p, addr
		}
		if attempt < 3 && p.lostPortRace() {
			t.Logf("%s: port %s was taken before it listened; trying another", p.Name, addr)
			continue
		}
		p.ShowLog(t, 40)
		t.Fatal(err)
	}
}

// LogContains reports whether the log holds s.
func (p *Process) LogContains(s string) bool {
	b, _ := os.ReadFile(p.LogPath)
	return bytes.Contains(b, []byte(s))
}

// String names the process for messages.
func (p *Process) String() string {
	return fmt.Sprintf("%s (pid %d)", p.Name, p.Cmd.Process.Pid)
}

package healthcheck

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fakeSystemd listens where NOTIFY_SOCKET points, as systemd does, and
// hands every datagram to the test.
type fakeSystemd struct {
	msgs chan string
}

func newFakeSystemd(t *testing.T) *fakeSystemd {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("NOTIFY_SOCKET", path)
	f := &fakeSystemd{msgs: make(chan string, 1024)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			f.msgs <- string(buf[:n])
		}
	}()
	t.Cleanup(func() {
		conn.Close()
		<-done
	})
	return f
}

// next returns the next datagram satisfying match, skipping others.
func (f *fakeSystemd) next(t *testing.T, what string, match func(string) bool) string {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m := <-f.msgs:
			if match(m) {
				return m
			}
		case <-deadline:
			t.Fatalf("systemd never got %s", what)
		}
	}
}

func is(s string) func(string) bool { return func(m string) bool { return m == s } }

// quiet fails if a datagram satisfying match arrives within d.
func (f *fakeSystemd) quiet(t *testing.T, d time.Duration, match func(string) bool) {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case m := <-f.msgs:
			if match(m) {
				t.Fatalf("got %q when none was due", m)
			}
		case <-deadline:
			return
		}
	}
}

func (f *fakeSystemd) drain() {
	for {
		select {
		case <-f.msgs:
		default:
			return
		}
	}
}

func TestNotifyReadyWatchdogReloadStopping(t *testing.T) {
	sd := newFakeSystemd(t)
	t.Setenv("WATCHDOG_USEC", "100000") // 100ms: pings every 50ms
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))

	c := New(nil)
	var disk errVar
	c.Add("data-dir", Liveness, 5*time.Millisecond, time.Second, disk.check)
	c.Add("upstream", Informational, 5*time.Millisecond, time.Second, func(context.Context) error {
		return errors.New("unreachable") // must not stop the watchdog
	})
	started(t, c)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	n, err := Notify(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	if !n.Enabled() || n.WatchdogInterval() != 100*time.Millisecond {
		t.Fatalf("Enabled %v, watchdog %s", n.Enabled(), n.WatchdogInterval())
	}
	if m := <-sd.msgs; m != "READY=1" {
		t.Fatalf("first notification %q; want READY=1", m)
	}
	sd.next(t, "a watchdog ping", is("WATCHDOG=1"))
	sd.next(t, "a second watchdog ping", is("WATCHDOG=1"))

	// A failing liveness check starves the watchdog, and says why.
	disk.set(errors.New("read-only file system"))
	waitFor(t, "liveness to fail", 5*time.Second, func() bool { return !c.Live() })
	sd.next(t, "the reason in STATUS", func(m string) bool {
		return m == "STATUS=not pinging the watchdog: [data-dir: read-only file system]"
	})
	sd.drain()
	sd.quiet(t, 300*time.Millisecond, is("WATCHDOG=1"))

	disk.set(nil)
	sd.next(t, "the recovery in STATUS", is("STATUS=liveness checks pass again"))
	sd.next(t, "pings once liveness passes again", is("WATCHDOG=1"))

	// A reload, good then rejected: RELOADING=1 with a timestamp, READY=1 after.
	ran := false
	if err := n.Reload(func() error { ran = true; return nil }); err != nil || !ran {
		t.Fatalf("Reload = %v, ran %v", err, ran)
	}
	m := sd.next(t, "RELOADING=1", func(m string) bool { return strings.HasPrefix(m, "RELOADING=1") })
	if !strings.Contains(m, "\nMONOTONIC_USEC=") {
		t.Errorf("reload notification %q lacks MONOTONIC_USEC", m)
	}
	sd.next(t, "READY=1 after the reload", is("READY=1\nSTATUS=configuration reloaded"))
	bad := errors.New(`config /etc/berth.yaml: line 3: field lisen not found`)
	if err := n.Reload(func() error { return bad }); err != bad {
		t.Fatalf("Reload = %v; want fn's error", err)
	}
	sd.next(t, "RELOADING=1", func(m string) bool { return strings.HasPrefix(m, "RELOADING=1") })
	sd.next(t, "READY=1 after a rejected reload", is("READY=1\nSTATUS=configuration reload rejected, still serving the previous one: "+bad.Error()))

	if err := n.Status("serving 3 pulls"); err != nil {
		t.Fatal(err)
	}
	sd.next(t, "STATUS", is("STATUS=serving 3 pulls"))

	cancel()
	sd.next(t, "STOPPING=1", is("STOPPING=1"))
	select {
	case <-n.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the watchdog loop did not end with its context")
	}
	sd.quiet(t, 200*time.Millisecond, func(m string) bool { return m == "WATCHDOG=1" || m == "STOPPING=1" })
	if err := n.Stopping(); err != nil {
		t.Fatal(err)
	}
	sd.quiet(t, 50*time.Millisecond, is("STOPPING=1"))
}

func TestNotifyWatchdogForAnotherProcess(t *testing.T) {
	sd := newFakeSystemd(t)
	t.Setenv("WATCHDOG_USEC", "100000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()+1))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	n, err := Notify(ctx, nil)
	if err != nil || n.WatchdogInterval() != 0 {
		t.Fatalf("Notify = %v, watchdog %s; want no watchdog", err, n.WatchdogInterval())
	}
	sd.next(t, "READY=1", is("READY=1"))
	sd.quiet(t, 200*time.Millisecond, is("WATCHDOG=1"))
}

func TestNotifyWithoutSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "100000")
	ctx, cancel := context.WithCancel(context.Background())
	n, err := Notify(ctx, New(nil))
	if err != nil || n.Enabled() {
		t.Fatalf("Notify without NOTIFY_SOCKET = %v, enabled %v", err, n.Enabled())
	}
	select {
	case <-n.Done():
	default:
		t.Fatal("a Notifier without systemd runs a loop")
	}
	ran := false
	if err := n.Reload(func() error { ran = true; return nil }); err != nil || !ran {
		t.Fatalf("Reload = %v, ran %v", err, ran)
	}
	if err := errors.Join(n.Stopping(), n.Status("x")); err != nil {
		t.Fatal(err)
	}
	cancel()
}

func TestNotifyBadSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "nobody-listens"))
	n, err := Notify(context.Background(), nil)
	if err == nil || n == nil {
		t.Fatalf("Notify to a dead socket = %v; want an error and a usable Notifier", err)
	}
	if err := n.Stopping(); err != nil {
		t.Fatalf("Stopping on a Notifier that never reached systemd: %v", err)
	}
}

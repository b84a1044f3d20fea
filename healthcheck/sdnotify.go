package healthcheck

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Notifier speaks systemd's notify protocol for a berth run as a
// Type=notify (or notify-reload) service with WatchdogSec. Without
// NOTIFY_SOCKET in the environment every method does nothing, so berth
// behaves the same under Docker, Kubernetes or a shell.
type Notifier struct {
	checker  *Checker
	enabled  bool
	interval time.Duration // WATCHDOG_USEC; zero when the watchdog is off
	done     chan struct{} // closed when the watchdog loop has exited

	stopOnce sync.Once
	mu       sync.Mutex // orders RELOADING=1/READY=1 against STOPPING=1
	stopped  bool

	starving bool // owned by run: the last ping was withheld
}

// Notify tells systemd berth is ready (READY=1); call it once the listener
// accepts connections. When systemd set a watchdog for this process
// (WATCHDOG_USEC, and WATCHDOG_PID if set names it) it then pings WATCHDOG=1
// every half interval, but only while no liveness check of checker fails,
// so systemd restarts a berth that is running but cannot do its job (its
// data directory went read-only, say). A nil checker pings unconditionally.
//
// When ctx is done it sends STOPPING=1 and stops pinging; systemd stops
// enforcing the watchdog once told the service is stopping, so a long
// graceful shutdown is not killed for silence. Pass the context that is
// cancelled when shutdown begins.
//
// The error reports a notification that could not be sent (a bad
// NOTIFY_SOCKET or WATCHDOG_USEC); berth should log it and carry on. The
// Notifier is usable either way.
func Notify(ctx context.Context, checker *Checker) (*Notifier, error) {
	n := &Notifier{checker: checker, done: make(chan struct{})}
	sent, err := daemon.SdNotify(false, daemon.SdNotifyReady)
	n.enabled = sent
	if err != nil {
		close(n.done)
		return n, fmt.Errorf("systemd notify: %w", err)
	}
	if !sent {
		close(n.done)
		return n, nil
	}
	interval, werr := daemon.SdWatchdogEnabled(false)
	if werr != nil {
		werr = fmt.Errorf("systemd watchdog: %w", werr)
	}
	n.interval = interval
	go n.run(ctx)
	return n, werr
}

// Enabled reports whether berth runs under systemd's notify protocol.
func (n *Notifier) Enabled() bool { return n.enabled }

// WatchdogInterval is systemd's watchdog timeout, zero when it is off.
func (n *Notifier) WatchdogInterval() time.Duration { return n.interval }

// Done is closed once the Notifier has stopped pinging after its context ended.
func (n *Notifier) Done() <-chan struct{} { return n.done }

func (n *Notifier) run(ctx context.Context) {
	defer close(n.done)
	var tick <-chan time.Time
	if n.interval > 0 {
		t := time.NewTicker(n.interval / 2)
		defer t.Stop()
		tick = t.C
		n.ping()
	}
	for {
		select {
		case <-ctx.Done():
			_ = n.Stopping()
			return
		case <-tick:
			n.ping()
		}
	}
}

// ping feeds the watchdog, or, when a liveness check fails, lets it starve
// and says why in `systemctl status`.
func (n *Notifier) ping() {
	if n.checker != nil {
		if rep := n.checker.Report(); !rep.Live {
			n.starving = true
			_ = n.send("STATUS=not pinging the watchdog: " + failingLiveness(rep))
			return
		}
	}
	if n.starving {
		n.starving = false
		_ = n.send("STATUS=liveness checks pass again")
	}
	_ = n.send(daemon.SdNotifyWatchdog)
}

func failingLiveness(rep Report) string {
	var s []string
	for _, c := range rep.Checks {
		if c.Kind == Liveness && c.Status == StatusFailing {
			s = append(s, c.Name+": "+oneLine(c.Error))
		}
	}
	return fmt.Sprint(s)
}

func (n *Notifier) send(state string) error {
	if !n.enabled {
		return nil
	}
	_, err := daemon.SdNotify(false, state)
	return err
}

// Reload wraps a configuration reload: RELOADING=1 (with MONOTONIC_USEC, as
// Type=notify-reload requires) before fn, READY=1 after it whatever fn
// returns, since a rejected configuration leaves berth serving with the old
// one. It returns fn's error. After Stopping it only runs fn.
func (n *Notifier) Reload(fn func() error) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.stopped {
		return fn()
	}
	serr := n.send(daemon.SdNotifyReloading + "\n" + daemon.SdNotifyMonotonicUsec())
	err := fn()
	status := "STATUS=configuration reloaded"
	if err != nil {
		status = "STATUS=configuration reload rejected, still serving the previous one: " + oneLine(err.Error())
	}
	serr = errors.Join(serr, n.send(daemon.SdNotifyReady+"\n"+status))
	if serr != nil && err == nil {
		return fmt.Errorf("systemd notify: %w", serr)
	}
	return err
}

// Stopping sends STOPPING=1, once; the Notifier's context ending does it
// too.
func (n *Notifier) Stopping() error {
	var err error
	n.stopOnce.Do(func() {
		n.mu.Lock()
		defer n.mu.Unlock()
		n.stopped = true
		err = n.send(daemon.SdNotifyStopping)
	})
	return err
}

// Status sets the one-line status `systemctl status` shows.
func (n *Notifier) Status(msg string) error {
	return n.send("STATUS=" + oneLine(msg))
}

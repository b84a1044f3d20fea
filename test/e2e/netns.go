package e2e

// A fleet in network namespaces: every host is a namespace of its own, with
// a veth pair to a Linux bridge the test creates and its own berth on its
// own 127.0.0.1:5000 (berth listens on 0.0.0.0:5000 inside the namespace,
// so its peers reach it over the bridge too). The test process stays in the
// host namespace; what the hosts reach over the bridge (the upstream, the
// bucket) it serves on the bridge's own address through Forwarders.
//
// Addresses are a private 10.213.X.0/24 that only exists on the bridge and
// inside the namespaces created here; nothing is routed anywhere else.
// Every name carries the prefix "bnt" and the creating process's id, so a
// run removes what a dead run left behind (its process is gone) and never
// touches a live run's namespaces.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// netnsPrefix starts the name of every namespace, link and mount point the
// harness creates.
const netnsPrefix = "bnt"

// Netns is a bridge and N host namespaces attached to it.
type Netns struct {
	Bridge string // the bridge's link name
	Subnet string // 10.213.X
	HostIP string // the bridge's address in the host namespace: 10.213.X.1
	Hosts  []*NetnsHost
	tag    string // prefix + pid
}

// NetnsHost is one host: a network namespace with one veth on the bridge.
type NetnsHost struct {
	Index int
	NS    string // namespace name, for `ip netns exec`
	IP    string // its address on the bridge
	Veth  string // the host-side end of its veth pair (on the bridge)
}

// RequireNetns skips (fails under CI=true) unless the test can create
// network namespaces: root and iproute2's ip.
func RequireNetns(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		testsupport.SkipOrFail(t, "needs root to create network namespaces, veths and a bridge")
	}
	testsupport.RequireTool(t, "ip")
}

// ipCmd runs ip with args and fails the test on error.
func ipCmd(t testing.TB, args ...string) {
	t.Helper()
	if out, err := RunErr(30*time.Second, nil, "ip", args...); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// StartNetns creates a bridge and n host namespaces, removing first what a
// dead run of this harness left behind, and removes them all at cleanup,
// also after a failed test (the processes inside are killed first).
func StartNetns(t testing.TB, n int) *Netns {
	t.Helper()
	RequireNetns(t)
	RemoveStaleNetns(t)
	tag := netnsPrefix + strconv.Itoa(os.Getpid())
	if len(tag)+4 > 15 {
		t.Fatalf("pid %d too long for link names", os.Getpid())
	}
	subnet := freeSubnet(t)
	nn := &Netns{Bridge: tag + "b", Subnet: subnet, HostIP: subnet + ".1", tag: tag}
	// Registered before anything exists, so a failure halfway removes
	// what was made.
	t.Cleanup(func() { nn.remove(t) })
	nn.remove(t) // this process's leftovers from an earlier test
	ipCmd(t, "link", "add", nn.Bridge, "type", "bridge")
	ipCmd(t, "addr", "add", nn.HostIP+"/24", "dev", nn.Bridge)
	ipCmd(t, "link", "set", nn.Bridge, "up")
	for i := range n {
		h := &NetnsHost{
			Index: i,
			NS:    fmt.Sprintf("%s-h%d", tag, i),
			IP:    fmt.Sprintf("%s.%d", subnet, 10+i),
			Veth:  fmt.Sprintf("%sv%d", tag, i),
		}
		peer := fmt.Sprintf("%sp%d", tag, i)
		ipCmd(t, "netns", "add", h.NS)
		ipCmd(t, "link", "add", h.Veth, "type", "veth", "peer", "name", peer)
		ipCmd(t, "link", "set", peer, "netns", h.NS)
		ipCmd(t, "link", "set", h.Veth, "master", nn.Bridge, "up")
		ipCmd(t, "-n", h.NS, "addr", "add", h.IP+"/24", "dev", peer)
		ipCmd(t, "-n", h.NS, "link", "set", peer, "up")
		ipCmd(t, "-n", h.NS, "link", "set", "lo", "up")
		nn.Hosts = append(nn.Hosts, h)
	}
	return nn
}

// remove kills what runs in this run's namespaces and deletes them, the
// veths and the bridge. Deleting a namespace deletes the veth end inside
// it, and with it the pair.
func (nn *Netns) remove(t testing.TB) {
	t.Helper()
	removeNetnsTagged(t, func(tag string) bool { return tag == nn.tag })
}

// RemoveStaleNetns removes namespaces, links and tmpfs mounts of this
// harness whose creating process no longer runs.
func RemoveStaleNetns(t testing.TB) {
	t.Helper()
	removeNetnsTagged(t, func(tag string) bool {
		pid, err := strconv.Atoi(strings.TrimPrefix(tag, netnsPrefix))
		if err != nil || pid == os.Getpid() {
			return false
		}
		return syscall.Kill(pid, 0) == syscall.ESRCH
	})
}

// netnsTag extracts "bnt<pid>" from a name the harness made, or "".
func netnsTag(name string) string {
	rest, ok := strings.CutPrefix(name, netnsPrefix)
	if !ok {
		return ""
	}
	i := 0
	for i < len(rest) && rest[i] >= '0' && rest[i] <= '9' {
		i++
	}
	if i == 0 {
		return ""
	}
	return netnsPrefix + rest[:i]
}

func removeNetnsTagged(t testing.TB, match func(tag string) bool) {
	t.Helper()
	// Mounts first: a tmpfs data directory of a host.
	unmountAll(func(path string) bool {
		base := filepath.Base(path)
		tag := netnsTag(base)
		return tag != "" && strings.Contains(base, "-disk") && match(tag)
	})
	out, _ := RunErr(30*time.Second, nil, "ip", "netns", "list")
	for _, line := range strings.Split(out, "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		ns := fields[0]
		if tag := netnsTag(ns); tag == "" || !match(tag) {
			continue
		}
		// Processes started in it (berth, crane) by this harness.
		pids, _ := RunErr(10*time.Second, nil, "ip", "netns", "pids", ns)
		for _, p := range strings.Fields(pids) {
			if pid, err := strconv.Atoi(p); err == nil && pid > 1 && pid != os.Getpid() {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if out, err := RunErr(30*time.Second, nil, "ip", "netns", "del", ns); err != nil {
			t.Logf("removing namespace %s: %v: %s", ns, err, out)
		}
	}
	out, _ = RunErr(30*time.Second, nil, "ip", "-o", "link", "show")
	for _, line := range strings.Split(out, "\n") {
		// "12: bnt123v0@if11: <...>"
		fields := strings.Fields(line)
		if len(fields) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(fields[1], ":"), "@")
		if tag := netnsTag(name); tag == "" || !match(tag) {
			continue
		}
		if out, err := RunErr(30*time.Second, nil, "ip", "link", "del", name); err != nil && !strings.Contains(out, "Cannot find device") {
			t.Logf("removing link %s: %v: %s", name, err, out)
		}
	}
}

// unmountAll detaches every mount of this mount namespace whose mount point
// matches, deepest first.
func unmountAll(match func(mountPoint string) bool) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return
	}
	var mounts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) >= 2 && match(fields[1]) {
			mounts = append(mounts, fields[1])
		}
	}
	f.Close()
	slices.SortFunc(mounts, func(a, b string) int { return len(b) - len(a) })
	for _, m := range mounts {
		_ = syscall.Unmount(m, syscall.MNT_DETACH)
	}
}

// freeSubnet picks 10.213.X with no address of this machine in it, so two
// runs (or anything else) never share a subnet.
func freeSubnet(t testing.TB) string {
	t.Helper()
	ifs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	used := map[string]bool{}
	for _, a := range ifs {
		if ipn, ok := a.(*net.IPNet); ok {
			if ip4 := ipn.IP.To4(); ip4 != nil && ip4[0] == 10 && ip4[1] == 213 {
				used[fmt.Sprintf("10.213.%d", ip4[2])] = true
			}
		}
	}
	start := os.Getpid() % 200
	for i := range 200 {
		s := fmt.Sprintf("10.213.%d", 10+(start+i)%200)
		if !used[s] {
			return s
		}
	}
	t.Fatal("no free 10.213.X.0/24 subnet")
	return ""
}

// Exec runs a command inside the host's namespace with a deadline and
// returns its combined output.
func (h *NetnsHost) Exec(timeout time.Duration, name string, args ...string) (string, error) {
	return RunErr(timeout, nil, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// TmpfsDir mounts a tmpfs of size bytes on a new directory (in the host's
// mount namespace, which `ip netns exec` copies) and unmounts it at cleanup.
// Register it before starting the process that uses it, so the process is
// stopped first.
func (nn *Netns) TmpfsDir(t testing.TB, h *NetnsHost, size int64) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), fmt.Sprintf("%s-h%d-disk", nn.tag, h.Index))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0755", size)); err != nil {
		testsupport.SkipOrFail(t, "mounting a tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmounting %s: %v", dir, err)
		}
	})
	return dir
}

// StartNetnsBerth runs `ip netns exec NS berth serve --listen 0.0.0.0:5000
// --data DIR args...` (with --data left out if args has one; "{ip}" in args
// stands for the host's address on the bridge) and waits until /readyz
// answers over the bridge. The Berth's Host and URL are that address; inside
// the namespace it is also 127.0.0.1:5000. It gets SIGTERM at cleanup; a data
// race in its log fails the test.
func StartNetnsBerth(t testing.TB, h *NetnsHost, args ...string) *Berth {
	t.Helper()
	bin := testsupport.BerthBinary(t)
	dir := t.TempDir()
	data, hasData := dataArg(args)
	if !hasData {
		data = filepath.Join(dir, "data")
	}
	full := []string{"netns", "exec", h.NS, bin, "serve", "--listen", "0.0.0.0:5000"}
	if !hasData {
		full = append(full, "--data", data)
	}
	for _, a := range args {
		full = append(full, strings.ReplaceAll(a, "{ip}", h.IP))
	}
	// ip netns exec execs berth itself (no fork without -b), so the
	// process is berth: signals reach it directly.
	cmd := exec.Command("ip", full...)
	cmd.Env = berthEnv()
	p := StartProcess(t, fmt.Sprintf("berth-h%d", h.Index), filepath.Join(dir, "berth.log"), cmd)
	t.Cleanup(func() {
		p.Stop(t)
		if p.LogContains("WARNING: DATA RACE") {
			t.Errorf("berth on host %d reported a data race; see its log", h.Index)
		}
	})
	b := &Berth{Process: p, Host: h.IP + ":5000", URL: "http://" + h.IP + ":5000", Data: data}
	var noReadyz bool
	p.WaitUntil(t, 60*time.Second, "ready (/readyz 200 over the bridge)", func(ctx context.Context) bool {
		return berthReady(ctx, b.URL, &noReadyz)
	})
	return b
}

// VmRSS is a process's resident memory in bytes, from /proc.
func VmRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) == 2 && f[1] == "kB" {
				kb, err := strconv.ParseInt(f[0], 10, 64)
				return kb << 10, err
			}
		}
	}
	return 0, errors.New("no VmRSS")
}

// Forwarder listens on an address of the bridge and forwards each
// connection to a target in the host namespace (a registry, MinIO, a
// Proxy on loopback), so the namespaces reach servers that listen on
// loopback only. It can be taken down: open connections are reset and new
// ones closed at once, as a server that went away.
type Forwarder struct {
	Addr   string // IP:PORT on the bridge
	URL    string // http://Addr
	Target string

	ln    net.Listener
	mu    sync.Mutex
	down  bool
	conns map[net.Conn]struct{}
	done  chan struct{}
	wg    sync.WaitGroup
}

// Forward listens on ip:0 and forwards to target until cleanup.
func Forward(t testing.TB, ip, target string) *Forwarder {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatalf("forwarder on %s: %v", ip, err)
	}
	f := &Forwarder{Addr: ln.Addr().String(), URL: "http://" + ln.Addr().String(), Target: target,
		ln: ln, conns: map[net.Conn]struct{}{}, done: make(chan struct{})}
	f.wg.Add(1)
	go f.serve()
	t.Cleanup(f.Close)
	return f
}

// SetDown takes the forwarded server away (true) or brings it back.
func (f *Forwarder) SetDown(down bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = down
	if down {
		for c := range f.conns {
			reset(c)
		}
	}
}

// reset closes c with an RST rather than a FIN.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	c.Close()
}

// Close stops listening and drops every connection.
func (f *Forwarder) Close() {
	f.mu.Lock()
	select {
	case <-f.done:
		f.mu.Unlock()
		return
	default:
	}
	close(f.done)
	f.ln.Close()
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

func (f *Forwarder) track(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	select {
	case <-f.done:
		c.Close()
		return false
	default:
	}
	if f.down {
		reset(c)
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *Forwarder) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
	c.Close()
}

func (f *Forwarder) serve() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		if !f.track(c) {
			continue
		}
		f.wg.Add(1)
		go f.handle(c)
	}
}

func (f *Forwarder) handle(c net.Conn) {
	defer f.wg.Done()
	defer f.untrack(c)
	up, err := net.DialTimeout("tcp", f.Target, 5*time.Second)
	if err != nil {
		return
	}
	if !f.track(up) {
		return
	}
	defer f.untrack(up)
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		_, err := io.Copy(dst, src)
		if err == nil {
			// A clean EOF: pass the half-close on.
			if tc, ok := dst.(*net.TCPConn); ok {
				_ = tc.CloseWrite()
			}
		} else {
			c.Close()
			up.Close()
		}
		done <- struct{}{}
	}
	go cp(up, c)
	go cp(c, up)
	<-done
	<-done
}

package systemd

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/internal/testsupport"
)

func TestMain(m *testing.M) { testsupport.Main(m) }

// verifyTree lays out a unit search path holding the given files plus stub
// containerd.service and docker.service units (the drop-ins extend them; the
// stubs keep the result independent of which runtimes the machine has).
func verifyTree(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	all := map[string]string{
		"containerd.service": "[Unit]\nDescription=stub containerd\n[Service]\nExecStart=/bin/true\n",
		"docker.service":     "[Unit]\nDescription=stub Docker\n[Service]\nExecStart=/bin/true\n",
	}
	for k, v := range files {
		all[k] = v
	}
	for name, body := range all {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func shipped(t *testing.T) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, name := range []string{"berth.service", "containerd.service.d/10-berth.conf", "docker.service.d/10-berth.conf"} {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		m[name] = string(b)
	}
	return m
}

// verify runs systemd-analyze verify on the units in unitDir. verify insists
// that ExecStart= names an executable, and has no option to look for it
// elsewhere (--root does not relocate that check), so the run happens in a
// private mount namespace where an executable berth is bind-mounted over
// /usr/local/bin: the unit is checked exactly as shipped, and the host's
// /usr/local/bin is untouched.
func verify(t *testing.T, unitDir string, units ...string) (string, error) {
	t.Helper()
	analyze := testsupport.RequireTool(t, "systemd-analyze")
	bin := t.TempDir()
	if err := os.WriteFile(filepath.Join(bin, "berth"), []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args := append([]string{"-c", `mount --bind "$0" /usr/local/bin && exec "$@"`, bin, analyze, "verify"}, units...)
	cmd := exec.CommandContext(ctx, "/bin/sh", args...)
	// The trailing colon keeps the default unit paths after ours, so
	// network-online.target, multi-user.target and friends resolve.
	cmd.Env = append(os.Environ(), "SYSTEMD_UNIT_PATH="+unitDir+":", "SYSTEMD_LOG_COLOR=0",
		// Without a terminal, systemd tools log to the journal or kmsg by
		// default, and the findings would never reach this test.
		"SYSTEMD_LOG_TARGET=console")
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	// verify takes an argument naming a file in its working directory as
	// that file, and adds the directory to the unit path: run where the
	// copies are, not beside the shipped originals.
	cmd.Dir = unitDir
	out, err := cmd.CombinedOutput()
	var perr *os.PathError
	if errors.As(err, &perr) || errors.Is(err, syscall.EPERM) {
		testsupport.SkipOrFail(t, "cannot make a private mount namespace for systemd-analyze (needs root or CAP_SYS_ADMIN): %v", err)
	}
	if bytes.Contains(out, []byte("mount: ")) {
		t.Fatalf("bind-mounting the stub berth failed: %s", out)
	}
	return string(out), err
}

func TestUnitsPassSystemdAnalyzeVerify(t *testing.T) {
	dir := verifyTree(t, shipped(t))
	out, err := verify(t, dir, "berth.service", "containerd.service", "docker.service")
	// verify reports unknown keys and bad values as warnings with exit
	// status 0, so any output at all is a finding.
	if err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// The harness must see a broken unit or drop-in, or the test above proves
// nothing: a drop-in directory that is never read would pass it silently.
func TestVerifyHarnessCatchesMistakes(t *testing.T) {
	cases := []struct {
		file, from, to, want string
	}{
		{"berth.service", "WatchdogSec=30s", "WatchdogSecs=30s", "WatchdogSecs"},
		{"berth.service", "Type=notify", "Type=notifyy", "notifyy"},
		{"berth.service", "ExecStart=/usr/local/bin/berth", "ExecStart=/usr/local/bin/berth-missing", "berth-missing"},
		{"containerd.service.d/10-berth.conf", "After=berth.service", "Afterr=berth.service", "containerd.service.d/10-berth.conf"},
		{"docker.service.d/10-berth.conf", "Wants=berth.service", "Wantz=berth.service", "docker.service.d/10-berth.conf"},
	}
	for _, c := range cases {
		t.Run(c.to, func(t *testing.T) {
			files := shipped(t)
			if !strings.Contains(files[c.file], c.from) {
				t.Fatalf("%s no longer contains %q; update this test", c.file, c.from)
			}
			files[c.file] = strings.Replace(files[c.file], c.from, c.to, 1)
			out, err := verify(t, verifyTree(t, files), "berth.service", "containerd.service", "docker.service")
			if err == nil && !strings.Contains(out, c.want) {
				t.Fatalf("verify accepted %s with %q: %s", c.file, c.to, out)
			}
			if !strings.Contains(out, c.want) {
				t.Fatalf("verify failed, but its output does not name %q: %v\n%s", c.want, err, out)
			}
		})
	}
}

// unit is a parsed unit file: section -> key -> values in order.
type unit map[string]map[string][]string

func parseUnit(t *testing.T, path string) unit {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u := unit{}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s: cannot parse %q", path, line)
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	return u
}

// last is the effective value of a key systemd reads as a single setting.
func (u unit) last(section, key string) (string, bool) {
	v := u[section][key]
	if len(v) == 0 {
		return "", false
	}
	return v[len(v)-1], true
}

// The settings below are the contract with the rest of berth (readiness and
// watchdog notification, the config path, the cache path, the shutdown
// deadline) and with operators (hardening); verify cannot know about them.
func TestServiceContract(t *testing.T) {
	u := parseUnit(t, "berth.service")
	want := map[string]string{
		"Type":            "notify",
		"NotifyAccess":    "main",
		"Restart":         "on-failure",
		"ExecReload":      "/bin/kill -HUP $MAINPID",
		"EnvironmentFile": "-/etc/default/berth",
		"ProtectSystem":   "strict",
		"ProtectHome":     "yes",
		"PrivateTmp":      "yes",
		"NoNewPrivileges": "yes",
		"DynamicUser":     "yes",
		"StateDirectory":  "berth",
	}
	for k, v := range want {
		if got, _ := u.last("Service", k); got != v {
			t.Errorf("[Service] %s = %q, want %q", k, got, v)
		}
	}
	if got, ok := u.last("Service", "CapabilityBoundingSet"); !ok || got != "" {
		t.Errorf("CapabilityBoundingSet = %q (set: %v), want present and empty", got, ok)
	}
	exec, _ := u.last("Service", "ExecStart")
	if f := strings.Fields(exec); len(f) < 4 || f[0] != "/usr/local/bin/berth" || f[1] != "serve" || f[2] != "--config" || f[3] != "/etc/berth/config.yml" {
		t.Errorf("ExecStart = %q, want /usr/local/bin/berth serve --config /etc/berth/config.yml", exec)
	}
	wd, _ := u.last("Service", "WatchdogSec")
	if d, err := time.ParseDuration(wd); err != nil || d < 10*time.Second {
		t.Errorf("WatchdogSec = %q: want a duration of at least 10s so a busy node is not restarted needlessly", wd)
	}
	// systemd must not SIGKILL berth while it still drains pulls for the
	// default shutdown_timeout.
	stop, _ := u.last("Service", "TimeoutStopSec")
	if d, err := time.ParseDuration(stop); err != nil || d <= config.Default().ShutdownTimeout.D() {
		t.Errorf("TimeoutStopSec = %q, want more than the default shutdown_timeout %v", stop, config.Default().ShutdownTimeout)
	}
	// The data directory the unit hands berth must be the one
	// ProtectSystem=strict leaves writable.
	var data string
	for _, e := range u["Service"]["Environment"] {
		if v, ok := strings.CutPrefix(e, "BERTH_DATA="); ok {
			data = v
		}
	}
	state, _ := u.last("Service", "StateDirectory")
	if data != "/var/lib/"+state {
		t.Errorf("BERTH_DATA=%q is not the StateDirectory /var/lib/%s, so berth could not write its cache", data, state)
	}
	if n, _ := u.last("Service", "LimitNOFILE"); n == "" {
		t.Error("LimitNOFILE is not set")
	}
	for _, f := range []string{"containerd.service.d/10-berth.conf", "docker.service.d/10-berth.conf"} {
		d := parseUnit(t, f)
		for _, k := range []string{"After", "Wants"} {
			if got, _ := d.last("Unit", k); got != "berth.service" {
				t.Errorf("%s: [Unit] %s = %q, want berth.service", f, k, got)
			}
		}
		if _, ok := d.last("Unit", "Requires"); ok {
			t.Errorf("%s: Requires= would keep the runtime down whenever berth is", f)
		}
	}
}

var envLine = regexp.MustCompile(`^#?(BERTH_[A-Z0-9_]+)=(.*)$`)

// berth.env documents every BERTH_* variable berth reads, no others, and its
// example values are ones berth accepts.
func TestEnvironmentFile(t *testing.T) {
	b, err := os.ReadFile("berth.env")
	if err != nil {
		t.Fatal(err)
	}
	known := config.EnvNames()
	seen := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		m := envLine.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		if _, ok := known[m[1]]; !ok {
			t.Errorf("berth.env mentions %s, which berth does not read", m[1])
		}
		seen[m[1]] = m[2]
	}
	var missing []string
	for name := range known {
		if _, ok := seen[name]; !ok {
			missing = append(missing, name)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("berth.env does not document %v", missing)
	}

	var o config.Overrides
	o.ReadEnv(func(k string) (string, bool) {
		v, ok := seen[k]
		if v == "" {
			return "", false // an empty example means "unset"
		}
		return v, ok
	})
	c := config.Default()
	if err := o.Apply(c); err != nil {
		t.Fatalf("berth.env example values: %v", err)
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("berth.env example values: %v", err)
	}
	if c.Data != "/var/lib/berth" || len(c.Upstreams) < 2 {
		t.Fatalf("berth.env examples were not applied: data %q, upstreams %v", c.Data, c.UpstreamHosts())
	}
}

// berth itself must accept the command line the unit starts it with.
func TestExecStartParsesInBerth(t *testing.T) {
	bin := testsupport.BerthBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	exec0, _ := parseUnit(t, "berth.service").last("Service", "ExecStart")
	args := strings.Fields(exec0)[1:]
	// --help after the unit's own flags: they must parse, and berth stops
	// before opening the config file or a listener.
	out, err := exec.CommandContext(ctx, bin, append(args, "--help")...).CombinedOutput()
	if err != nil {
		t.Fatalf("berth %s --help: %v\n%s", strings.Join(args, " "), err, out)
	}
	if !strings.Contains(string(out), "-config") {
		t.Fatalf("berth serve --help does not describe --config:\n%s", out)
	}
}

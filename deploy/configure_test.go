package deploy

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	dconfig "github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/log"
	"github.com/pelletier/go-toml/v2"
	"go.podman.io/image/v5/docker/reference"
	"go.podman.io/image/v5/pkg/sysregistriesv2"
	"go.podman.io/image/v5/types"

	"github.com/berth-dev/berth/internal/testsupport"
)

func target(listen string, up ...string) Target {
	t := Target{Listen: listen, Upstreams: map[string]string{}, DialTimeout: DefaultDialTimeout}
	for _, u := range up {
		h, url, _ := strings.Cut(u, "=")
		t.Upstreams[h] = url
	}
	return t
}

// plan runs Plan against the files under root, as --write would.
func plan(t *testing.T, runtime string, tg Target, path string) ([]File, []string) {
	t.Helper()
	files, notes, err := Plan(runtime, tg, path, os.ReadFile)
	if err != nil {
		t.Fatalf("Plan(%s): %v", runtime, err)
	}
	return files, notes
}

func writeAll(t *testing.T, files []File) {
	t.Helper()
	if err := Write(files); err != nil {
		t.Fatal(err)
	}
}

// assertKept checks that every line the operator wrote is still there, in
// the same order.
func assertKept(t *testing.T, operator, merged string) {
	t.Helper()
	rest := merged
	for _, line := range strings.Split(strings.TrimSpace(operator), "\n") {
		i := strings.Index(rest, line+"\n")
		if i < 0 {
			t.Fatalf("operator line %q lost or reordered in:\n%s", line, merged)
		}
		rest = rest[i+len(line)+1:]
	}
}

// idempotent runs the same plan again over the written files: nothing may change.
func idempotent(t *testing.T, runtime string, tg Target, path string) {
	t.Helper()
	files, _ := plan(t, runtime, tg, path)
	for _, f := range files {
		if f.Changed {
			t.Fatalf("second run would change %s:\n%s", f.Path, f.Content)
		}
	}
}

// containerdHosts is how containerd itself reads a certs.d directory.
func containerdHosts(t *testing.T, dir, registry string) []docker.RegistryHost {
	t.Helper()
	hosts, err := dconfig.ConfigureHosts(context.Background(), dconfig.HostOptions{HostDir: dconfig.HostDirFromRoot(dir)})(registry)
	if err != nil {
		t.Fatalf("containerd rejects the hosts.toml for %s: %v", registry, err)
	}
	return hosts
}

func TestContainerdHostsAsContainerdReadsThem(t *testing.T) {
	dir := t.TempDir()
	tg := target("127.0.0.1:5000", "docker.io=https://registry-1.docker.io", "ghcr.io=https://ghcr.io", "registry.test:5001=http://127.0.0.1:5001")
	files, _ := plan(t, "containerd", tg, dir)
	if len(files) != 3 {
		t.Fatalf("want one hosts.toml per upstream, got %d files", len(files))
	}
	writeAll(t, files)
	for _, c := range []struct{ registry, scheme, host string }{
		{"docker.io", "https", "registry-1.docker.io"},
		{"ghcr.io", "https", "ghcr.io"},
		{"registry.test:5001", "http", "127.0.0.1:5001"},
	} {
		hosts := containerdHosts(t, dir, c.registry)
		if len(hosts) != 2 {
			t.Fatalf("%s: containerd sees %d hosts, want berth then the upstream", c.registry, len(hosts))
		}
		b := hosts[0]
		if b.Scheme != "http" || b.Host != "127.0.0.1:5000" || b.Path != "/v2" {
			t.Errorf("%s: first host %s://%s%s, want http://127.0.0.1:5000/v2", c.registry, b.Scheme, b.Host, b.Path)
		}
		if b.Capabilities != docker.HostCapabilityPull|docker.HostCapabilityResolve {
			t.Errorf("%s: berth capabilities %v, want pull and resolve only", c.registry, b.Capabilities)
		}
		if u := hosts[1]; u.Scheme != c.scheme || u.Host != c.host {
			t.Errorf("%s: fallback %s://%s, want %s://%s", c.registry, u.Scheme, u.Host, c.scheme, c.host)
		}
		var parsed struct {
			Host map[string]struct {
				DialTimeout string `toml:"dial_timeout"`
			} `toml:"host"`
		}
		b2, _ := os.ReadFile(filepath.Join(dir, c.registry, "hosts.toml"))
		if err := toml.Unmarshal(b2, &parsed); err != nil {
			t.Fatal(err)
		}
		if d, err := time.ParseDuration(parsed.Host["http://127.0.0.1:5000"].DialTimeout); err != nil || d != DefaultDialTimeout {
			t.Errorf("%s: dial_timeout %q, want %v", c.registry, parsed.Host["http://127.0.0.1:5000"].DialTimeout, DefaultDialTimeout)
		}
	}
	idempotent(t, "containerd", tg, dir)
}

// fakeRegistry answers manifest HEADs and records what it was asked.
type fakeRegistry struct {
	mu   sync.Mutex
	seen []string
}

func (f *fakeRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.seen = append(f.seen, r.Method+" "+r.URL.RequestURI())
	f.mu.Unlock()
	if r.URL.Path == "/v2/" {
		w.WriteHeader(http.StatusOK)
		return
	}
	w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	w.Header().Set("Docker-Content-Digest", "sha256:"+strings.Repeat("a", 64))
	w.Header().Set("Content-Length", "2")
	w.WriteHeader(http.StatusOK)
}

func (f *fakeRegistry) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.seen...)
}

// containerd's resolver, configured by the generated hosts.toml, asks berth
// first with ?ns=<registry> (which is how berth routes it), and when berth
// is down it goes to the upstream instead of failing.
func TestContainerdResolvesThroughBerthAndFallsBack(t *testing.T) {
	// containerd logs each host it skips; the assertions below say it.
	log.L.Logger.SetLevel(log.WarnLevel)
	upstream := &fakeRegistry{}
	up := httptest.NewServer(upstream)
	defer up.Close()
	berth := &fakeRegistry{}
	bs := httptest.NewServer(berth)
	defer bs.Close()

	resolve := func(listen string) error {
		dir := t.TempDir()
		writeAll(t, mustPlan(t, "containerd", target(listen, "docker.io="+up.URL), dir))
		r := docker.NewResolver(docker.ResolverOptions{Hosts: dconfig.ConfigureHosts(context.Background(), dconfig.HostOptions{HostDir: dconfig.HostDirFromRoot(dir)})})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _, err := r.Resolve(ctx, "docker.io/library/alpine:3")
		return err
	}

	if err := resolve(bs.Listener.Addr().String()); err != nil {
		t.Fatalf("resolve through berth: %v", err)
	}
	got := berth.requests()
	if len(got) == 0 || !strings.Contains(got[0], "/v2/library/alpine/manifests/3?ns=docker.io") {
		t.Fatalf("berth saw %v, want the manifest request with ?ns=docker.io", got)
	}
	if n := len(upstream.requests()); n != 0 {
		t.Fatalf("the upstream was asked %d times although berth answered", n)
	}

	// A port nothing listens on: a stopped berth.
	stopped := testsupport.FreeAddr(t)
	start := time.Now()
	if err := resolve(stopped); err != nil {
		t.Fatalf("with berth stopped, containerd did not fall back to the upstream: %v", err)
	}
	if len(upstream.requests()) == 0 {
		t.Fatal("with berth stopped, the upstream was never asked")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("falling back took %v", d)
	}
}

func mustPlan(t *testing.T, runtime string, tg Target, path string) []File {
	t.Helper()
	files, _ := plan(t, runtime, tg, path)
	return files
}

const operatorHostsTOML = `# Our registry setup, do not lose this comment.
server = "https://docker-proxy.corp.example"

# The corporate mirror; keep it as second choice.
[host."https://mirror.corp.example"]
  capabilities = [
    "pull",
  ]
  skip_verify = false
  # containerd ignores keys it does not know; a nested array puts "[" at
  # the start of a line that is not a table header.
  x-notes = [
    ["owner", "platform"],
  ]

[host."https://mirror.corp.example".header]
  x-team = "platform"
`

func TestContainerdMergeKeepsOperatorEntries(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "docker.io", "hosts.toml")
	os.MkdirAll(filepath.Dir(p), 0o755)
	if err := os.WriteFile(p, []byte(operatorHostsTOML), 0o640); err != nil {
		t.Fatal(err)
	}
	tg := target("127.0.0.1:5000", "docker.io=https://registry-1.docker.io")
	files, notes := plan(t, "containerd", tg, dir)
	writeAll(t, files)
	merged, _ := os.ReadFile(p)
	assertKept(t, operatorHostsTOML, string(merged))
	if !strings.Contains(strings.Join(notes, "\n"), `kept server = "https://docker-proxy.corp.example"`) {
		t.Errorf("no note that the operator's server was kept: %q", notes)
	}
	if st, _ := os.Stat(p); st.Mode().Perm() != 0o640 {
		t.Errorf("file mode changed to %v", st.Mode().Perm())
	}
	hosts := containerdHosts(t, dir, "docker.io")
	var order []string
	for _, h := range hosts {
		order = append(order, h.Scheme+"://"+h.Host)
	}
	want := []string{"http://127.0.0.1:5000", "https://mirror.corp.example", "https://docker-proxy.corp.example"}
	if strings.Join(order, " ") != strings.Join(want, " ") {
		t.Fatalf("containerd's order %v, want %v\n%s", order, want, merged)
	}
	if strings.Join(hosts[1].Header["x-team"], ",") != "platform" || hosts[1].Capabilities != docker.HostCapabilityPull {
		t.Errorf("the operator's mirror lost settings: %+v", hosts[1])
	}
	idempotent(t, "containerd", tg, dir)

	// A new dial timeout replaces berth's own entry in place and nothing else.
	tg.DialTimeout = time.Second
	files, _ = plan(t, "containerd", tg, dir)
	writeAll(t, files)
	again, _ := os.ReadFile(p)
	if strings.Count(string(again), `[host."http://127.0.0.1:5000"]`) != 1 || !strings.Contains(string(again), `dial_timeout = "1s"`) {
		t.Fatalf("berth's entry was not replaced:\n%s", again)
	}
	assertKept(t, operatorHostsTOML, string(again))
}

func TestContainerdMergeAddsServerWhereTOMLAllowsIt(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "ghcr.io", "hosts.toml")
	os.MkdirAll(filepath.Dir(p), 0o755)
	operator := "# mirrors for ghcr\n[host.\"https://other.example\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
	os.WriteFile(p, []byte(operator), 0o644)
	tg := target("127.0.0.1:5000", "ghcr.io=https://ghcr.io")
	writeAll(t, mustPlan(t, "containerd", tg, dir))
	merged, _ := os.ReadFile(p)
	assertKept(t, operator, string(merged))
	hosts := containerdHosts(t, dir, "ghcr.io")
	if len(hosts) != 3 || hosts[0].Host != "127.0.0.1:5000" || hosts[1].Host != "other.example" || hosts[2].Host != "ghcr.io" {
		t.Fatalf("unexpected hosts %+v from\n%s", hosts, merged)
	}
	idempotent(t, "containerd", tg, dir)
}

func TestContainerdMergeRefusals(t *testing.T) {
	tg := target("127.0.0.1:5000", "docker.io=https://registry-1.docker.io")
	for name, c := range map[string]struct{ content, want string }{
		"invalid":   {"server = \"x\"\n[host\n", "line 2"},
		"inline":    {"[host]\n\"http://127.0.0.1:5000\" = { capabilities = [\"pull\"] }\n", "edit the file by hand"},
		"duplicate": {"server = \"a\"\nserver = \"b\"\n", "not valid TOML"},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "docker.io", "hosts.toml")
			os.MkdirAll(filepath.Dir(p), 0o755)
			os.WriteFile(p, []byte(c.content), 0o644)
			_, _, err := Plan("containerd", tg, dir, os.ReadFile)
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), p) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %v: want one line naming %s and containing %q", err, p, c.want)
			}
			if b, _ := os.ReadFile(p); string(b) != c.content {
				t.Fatal("refused file was modified")
			}
		})
	}
}

func TestDockerDaemonJSON(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "daemon.json")
	tg := target("127.0.0.1:5000", "docker.io=https://registry-1.docker.io")
	files, _ := plan(t, "docker", tg, p)
	writeAll(t, files)
	var fresh struct {
		Mirrors []string `json:"registry-mirrors"`
	}
	b, _ := os.ReadFile(p)
	if err := json.Unmarshal(b, &fresh); err != nil || len(fresh.Mirrors) != 1 || fresh.Mirrors[0] != "http://127.0.0.1:5000" {
		t.Fatalf("fresh daemon.json %s: %v", b, err)
	}

	operator := `{"log-driver": "journald", "registry-mirrors": ["https://mirror.gcr.io"],
 "features": {"buildkit": true}, "max-concurrent-downloads": 10, "storage-opts": []}`
	os.WriteFile(p, []byte(operator), 0o600)
	os.Chmod(p, 0o600)
	writeAll(t, mustPlan(t, "docker", tg, p))
	b, _ = os.ReadFile(p)
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("merged daemon.json is not JSON: %v\n%s", err, b)
	}
	var want map[string]any
	json.Unmarshal([]byte(operator), &want)
	want["registry-mirrors"] = []any{"http://127.0.0.1:5000", "https://mirror.gcr.io"}
	wb, _ := json.Marshal(want)
	gb, _ := json.Marshal(got)
	if string(wb) != string(gb) {
		t.Fatalf("merged\n%s\nwant\n%s", gb, wb)
	}
	// Keys keep the operator's order.
	if strings.Index(string(b), "log-driver") > strings.Index(string(b), "features") || strings.Index(string(b), "features") > strings.Index(string(b), "storage-opts") {
		t.Errorf("keys reordered:\n%s", b)
	}
	idempotent(t, "docker", tg, p)
	if st, _ := os.Stat(p); st.Mode().Perm() != 0o600 {
		t.Errorf("mode changed to %v", st.Mode().Perm())
	}

	// Off loopback Docker insists on TLS unless berth is an insecure registry.
	remote := target("10.0.0.5:5000", "docker.io=https://registry-1.docker.io")
	files, _ = plan(t, "docker", remote, filepath.Join(dir, "other.json"))
	var off struct {
		Mirrors  []string `json:"registry-mirrors"`
		Insecure []string `json:"insecure-registries"`
	}
	json.Unmarshal(files[0].Content, &off)
	if len(off.Insecure) != 1 || off.Insecure[0] != "10.0.0.5:5000" || off.Mirrors[0] != "http://10.0.0.5:5000" {
		t.Fatalf("non-loopback berth: %s", files[0].Content)
	}
}

func TestDockerRefusals(t *testing.T) {
	dir := t.TempDir()
	tg := target("127.0.0.1:5000", "docker.io=https://registry-1.docker.io")
	for name, c := range map[string]struct{ content, want string }{
		"syntax":     {"{\n  \"debug\": true,\n  oops\n}", "line 3"},
		"not object": {"[1, 2]", "JSON object"},
		"mirrors":    {`{"registry-mirrors": "http://x"}`, "list of strings"},
		"trailing":   {`{} {}`, "after the JSON object"},
	} {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(dir, name+".json")
			os.WriteFile(p, []byte(c.content), 0o644)
			_, _, err := Plan("docker", tg, p, os.ReadFile)
			if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %v: want one line containing %q", err, c.want)
			}
		})
	}
	if _, _, err := Plan("docker", target("127.0.0.1:5000", "ghcr.io=https://ghcr.io"), "", NoFiles); err == nil || !strings.Contains(err.Error(), "docker.io") {
		t.Fatalf("docker without a docker.io upstream: %v", err)
	}
}

// pullSources is where CRI-O (through containers/image) would pull ref from.
func pullSources(t *testing.T, file, ref string) []string {
	t.Helper()
	sysregistriesv2.InvalidateCache()
	sys := &types.SystemContext{SystemRegistriesConfPath: file, SystemRegistriesConfDirPath: filepath.Join(t.TempDir(), "none")}
	reg, err := sysregistriesv2.FindRegistry(sys, ref)
	if err != nil {
		t.Fatalf("containers/image rejects %s: %v", file, err)
	}
	if reg == nil {
		t.Fatalf("%s: no registry entry matches %s", file, ref)
	}
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		t.Fatal(err)
	}
	srcs, err := reg.PullSourcesFromReference(named)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, s := range srcs {
		out = append(out, s.Reference.String()+map[bool]string{true: " insecure", false: ""}[s.Endpoint.Insecure])
	}
	return out
}

func TestCRIORegistriesAsContainersImageReadsThem(t *testing.T) {
	p := filepath.Join(t.TempDir(), "berth.conf")
	tg := target("127.0.0.1:5000", "docker.io=https://registry-1.docker.io", "quay.io=https://quay.io", "registry.test=http://127.0.0.1:5001")
	writeAll(t, mustPlan(t, "crio", tg, p))
	for ref, want := range map[string]string{
		"docker.io/library/alpine:3":  "127.0.0.1:5000/docker.io/library/alpine:3 insecure,docker.io/library/alpine:3",
		"quay.io/prometheus/node:v1":  "127.0.0.1:5000/quay.io/prometheus/node:v1 insecure,quay.io/prometheus/node:v1",
		"registry.test/team/app:v2":   "127.0.0.1:5000/registry.test/team/app:v2 insecure,127.0.0.1:5001/team/app:v2 insecure",
		"registry.test/deep/a/b/c:v3": "127.0.0.1:5000/registry.test/deep/a/b/c:v3 insecure,127.0.0.1:5001/deep/a/b/c:v3 insecure",
	} {
		if got := strings.Join(pullSources(t, p, ref), ","); got != want {
			t.Errorf("%s: pull sources %s, want %s", ref, got, want)
		}
	}
	idempotent(t, "crio", tg, p)

	// containers/image cannot express a mirror path holding a port: such a
	// registry is left out, with a note, rather than breaking the file.
	withPort := target("127.0.0.1:5000", "docker.io=https://registry-1.docker.io", "registry.test:5001=http://127.0.0.1:5001")
	files, notes := plan(t, "crio", withPort, filepath.Join(t.TempDir(), "p.conf"))
	if strings.Contains(string(files[0].Content), "5001") || !strings.Contains(strings.Join(notes, " "), "skipped registry.test:5001") {
		t.Fatalf("registry with a port: notes %q, file\n%s", notes, files[0].Content)
	}
	if _, _, err := Plan("crio", target("127.0.0.1:5000", "registry.test:5001=http://127.0.0.1:5001"), "", NoFiles); err == nil {
		t.Fatal("CRI-O with only a registry that has a port: no error")
	}
}

const operatorRegistriesConf = `unqualified-search-registries = ["docker.io", "quay.io"]

# Docker Hub goes through the corporate mirror too.
[[registry]]
prefix = "docker.io"
location = "docker.io"

# corp mirror
[[registry.mirror]]
location = "mirror.corp.example/hub"

[[registry]]
location = "quay.io"
blocked = false

[aliases]
"fedora" = "registry.fedoraproject.org/fedora"
`

func TestCRIOMergeKeepsOperatorEntries(t *testing.T) {
	p := filepath.Join(t.TempDir(), "registries.conf")
	os.WriteFile(p, []byte(operatorRegistriesConf), 0o644)
	tg := target("127.0.0.1:5000", "docker.io=https://registry-1.docker.io", "quay.io=https://quay.io", "ghcr.io=https://ghcr.io")
	writeAll(t, mustPlan(t, "crio", tg, p))
	merged, _ := os.ReadFile(p)
	assertKept(t, operatorRegistriesConf, string(merged))
	for ref, want := range map[string]string{
		"docker.io/library/alpine:3": "127.0.0.1:5000/docker.io/library/alpine:3 insecure,mirror.corp.example/hub/library/alpine:3,docker.io/library/alpine:3",
		"quay.io/a/b:1":              "127.0.0.1:5000/quay.io/a/b:1 insecure,quay.io/a/b:1",
		"ghcr.io/org/app:1":          "127.0.0.1:5000/ghcr.io/org/app:1 insecure,ghcr.io/org/app:1",
	} {
		if got := strings.Join(pullSources(t, p, ref), ","); got != want {
			t.Errorf("%s: pull sources %s, want %s\n%s", ref, got, want, merged)
		}
	}
	idempotent(t, "crio", tg, p)

	v1 := filepath.Join(t.TempDir(), "v1.conf")
	os.WriteFile(v1, []byte("[registries.search]\nregistries = [\"docker.io\"]\n"), 0o644)
	if _, _, err := Plan("crio", tg, v1, os.ReadFile); err == nil || !strings.Contains(err.Error(), "v1") {
		t.Fatalf("v1 format: %v", err)
	}
}

func TestTargetValidation(t *testing.T) {
	good := target("127.0.0.1:5000", "docker.io=https://registry-1.docker.io")
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, tg := range map[string]Target{
		"no port":        target("127.0.0.1", "docker.io=https://registry-1.docker.io"),
		"bad port":       target("127.0.0.1:99999", "docker.io=https://registry-1.docker.io"),
		"bad host":       target("a b:5000", "docker.io=https://registry-1.docker.io"),
		"no upstreams":   target("127.0.0.1:5000"),
		"upper host":     target("127.0.0.1:5000", "Docker.io=https://registry-1.docker.io"),
		"slash host":     target("127.0.0.1:5000", "docker.io/library=https://registry-1.docker.io"),
		"ftp upstream":   target("127.0.0.1:5000", "docker.io=ftp://registry-1.docker.io"),
		"no host in url": target("127.0.0.1:5000", "docker.io=https://"),
		"zero timeout":   {Listen: "127.0.0.1:5000", Upstreams: good.Upstreams},
	} {
		if err := tg.Validate(); err == nil || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: Validate() = %v, want a one-line error", name, err)
		}
	}
	for listen, want := range map[string]string{
		"0.0.0.0:5000": "http://127.0.0.1:5000", ":5000": "http://127.0.0.1:5000",
		"[::]:5000": "http://[::1]:5000", "10.1.2.3:80": "http://10.1.2.3:80",
	} {
		if got := target(listen).MirrorURL(); got != want {
			t.Errorf("listen %s: mirror %s, want %s", listen, got, want)
		}
	}
}

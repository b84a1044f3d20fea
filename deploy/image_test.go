package deploy

import (
	"archive/tar"
	"context"
	"encoding/json"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
	"github.com/berth-dev/berth/test/e2e"
)

// TestImage builds the Dockerfile with a real Docker engine and runs the
// image: it must serve the registry API, answer its own HEALTHCHECK, and
// serve a pull from an upstream registry. The same engine first proves that
// dockerd accepts the daemon.json `berth configure docker` writes.
//
// Public base images cannot be pulled here, so the builder image is made
// from this machine's Go toolchain with `docker import`, and the build's
// module downloads are served from this machine's module cache over
// loopback (the build runs with --network host).
func TestImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a container image; skipped with -short")
	}
	testsupport.RequireRoot(t)
	testsupport.RequireTool(t, "dockerd")
	testsupport.RequireTool(t, "docker")
	root, err := testsupport.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	berthAddr := testsupport.FreeAddr(t)

	dir := testsupport.ShortTempDir(t, "img")
	daemonJSON := filepath.Join(dir, "daemon.json")
	if err := os.WriteFile(daemonJSON, []byte(`{"debug": true, "max-concurrent-downloads": 2}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := run(t, nil, "configure", "docker", "--write", "--file", daemonJSON, "--listen", berthAddr); r.code != 0 {
		t.Fatalf("berth configure docker: exit %d\n%s", r.code, r.stderr)
	}
	docker := e2e.StartDockerd(t, e2e.DockerdOptions{ConfigFile: daemonJSON})

	t.Run("dockerd reads the configured daemon.json", func(t *testing.T) {
		var info struct {
			Debug          bool
			RegistryConfig struct{ Mirrors []string }
		}
		out := docker.Docker(t, time.Minute, "info", "--format", "{{json .}}")
		if err := json.Unmarshal([]byte(out), &info); err != nil {
			t.Fatalf("docker info: %v\n%s", err, out)
		}
		if !slices.Contains(info.RegistryConfig.Mirrors, "http://"+berthAddr+"/") || !info.Debug {
			t.Fatalf("dockerd runs with mirrors %v, debug %v: want berth's mirror and the operator's debug kept", info.RegistryConfig.Mirrors, info.Debug)
		}
	})

	builder := "berth-builder:" + runtime.Version()
	importBuilder(t, docker, builder)
	proxy := moduleProxy(t)
	const image = "berth:image-test"
	out := docker.Docker(t, 20*time.Minute, "build", "--network", "host",
		"--build-arg", "BUILDER_IMAGE="+builder,
		"--build-arg", "GOPROXY="+proxy,
		"--build-arg", "GOSUMDB=off",
		"-t", image, "-f", filepath.Join(root, "Dockerfile"), root)
	t.Logf("docker build:\n%s", tail(out, 15))

	t.Run("image metadata", func(t *testing.T) {
		var cfg []struct {
			Config struct {
				User         string
				Entrypoint   []string
				Cmd          []string
				ExposedPorts map[string]any
				Volumes      map[string]any
				Healthcheck  struct{ Test []string }
			}
			RootFS struct{ Layers []string }
		}
		if err := json.Unmarshal([]byte(docker.Docker(t, time.Minute, "image", "inspect", image)), &cfg); err != nil || len(cfg) != 1 {
			t.Fatalf("image inspect: %v", err)
		}
		c := cfg[0].Config
		if c.User != "65532:65532" || !slices.Equal(c.Entrypoint, []string{"/berth"}) || len(c.Cmd) == 0 || c.Cmd[0] != "serve" {
			t.Errorf("user %q entrypoint %q cmd %q", c.User, c.Entrypoint, c.Cmd)
		}
		if _, ok := c.ExposedPorts["5000/tcp"]; !ok {
			t.Errorf("exposed ports %v", c.ExposedPorts)
		}
		if _, ok := c.Volumes["/var/lib/berth"]; !ok {
			t.Errorf("volumes %v", c.Volumes)
		}
		if !slices.Equal(c.Healthcheck.Test, []string{"CMD", "/berth", "healthcheck"}) {
			t.Errorf("healthcheck %q", c.Healthcheck.Test)
		}
	})

	reg := e2e.StartRegistry(t)
	pushed := e2e.PushImage(t, e2e.Docker, reg.Host, "library/hello", "v1", 64<<10, 2)

	// BERTH_LISTEN with no --listen: the documented way to move the port,
	// which the image's HEALTHCHECK follows.
	name := "berth-image-test"
	docker.Docker(t, time.Minute, "run", "-d", "--name", name, "--network", "host",
		"-e", "BERTH_LISTEN="+berthAddr,
		"-e", "BERTH_UPSTREAM=docker.io="+reg.URL,
		image, "serve", "--data", "/var/lib/berth")
	t.Cleanup(func() {
		if t.Failed() {
			logs, _ := docker.DockerErr(time.Minute, "logs", "--tail", "50", name)
			t.Logf("berth container logs:\n%s", logs)
		}
		docker.DockerErr(time.Minute, "rm", "-f", name)
	})

	t.Run("serves the registry API and health endpoints", func(t *testing.T) {
		waitFor(t, 60*time.Second, "GET /v2/ answering 200", func() bool { return get("http://"+berthAddr+"/v2/") == 200 })
		for _, p := range []string{"/healthz", "/readyz"} {
			if code := get("http://" + berthAddr + p); code != 200 {
				t.Errorf("GET %s: %d", p, code)
			}
		}
		// The binary's own probe, from inside the container.
		docker.Docker(t, time.Minute, "exec", name, "/berth", "healthcheck", "--path", "/healthz")
	})

	t.Run("serves a pull", func(t *testing.T) {
		docker.Docker(t, 5*time.Minute, "pull", berthAddr+"/library/hello:v1")
		id := strings.TrimSpace(docker.Docker(t, time.Minute, "image", "inspect", "--format", "{{.Id}}", berthAddr+"/library/hello:v1"))
		if id != pushed.Config.Digest {
			t.Fatalf("pulled image %s, pushed config %s", id, pushed.Config.Digest)
		}
	})

	t.Run("HEALTHCHECK reports healthy", func(t *testing.T) {
		waitFor(t, 90*time.Second, "health status healthy", func() bool {
			s, _ := docker.DockerErr(time.Minute, "inspect", "--format", "{{.State.Health.Status}}", name)
			return strings.TrimSpace(s) == "healthy"
		})
	})

	t.Run("runs as the unprivileged user with a writable cache volume", func(t *testing.T) {
		var state []struct {
			Config struct{ User string }
			Mounts []struct {
				Type, Destination, Source string
			}
		}
		json.Unmarshal([]byte(docker.Docker(t, time.Minute, "inspect", name)), &state)
		if len(state) != 1 || state[0].Config.User != "65532:65532" {
			t.Fatalf("container state %+v", state)
		}
		var vol string
		for _, m := range state[0].Mounts {
			if m.Destination == "/var/lib/berth" && m.Type == "volume" {
				vol = m.Source
			}
		}
		if vol == "" {
			t.Fatalf("no volume at /var/lib/berth: %+v", state[0].Mounts)
		}
		st, err := os.Stat(vol)
		if err != nil {
			t.Fatal(err)
		}
		if uid := fileUID(st); uid != 65532 {
			t.Errorf("volume owned by uid %d, want 65532", uid)
		}
		n := 0
		filepath.WalkDir(vol, func(p string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				n++
			}
			return nil
		})
		if n == 0 {
			t.Error("berth wrote nothing into its cache volume after a pull")
		}
	})
}

// importBuilder makes a builder image holding this machine's Go toolchain
// and CA certificates: enough for the Dockerfile's exec-form RUN.
func importBuilder(t *testing.T, docker *e2e.Dockerd, tag string) {
	t.Helper()
	goroot := runtime.GOROOT()
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		err := func() error {
			for _, d := range []struct {
				name string
				mode int64
			}{{"etc/", 0o755}, {"etc/ssl/", 0o755}, {"etc/ssl/certs/", 0o755}, {"tmp/", 0o1777}, {"usr/", 0o755}, {"usr/local/", 0o755}} {
				if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d.name, Mode: d.mode}); err != nil {
					return err
				}
			}
			if err := addFile(tw, "/etc/ssl/certs/ca-certificates.crt", "etc/ssl/certs/ca-certificates.crt"); err != nil {
				return err
			}
			return filepath.WalkDir(goroot, func(p string, d fs.DirEntry, err error) error {
				if err != nil {
					return err
				}
				rel, _ := filepath.Rel(goroot, p)
				// Building berth needs the go command, the compiler tools and
				// the standard library's sources; leaving out the toolchain's
				// own sources, tests and docs saves copying a third of it
				// into every build step (vfs copies whole layers).
				if d.IsDir() && (slices.Contains([]string{"test", "api", "doc", "misc", "src/cmd"}, rel) || d.Name() == "testdata") {
					return filepath.SkipDir
				}
				return addFile(tw, p, filepath.ToSlash(filepath.Join("usr/local/go", rel)))
			})
		}()
		if err == nil {
			err = tw.Close()
		}
		pw.CloseWithError(err)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "docker", "import",
		"--change", "ENV PATH=/usr/local/go/bin:/usr/bin:/bin",
		"--change", "ENV HOME=/root",
		"-", tag)
	cmd.Env = append(os.Environ(), docker.Env()...)
	cmd.Stdin = pr
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("docker import: %v\n%s", err, out)
	}
}

func addFile(tw *tar.Writer, path, name string) error {
	st, err := os.Lstat(path)
	if err != nil {
		return err
	}
	link := ""
	if st.Mode()&fs.ModeSymlink != 0 {
		if link, err = os.Readlink(path); err != nil {
			return err
		}
	}
	h, err := tar.FileInfoHeader(st, link)
	if err != nil {
		return err
	}
	h.Name, h.Uid, h.Gid, h.Uname, h.Gname = name, 0, 0, "", ""
	if st.IsDir() {
		h.Name += "/"
	}
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return nil
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(tw, f)
	return err
}

// moduleProxy serves this machine's module download cache, which has the
// layout of the GOPROXY protocol, on loopback. Building berth here first
// makes sure the cache holds every module the image build will ask for.
func moduleProxy(t *testing.T) string {
	t.Helper()
	testsupport.BerthBinary(t)
	out, err := exec.Command("go", "env", "GOMODCACHE").Output()
	if err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(strings.TrimSpace(string(out)), "cache", "download")
	return "http://" + testsupport.ServeLoopback(t, http.FileServer(http.Dir(cache)))
}

func get(url string) int {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func waitFor(t *testing.T, timeout time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up after %v waiting for %s", timeout, what)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func fileUID(st fs.FileInfo) int {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return int(s.Uid)
	}
	return -1
}

package deploy

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

func TestMain(m *testing.M) { testsupport.Main(m) }

type result struct {
	code           int
	stdout, stderr string
}

func run(t *testing.T, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, testsupport.BerthBinary(t), args...)
	// A clean environment: the BERTH_* variables of whoever runs the tests
	// must not leak in.
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}, env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return result{code, out.String(), errb.String()}
}

func TestConfigureBadInputExitsTwoWithOneLine(t *testing.T) {
	dir := t.TempDir()
	badTOML := filepath.Join(dir, "certs.d")
	os.MkdirAll(filepath.Join(badTOML, "docker.io"), 0o755)
	os.WriteFile(filepath.Join(badTOML, "docker.io", "hosts.toml"), []byte("[host\n"), 0o644)
	badJSON := filepath.Join(dir, "daemon.json")
	os.WriteFile(badJSON, []byte("{,}"), 0o644)
	badConfig := filepath.Join(dir, "config.yml")
	os.WriteFile(badConfig, []byte("listen: 127.0.0.1:5000\nupstreamz: {}\n"), 0o644)

	cases := []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"no runtime", nil, []string{"configure"}, "name a runtime"},
		{"unknown runtime", nil, []string{"configure", "podman"}, `unknown runtime "podman"`},
		{"two runtimes", nil, []string{"configure", "docker", "crio"}, `unexpected argument "crio"`},
		{"unknown flag", nil, []string{"configure", "docker", "--mirror", "x"}, "flag provided but not defined"},
		{"bad listen", nil, []string{"configure", "containerd", "--listen", "localhost"}, "not HOST:PORT"},
		{"bad port", nil, []string{"configure", "containerd", "--listen", "127.0.0.1:http"}, "port must be a number"},
		{"upstream without =", nil, []string{"configure", "containerd", "--upstream", "docker.io"}, "not HOST=URL"},
		{"upstream bad url", nil, []string{"configure", "containerd", "--upstream", "docker.io=registry-1.docker.io"}, "not an http:// or https:// URL"},
		{"upstream bad host", nil, []string{"configure", "crio", "--upstream", "Docker.IO=https://x"}, "lower case"},
		{"dir for docker", nil, []string{"configure", "docker", "--dir", dir}, "--dir is for containerd"},
		{"file for containerd", nil, []string{"configure", "containerd", "--file", badJSON}, "--file is for docker and crio"},
		{"bad dial timeout", nil, []string{"configure", "containerd", "--dial-timeout", "soon"}, "invalid value"},
		{"negative dial timeout", nil, []string{"configure", "containerd", "--dial-timeout", "-1s"}, "must be positive"},
		{"missing config", nil, []string{"configure", "containerd", "--config", filepath.Join(dir, "nope.yml")}, "nope.yml"},
		{"bad config", nil, []string{"configure", "containerd", "--config", badConfig}, "upstreamz"},
		{"bad env upstream", []string{"BERTH_UPSTREAM=docker.io"}, []string{"configure", "containerd"}, "BERTH_UPSTREAM"},
		{"bad env listen", []string{"BERTH_LISTEN=nowhere"}, []string{"configure", "docker"}, "not HOST:PORT"},
		{"docker without hub", nil, []string{"configure", "docker", "--upstream", "ghcr.io=https://ghcr.io"}, "Docker Hub only"},
		{"broken hosts.toml", nil, []string{"configure", "containerd", "--write", "--dir", badTOML}, "not valid TOML"},
		{"broken daemon.json", nil, []string{"configure", "docker", "--write", "--file", badJSON}, "not valid JSON"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := run(t, c.env, c.args...)
			if r.code != 2 {
				t.Fatalf("exit %d, want 2; stderr %q", r.code, r.stderr)
			}
			if strings.Count(r.stderr, "\n") != 1 || !strings.HasPrefix(r.stderr, "berth configure: ") || !strings.Contains(r.stderr, c.want) {
				t.Fatalf("stderr %q: want one line starting with \"berth configure: \" and containing %q", r.stderr, c.want)
			}
			if r.stdout != "" {
				t.Fatalf("stdout %q, want nothing on error", r.stdout)
			}
		})
	}
	if b, _ := os.ReadFile(badJSON); string(b) != "{,}" {
		t.Fatal("a refused daemon.json was modified")
	}
}

func TestConfigureWritesMergesAndIsIdempotent(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs.d")
	args := []string{"configure", "--write", "containerd", "--dir", dir, "--upstream", "docker.io=http://127.0.0.1:5001", "--upstream", "ghcr.io=https://ghcr.io"}
	r := run(t, nil, args...)
	if r.code != 0 || strings.Count(r.stdout, "wrote ") != 2 {
		t.Fatalf("first run: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	b, err := os.ReadFile(filepath.Join(dir, "docker.io", "hosts.toml"))
	if err != nil || !strings.Contains(string(b), `server = "http://127.0.0.1:5001"`) {
		t.Fatalf("hosts.toml: %v\n%s", err, b)
	}
	r = run(t, nil, args...)
	if r.code != 0 || strings.Count(r.stdout, "unchanged ") != 2 {
		t.Fatalf("second run: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}

	// --write into a path that cannot be a directory is an I/O failure: 1.
	file := filepath.Join(t.TempDir(), "plain")
	os.WriteFile(file, nil, 0o644)
	r = run(t, nil, "configure", "containerd", "--write", "--dir", filepath.Join(file, "certs.d"))
	if r.code != 1 || strings.Count(r.stderr, "\n") != 1 {
		t.Fatalf("unwritable dir: exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestConfigureReadsConfigAndEnvironment(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "config.yml")
	os.WriteFile(cfg, []byte("listen: 127.0.0.1:5055\nupstreams:\n  docker.io:\n    url: https://registry-1.docker.io\n  quay.io:\n    url: https://quay.io\n"), 0o644)
	r := run(t, nil, "configure", "crio", "--config", cfg)
	if r.code != 0 || !strings.Contains(r.stdout, `location = "127.0.0.1:5055/quay.io"`) || !strings.Contains(r.stdout, `location = "127.0.0.1:5055/docker.io"`) {
		t.Fatalf("from --config: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// Environment over the file, flags over the environment.
	r = run(t, []string{"BERTH_LISTEN=127.0.0.1:6000", "BERTH_UPSTREAM=docker.io=https://registry-1.docker.io"}, "configure", "docker", "--config", cfg)
	var daemon struct {
		Mirrors []string `json:"registry-mirrors"`
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &daemon) != nil || len(daemon.Mirrors) != 1 || daemon.Mirrors[0] != "http://127.0.0.1:6000" {
		t.Fatalf("docker from env: exit %d, stdout must be daemon.json alone\n%s%s", r.code, r.stdout, r.stderr)
	}
	r = run(t, []string{"BERTH_LISTEN=127.0.0.1:6000"}, "configure", "containerd", "--listen", "127.0.0.1:7000", "--upstream", "ghcr.io=https://ghcr.io")
	if r.code != 0 || !strings.Contains(r.stdout, `[host."http://127.0.0.1:7000"]`) || !strings.Contains(r.stdout, "ghcr.io/hosts.toml") || strings.Contains(r.stdout, "docker.io") {
		t.Fatalf("flags over env: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if r := run(t, nil, "configure", "--help"); r.code != 0 || !strings.Contains(r.stdout, "--write") && !strings.Contains(r.stdout, "-write") {
		t.Fatalf("--help: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

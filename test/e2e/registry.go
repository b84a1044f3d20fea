package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// Registry is a real distribution registry (`registry serve`) on 127.0.0.1
// with filesystem storage in a temporary directory and no auth: the upstream
// berth pulls through in tests.
type Registry struct {
	*Process
	Host string // 127.0.0.1:PORT, as used in image references
	URL  string // http://127.0.0.1:PORT
	Dir  string // storage root
}

const registryConfig = `version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
  headers:
    X-Content-Type-Options: [nosniff]
`

// StartRegistry starts a registry and waits until GET /v2/ answers 200.
func StartRegistry(t testing.TB) *Registry {
	t.Helper()
	bin := testsupport.RequireTool(t, "registry")
	dir := t.TempDir()
	storage := filepath.Join(dir, "storage")
	p, addr := startOnFreePort(t, 30*time.Second, "answering /v2/", func(addr string) (*Process, func(context.Context) bool) {
		cfg := filepath.Join(dir, "config.yml")
		if err := os.WriteFile(cfg, fmt.Appendf(nil, registryConfig, storage, addr), 0o644); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "serve", cfg)
		// The registry would otherwise export traces to an OTLP collector
		// that is not there and log about it.
		cmd.Env = append(os.Environ(), "OTEL_TRACES_EXPORTER=none")
		p := StartProcess(t, "registry", filepath.Join(dir, "registry.log"), cmd)
		return p, func(ctx context.Context) bool { return httpStatus(ctx, "http://"+addr+"/v2/") == 200 }
	})
	r := &Registry{Process: p, Host: addr, URL: "http://" + addr, Dir: storage}
	return r
}

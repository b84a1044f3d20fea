package deploy

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/config"
)

// The files under deploy/runtimes are what `berth configure` writes on a
// fresh node for the upstreams of the Kubernetes config.yml. They are
// regenerated with BERTH_UPDATE_EXAMPLES=1 and must never drift from the
// command's output.
func TestRuntimeExamplesMatchConfigure(t *testing.T) {
	cfg, err := config.Load(filepath.Join(kubeDir, "base", "config.yml"))
	if err != nil {
		t.Fatal(err)
	}
	tg := Target{Listen: cfg.Listen, Upstreams: map[string]string{}, DialTimeout: DefaultDialTimeout}
	for h, u := range cfg.Upstreams {
		tg.Upstreams[h] = u.URL
	}
	for runtime, dir := range map[string]string{
		"containerd": "runtimes/containerd/certs.d",
		"docker":     "runtimes/docker/daemon.json",
		"crio":       "runtimes/crio/registries.conf.d/berth.conf",
	} {
		files, _, err := Plan(runtime, tg, dir, NoFiles)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if os.Getenv("BERTH_UPDATE_EXAMPLES") == "1" {
				if err := writeAtomic(f.Path, f.Content); err != nil {
					t.Fatal(err)
				}
				continue
			}
			got, err := os.ReadFile(f.Path)
			if err != nil || !bytes.Equal(got, f.Content) {
				t.Errorf("%s differs from `berth configure %s` output (regenerate with BERTH_UPDATE_EXAMPLES=1 go test -run %s ./deploy): %v", f.Path, runtime, t.Name(), err)
			}
		}
		if runtime == "containerd" {
			entries, _ := os.ReadDir(dir)
			if len(entries) != len(files) {
				var names []string
				for _, e := range entries {
					names = append(names, e.Name())
				}
				t.Errorf("%s holds %s; configure writes %d registries", dir, strings.Join(names, ", "), len(files))
			}
		}
	}
}

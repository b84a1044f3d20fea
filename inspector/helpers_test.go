package inspector

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/internal/testsupport"
	"github.com/berth-dev/berth/storage"
)

const testTimeout = 30 * time.Second

// testUpstream is the registry the tests push to and berth mirrors as
// "registry.test".
type testUpstream struct {
	host string // 127.0.0.1:PORT
	url  string
}

// inProcessRegistry is go-containerregistry's registry in this process.
func inProcessRegistry(t testing.TB) *testUpstream {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return &testUpstream{host: strings.TrimPrefix(srv.URL, "http://"), url: srv.URL}
}

// distributionRegistry is the distribution project's registry binary
// (`registry serve`), the reference implementation, on a free port.
func distributionRegistry(t *testing.T) *testUpstream {
	bin := testsupport.RequireTool(t, "registry")
	dir := t.TempDir()
	addr := testsupport.FreeAddr(t)
	cfg := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n", filepath.Join(dir, "storage"), addr)
	if err := os.WriteFile(filepath.Join(dir, "config.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", filepath.Join(dir, "config.yml"))
	cmd.Env = append(os.Environ(), "OTEL_TRACES_EXPORTER=none")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		logf.Close()
	})
	u := &testUpstream{host: addr, url: "http://" + addr}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(u.url + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return u
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "registry.log"))
			t.Fatalf("registry did not answer /v2/: %v\n%s", err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// eachRegistry runs fn against both registries.
func eachRegistry(t *testing.T, fn func(t *testing.T, up *testUpstream)) {
	t.Run("ggcr", func(t *testing.T) { fn(t, inProcessRegistry(t)) })
	t.Run("distribution", func(t *testing.T) { fn(t, distributionRegistry(t)) })
}

func (u *testUpstream) ref(t testing.TB, s string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(u.host+"/"+s, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (u *testUpstream) push(t testing.TB, ref string, img v1.Image) digest.Digest {
	t.Helper()
	if err := remote.Write(u.ref(t, ref), img); err != nil {
		t.Fatal(err)
	}
	d, _ := img.Digest()
	return digest.Digest(d.String())
}

func (u *testUpstream) pushIndex(t *testing.T, ref string, idx v1.ImageIndex) digest.Digest {
	t.Helper()
	if err := remote.WriteIndex(u.ref(t, ref), idx); err != nil {
		t.Fatal(err)
	}
	d, _ := idx.Digest()
	return digest.Digest(d.String())
}

// rawManifest is a manifest pushed as given, for configs no library would write.
type rawManifest struct {
	body []byte
	mt   types.MediaType
}

func (r rawManifest) RawManifest() ([]byte, error)        { return r.body, nil }
func (r rawManifest) MediaType() (types.MediaType, error) { return r.mt, nil }

// pushRaw pushes config bytes as a config blob and a manifest naming it
// with one random layer.
func (u *testUpstream) pushRaw(t *testing.T, ref string, cfg []byte) digest.Digest {
	t.Helper()
	r := u.ref(t, ref)
	layer, _ := random.Layer(1024, types.DockerLayer)
	if err := remote.WriteLayer(r.Context(), layer); err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteLayer(r.Context(), static.NewLayer(cfg, types.DockerConfigJSON)); err != nil {
		t.Fatal(err)
	}
	ld, _ := layer.Digest()
	ls, _ := layer.Size()
	m := map[string]any{
		"schemaVersion": 2, "mediaType": types.DockerManifestSchema2,
		"config": map[string]any{"mediaType": types.DockerConfigJSON, "size": len(cfg), "digest": digest.FromBytes(cfg)},
		"layers": []map[string]any{{"mediaType": types.DockerLayer, "size": ls, "digest": ld.String()}},
	}
	body, _ := json.Marshal(m)
	if err := remote.Put(r, rawManifest{body, types.DockerManifestSchema2}); err != nil {
		t.Fatal(err)
	}
	return digest.FromBytes(body)
}

func (u *testUpstream) delete(t *testing.T, ref string) {
	t.Helper()
	if err := remote.Delete(u.ref(t, ref)); err != nil {
		t.Fatal(err)
	}
}

// imageSpec describes a test image.
type imageSpec struct {
	oci         bool
	layers      []v1.Layer // appended in order, one history entry each
	labels      map[string]string
	annotations map[string]string // on the manifest (OCI only)
	env         []string
	ports       []string
	entrypoint  []string
	cmd         []string
	workdir     string
	user        string
	author      string
	os, arch    string
	variant     string
	created     time.Time
	// history: the created_by lines in order; "" entries are filled by
	// layers; lines starting with "empty:" make empty layers.
	history []string
}

func layer(t testing.TB, n int64, oci bool) v1.Layer {
	t.Helper()
	mt := types.DockerLayer
	if oci {
		mt = types.OCILayer
	}
	l, err := random.Layer(n, mt)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// build makes the image: history lines "empty:X" make empty layers, the
// others go with the layers in order.
func build(t testing.TB, s imageSpec) v1.Image {
	t.Helper()
	img := empty.Image
	if s.oci {
		img = mutate.MediaType(img, types.OCIManifestSchema1)
		img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	}
	var hist []v1.History
	li := 0
	for _, h := range s.history {
		if after, ok := strings.CutPrefix(h, "empty:"); ok {
			hist = append(hist, v1.History{CreatedBy: after, EmptyLayer: true, Created: v1.Time{Time: s.created}})
			continue
		}
		var err error
		img, err = mutate.AppendLayers(img, s.layers[li])
		if err != nil {
			t.Fatal(err)
		}
		li++
		hist = append(hist, v1.History{CreatedBy: h, Created: v1.Time{Time: s.created}})
	}
	for ; li < len(s.layers); li++ {
		var err error
		if img, err = mutate.AppendLayers(img, s.layers[li]); err != nil {
			t.Fatal(err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.History = hist
	cf.OS, cf.Architecture, cf.Variant = s.os, s.arch, s.variant
	if cf.OS == "" {
		cf.OS, cf.Architecture = "linux", "amd64"
	}
	cf.Author = s.author
	cf.Created = v1.Time{Time: s.created}
	cf.Config.Labels = s.labels
	cf.Config.Env = s.env
	cf.Config.Entrypoint, cf.Config.Cmd = s.entrypoint, s.cmd
	cf.Config.WorkingDir, cf.Config.User = s.workdir, s.user
	if len(s.ports) > 0 {
		cf.Config.ExposedPorts = map[string]struct{}{}
		for _, p := range s.ports {
			cf.Config.ExposedPorts[p] = struct{}{}
		}
	}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	if s.annotations != nil {
		img = mutate.Annotations(img, s.annotations).(v1.Image)
	}
	return img
}

// harness is one berth host: an engine over its own disk, mirroring the
// test registry as "registry.test", and an inspector.
type harness struct {
	t     testing.TB
	eng   *engine.Engine
	local *storage.Local
	ins   *Inspector
	reg   *prometheus.Registry
	cfg   *config.Config
	repoN string
}

type harnessOptions struct {
	bucket  storage.Bucket
	config  func(*config.Config)
	options func(*Options)
	noStart bool
}

func newHarness(t testing.TB, up *testUpstream, ho harnessOptions) *harness {
	t.Helper()
	cfg := config.Default()
	cfg.Data = t.TempDir()
	cfg.Upstreams = map[string]config.Upstream{"registry.test": {URL: up.url}}
	cfg.DefaultUpstream = "registry.test"
	cfg.TagTTL = config.Duration(time.Hour)
	if ho.config != nil {
		ho.config(cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	local, err := storage.OpenLocal(cfg.Data, storage.LocalOptions{Budget: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	eng, err := engine.New(engine.Options{Config: cfg, Local: local, Bucket: ho.bucket, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	o := Options{Engine: eng, Local: local, Bucket: ho.bucket, Config: cfg, Metrics: reg, RetryBase: 20 * time.Millisecond}
	if ho.options != nil {
		ho.options(&o)
	}
	ins, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	if !ho.noStart {
		ins.Start()
	}
	t.Cleanup(func() {
		ins.Close()
		eng.Close()
	})
	return &harness{t: t, eng: eng, local: local, ins: ins, reg: reg, cfg: cfg}
}

func (h *harness) repo(name string) engine.Repo {
	h.t.Helper()
	r, err := h.eng.Resolve("registry.test", name)
	if err != nil {
		h.t.Fatal(err)
	}
	return r
}

// pull does what a client's pull does through berth: the manifest by tag
// (and, for an index, this platform's manifest), then the config and layers.
func (h *harness) pull(repoName, ref string) digest.Digest {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	repo := h.repo(repoName)
	m, err := h.eng.Manifest(ctx, repo, ref, nil)
	if err != nil {
		h.t.Fatalf("manifest %s:%s: %v", repoName, ref, err)
	}
	content := m.Content
	if strings.Contains(m.MediaType, "index") || strings.Contains(m.MediaType, "list") {
		im, err := v1.ParseIndexManifest(bytes.NewReader(content))
		if err != nil {
			h.t.Fatal(err)
		}
		child, err := h.eng.Manifest(ctx, repo, im.Manifests[0].Digest.String(), nil)
		if err != nil {
			h.t.Fatal(err)
		}
		content = child.Content
	}
	man, err := v1.ParseManifest(bytes.NewReader(content))
	if err != nil {
		h.t.Fatal(err)
	}
	for _, d := range append([]v1.Descriptor{man.Config}, man.Layers...) {
		b, err := h.eng.Blob(ctx, repo, digest.Digest(d.Digest.String()))
		if err != nil {
			h.t.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, b); err != nil {
			h.t.Fatal(err)
		}
		b.Close()
	}
	return m.Digest
}

// record waits for the inspection record of d.
func (h *harness) record(d digest.Digest) *Record {
	h.t.Helper()
	deadline := time.Now().Add(testTimeout)
	for time.Now().Before(deadline) {
		if r, ok := h.ins.store.get("registry.test", d); ok {
			return r
		}
		time.Sleep(10 * time.Millisecond)
	}
	h.t.Fatalf("no inspection record of %s after %v", d, testTimeout)
	return nil
}

func (h *harness) counter(name string, labels ...string) float64 {
	h.t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		h.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		var sum float64
	metrics:
		for _, m := range mf.GetMetric() {
			for k := 0; k+1 < len(labels); k += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == labels[k] && lp.GetValue() == labels[k+1] {
						found = true
					}
				}
				if !found {
					continue metrics
				}
			}
			if m.Counter != nil {
				sum += m.GetCounter().GetValue()
			} else if m.Gauge != nil {
				sum += m.GetGauge().GetValue()
			}
		}
		return sum
	}
	return 0
}

var _ = testutil.ToFloat64

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

package e2e

// These tests check the harness itself against the upstream registry alone,
// with no berth in between. When one of them fails, the berth tests that use
// the same part cannot be trusted either.

import (
	"context"
	"net/http"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/berth-dev/berth/internal/testsupport"
)

func TestHarnessRegistryPushAndCranePull(t *testing.T) {
	testsupport.RequireTool(t, "crane")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/harness", "v1", 64<<10, 3)
	idx := PushIndex(t, Docker, reg.Host, "library/harness-multi", "v1", 16<<10, 2)

	got := strings.TrimSpace(Run(t, time.Minute, nil, "crane", "digest", "--insecure", reg.Host+"/library/harness:v1"))
	if got != img.Digest {
		t.Errorf("crane digest = %s, pushed %s", got, img.Digest)
	}
	got = strings.TrimSpace(Run(t, time.Minute, nil, "crane", "digest", "--insecure", reg.Host+"/library/harness-multi:v1"))
	if got != idx.Digest {
		t.Errorf("crane digest of index = %s, pushed %s", got, idx.Digest)
	}

	for _, ref := range []string{reg.Host + "/library/harness:v1", reg.Host + "/library/harness@" + img.Digest} {
		dir := filepath.Join(t.TempDir(), "layout")
		Run(t, 2*time.Minute, nil, "crane", "pull", "--insecure", "--format=oci", ref, dir)
		VerifyOCILayout(t, dir, img)
	}
	dir := filepath.Join(t.TempDir(), "layout")
	Run(t, 2*time.Minute, nil, "crane", "pull", "--insecure", "--format=oci", "--platform=linux/"+runtime.GOARCH, reg.Host+"/library/harness-multi:v1", dir)
	VerifyOCILayout(t, dir, idx.ForPlatform("linux", runtime.GOARCH))
}

func TestHarnessProxyCountsAndHangs(t *testing.T) {
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/counted", "v1", 256<<10, 2)
	proxy := StartProxy(t, reg.Host)

	ref, err := name.ParseReference(proxy.Addr+"/library/counted:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pulled, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	layers, err := pulled.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := drain(rc); err != nil {
			t.Fatal(err)
		}
	}
	// Headers and the /v2/ ping add a little; the blobs dominate.
	n := proxy.UpstreamBytes()
	if n < img.Bytes() || n > img.Bytes()+64<<10 {
		t.Errorf("proxy counted %d upstream bytes for an image of %d bytes", n, img.Bytes())
	}
	t.Logf("image %d bytes, upstream sent %d bytes (ratio %.3f)", img.Bytes(), n, float64(n)/float64(img.Bytes()))

	proxy.Reset()
	proxy.Hang()
	client := &http.Client{Timeout: 500 * time.Millisecond}
	start := time.Now()
	if resp, err := client.Get(proxy.URL + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatalf("hung proxy answered %s", resp.Status)
	}
	if time.Since(start) < 400*time.Millisecond {
		t.Errorf("hung proxy failed fast (%v) instead of hanging", time.Since(start))
	}
	if proxy.Connections() == 0 {
		t.Errorf("hung proxy did not accept the connection")
	}
	proxy.Resume()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(proxy.URL + "/v2/")
	if err != nil {
		t.Fatalf("after Resume: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("after Resume: %s", resp.Status)
	}
}

func TestHarnessDockerdPullsFromRegistry(t *testing.T) {
	testsupport.RequireRoot(t)
	testsupport.RequireTool(t, "dockerd")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/dockerpull", "v1", 32<<10, 2)
	d := StartDockerd(t, DockerdOptions{})
	// 127.0.0.0/8 is insecure to docker by default: plain HTTP, no flags.
	d.Docker(t, 2*time.Minute, "pull", reg.Host+"/library/dockerpull:v1")
	id := strings.TrimSpace(d.Docker(t, time.Minute, "image", "inspect", "--format", "{{.Id}}", reg.Host+"/library/dockerpull:v1"))
	if id != img.Config.Digest {
		t.Errorf("docker image id %s, want the config digest %s", id, img.Config.Digest)
	}
}

func TestHarnessCtrPullsFromRegistry(t *testing.T) {
	testsupport.RequireRoot(t)
	testsupport.RequireTool(t, "containerd")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/ctrpull", "v1", 32<<10, 2)
	c := StartContainerd(t)
	hosts := HostsDir(t, reg.Host, reg.URL)
	ref := reg.Host + "/library/ctrpull:v1"
	c.Ctr(t, 2*time.Minute, "images", "pull", "--hosts-dir", hosts, ref)
	out := c.Ctr(t, time.Minute, "images", "ls")
	if !strings.Contains(out, img.Digest) {
		t.Errorf("ctr images ls does not show %s:\n%s", img.Digest, out)
	}
}

func TestHarnessConformanceAgainstRegistry(t *testing.T) {
	testsupport.RequireTool(t, "conformance")
	reg := StartRegistry(t)
	seed := SeedConformance(t, reg.Host, "conformance/repo1")
	seed.Registry = reg.Host
	seed.TagList = true
	RunConformance(t, seed)
}

// Berth.Data must name the directory berth really uses, or tests that look
// at the cache on disk look in an empty directory and pass or fail for the
// wrong reason.
func TestHarnessBerthDataArg(t *testing.T) {
	for _, tc := range []struct {
		args []string
		dir  string
		ok   bool
	}{
		{[]string{"--tag-ttl", "1s"}, "", false},
		{[]string{"--data", "/srv/a", "--tag-ttl", "1s"}, "/srv/a", true},
		{[]string{"--data=/srv/b"}, "/srv/b", true},
		{[]string{"--data", "/srv/a", "--data=/srv/b"}, "/srv/b", true},
		{[]string{"--data=/srv/b", "--data", "/srv/a"}, "/srv/a", true},
	} {
		dir, ok := dataArg(tc.args)
		if dir != tc.dir || ok != tc.ok {
			t.Errorf("dataArg(%q) = %q, %v; want %q, %v", tc.args, dir, ok, tc.dir, tc.ok)
		}
	}
}

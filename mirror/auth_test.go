package mirror

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/storage"
)

// tokenUpstream is a registry behind Docker-style token auth: /v2/ answers
// 401 with a Bearer challenge, /token trades basic credentials for a token.
type tokenUpstream struct {
	*httptest.Server
	user, pass string
	tokens     atomic.Int32
	scopes     []string
}

func newTokenUpstream(t *testing.T, user, pass string) *tokenUpstream {
	t.Helper()
	u := &tokenUpstream{user: user, pass: pass}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	const token = "berth-test-token"
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			gotUser, gotPass, ok := r.BasicAuth()
			if !ok || gotUser != u.user || gotPass != u.pass {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			u.tokens.Add(1)
			u.scopes = append(u.scopes, r.URL.Query().Get("scope"))
			json.NewEncoder(w).Encode(map[string]string{"token": token})
			return
		}
		if r.Header.Get("Authorization") != "Bearer "+token {
			w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="test"`, u.URL))
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(u.Close)
	return u
}

// push writes an image through the auth layer with the test's credentials.
func (u *tokenUpstream) push(t *testing.T, repo string) (string, []string) {
	t.Helper()
	img, err := random.Image(4096, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := name.ParseReference(strings.TrimPrefix(u.URL, "http://")+"/"+repo+":v1", name.Insecure)
	auth := remote.WithAuth(&authn.Basic{Username: u.user, Password: u.pass})
	if err := remote.Write(ref, img, auth); err != nil {
		t.Fatal(err)
	}
	d, _ := img.Digest()
	var blobs []string
	layers, _ := img.Layers()
	for _, l := range layers {
		ld, _ := l.Digest()
		blobs = append(blobs, ld.String())
	}
	return d.String(), blobs
}

func newAuthMirror(t *testing.T, up config.Upstream) (*httptest.Server, *bytes.Buffer) {
	t.Helper()
	cfg := config.Default()
	cfg.Upstreams = map[string]config.Upstream{config.DockerHub: up}
	local, err := storage.OpenLocal(t.TempDir(), storage.LocalOptions{Budget: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	logger := logrus.New()
	logger.SetOutput(&logs)
	logger.SetLevel(logrus.DebugLevel)
	reg := prometheus.NewRegistry()
	eng, err := engine.New(engine.Options{Config: cfg, Local: local, Metrics: reg, Log: logrus.NewEntry(logger)})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(New(eng, reg, logrus.NewEntry(logger)))
	t.Cleanup(func() { hs.Close(); eng.Close() })
	return hs, &logs
}

func get(t *testing.T, url string) (int, []byte) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func TestUpstreamTokenAuthWithConfiguredCredentials(t *testing.T) {
	up := newTokenUpstream(t, "robot", "s3cr3t-pa55")
	digest, blobs := up.push(t, "team/app")
	before := up.tokens.Load()

	hs, logs := newAuthMirror(t, config.Upstream{URL: up.URL, Username: "robot", Password: "s3cr3t-pa55"})
	if code, body := get(t, hs.URL+"/v2/team/app/manifests/v1"); code != 200 {
		t.Fatalf("manifest through token auth: %d %s", code, body)
	}
	for _, b := range blobs {
		if code, _ := get(t, hs.URL+"/v2/team/app/blobs/"+b); code != 200 {
			t.Fatalf("blob %s: %d", b, code)
		}
	}
	if code, _ := get(t, hs.URL+"/v2/team/app/manifests/"+digest); code != 200 {
		t.Fatalf("manifest by digest: %d", code)
	}
	if up.tokens.Load() == before {
		t.Fatal("berth never asked the token endpoint")
	}
	if got := up.scopes[len(up.scopes)-1]; got != "repository:team/app:pull" {
		t.Errorf("token scope %q, want pull on the repository only", got)
	}
	if strings.Contains(logs.String(), "s3cr3t-pa55") {
		t.Fatalf("the upstream password appears in the logs:\n%s", logs.String())
	}
}

func TestUpstreamCredentialsFromDockerConfig(t *testing.T) {
	up := newTokenUpstream(t, "ci", "from-docker-config")
	up.push(t, "team/app")
	dir := t.TempDir()
	auth := base64.StdEncoding.EncodeToString([]byte("ci:from-docker-config"))
	// `docker login` files Docker Hub under its legacy index URL.
	cfg := fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, "https://index.docker.io/v1/", auth)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOCKER_CONFIG", dir)
	hs, _ := newAuthMirror(t, config.Upstream{URL: up.URL})
	if code, body := get(t, hs.URL+"/v2/team/app/manifests/v1"); code != 200 {
		t.Fatalf("credentials for docker.io in the Docker config were not used: %d %s", code, body)
	}
}

func TestUpstreamWrongCredentialsIsDenied(t *testing.T) {
	up := newTokenUpstream(t, "robot", "right")
	up.push(t, "team/app")
	hs, _ := newAuthMirror(t, config.Upstream{URL: up.URL, Username: "robot", Password: "wrong"})
	code, body := get(t, hs.URL+"/v2/team/app/manifests/v1")
	if code != http.StatusForbidden || !bytes.Contains(body, []byte(`"code":"DENIED"`)) {
		t.Fatalf("wrong upstream credentials: %d %s; want 403 DENIED", code, body)
	}
}

package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/berth-dev/berth/internal/testsupport"
)

// curlIn asks url from inside host h's network namespace and returns the
// HTTP status ("000" when nothing answered) and the body.
func curlIn(t *testing.T, h *NetnsHost, url string, header ...string) (string, []byte) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "body")
	args := []string{"-s", "-o", out, "-w", "%{http_code}", "--max-time", "5"}
	for _, hd := range header {
		args = append(args, "-H", hd)
	}
	code, _ := h.Exec(30*time.Second, "curl", append(args, url)...)
	body, _ := os.ReadFile(out)
	return strings.TrimSpace(code), body
}

// Seen from another machine (a network namespace on a bridge), berth has
// one door: the fleet port. The registry listener on loopback cannot be
// reached; the fleet port gives health to anyone, blobs to a credentialed
// peer, and 401 with the registry error JSON to everyone else.
func TestNetnsTwoDoors(t *testing.T) {
	RequireNetns(t)
	testsupport.RequireTool(t, "curl")
	RemoveStaleNetns(t)
	nn := StartNetns(t, 1)
	other := nn.Hosts[0]
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/doors", "1", 256<<10, 1)
	token := newToken(t)
	tokenFile := filepath.Join(t.TempDir(), "tokens")
	writeTokens(t, tokenFile, token)
	_, port, _ := strings.Cut(testsupport.FreeAddr(t), ":")
	fleet := nn.HostIP + ":" + port
	b := StartBerth(t, "--upstream", "docker.io="+reg.URL, "--fleet-listen", fleet, "--fleet-token-file", tokenFile)
	mustPull(t, b, "library/doors", "1", img)
	layer := img.Layers[0].Digest
	_, regPort, _ := strings.Cut(b.Host, ":")

	for _, url := range []string{"http://" + nn.HostIP + ":" + regPort + "/v2/", "http://127.0.0.1:" + regPort + "/v2/"} {
		if code, _ := curlIn(t, other, url); code != "000" {
			t.Errorf("the registry listener answered %s to another machine at %s", code, url)
		}
	}
	if code, _ := curlIn(t, other, "http://"+fleet+"/healthz"); code != "200" {
		t.Errorf("fleet port /healthz without credentials: %s, want 200", code)
	}
	blob := "http://" + fleet + "/v2/library/doors/blobs/" + layer + "?ns=docker.io"
	code, body := curlIn(t, other, blob, "Berth-Peer: 1")
	if code != "401" || !strings.Contains(string(body), "UNAUTHORIZED") || strings.Contains(string(body), token) {
		t.Errorf("a blob without a token: %s %.200s, want 401 UNAUTHORIZED", code, body)
	}
	code, body = curlIn(t, other, blob, "Berth-Peer: 1", "Authorization: Bearer "+newToken(t))
	if code != "401" {
		t.Errorf("a blob with a wrong token: %s, want 401", code)
	}
	code, body = curlIn(t, other, blob, "Berth-Peer: 1", "Authorization: Bearer "+token)
	if code != "200" || sha256Hex(body) != layer {
		t.Errorf("a blob with the token: %s, %d bytes hashing to %s, want 200 and %s", code, len(body), sha256Hex(body), layer)
	}
	if code, _ := curlIn(t, other, "http://"+fleet+"/v2/library/doors/manifests/1", "Authorization: Bearer "+token); code != "403" {
		t.Errorf("a manifest on the fleet port with the token: %s, want 403", code)
	}
	if code, _ := curlIn(t, other, "http://"+fleet+"/status"); code != "401" {
		t.Errorf("/status without credentials: %s, want 401", code)
	}
	if strings.Contains(b.Log(), token) {
		t.Error("the fleet token appears in berth's log")
	}
}

// With htpasswd on the registry listener, docker login and docker pull
// through berth work; a wrong password is refused with the challenge, and
// the password never reaches a log line.
func TestRegistryListenerDockerLogin(t *testing.T) {
	testsupport.RequireRoot(t)
	testsupport.RequireTool(t, "dockerd")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/privdock", "1", 128<<10, 2)
	password := "pw-" + newToken(t)
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	htpasswd := filepath.Join(t.TempDir(), "htpasswd")
	if err := os.WriteFile(htpasswd, []byte("puller:"+string(hash)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b := StartBerth(t, append(UpstreamArgs(reg.Host, reg.URL), "--htpasswd", htpasswd)...)
	d := StartDockerd(t, DockerdOptions{})
	ref := b.Host + "/library/privdock:1"
	if out, err := d.DockerErr(time.Minute, "pull", ref); err == nil {
		t.Fatalf("docker pull without logging in succeeded: %s", out)
	}
	if out, err := d.DockerErr(time.Minute, "login", "-u", "puller", "-p", "wrong-"+password, b.Host); err == nil {
		t.Fatalf("docker login with a wrong password succeeded: %s", out)
	}
	d.Docker(t, time.Minute, "login", "-u", "puller", "-p", password, b.Host)
	d.Docker(t, 3*time.Minute, "pull", ref)
	if id := strings.TrimSpace(d.Docker(t, time.Minute, "image", "inspect", "--format", "{{.Id}}", ref)); id != img.Config.Digest {
		t.Errorf("docker pull %s: image id %s, want %s", ref, id, img.Config.Digest)
	}
	if strings.Contains(b.Log(), password) {
		t.Error("the password appears in berth's log")
	}
}

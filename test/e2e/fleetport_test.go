package e2e

// The two doors (docs/fleet.md): the registry listener on loopback, and a
// fleet port with its own credentials (a bearer token, or mutual TLS) that
// other berths stream blobs from. Every address here is loopback.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/berth-dev/berth/internal/testsupport"
)

// fleetHost is a berth with a fleet port.
type fleetHost struct {
	*Berth
	Fleet     string // 127.0.0.1:PORT of the fleet port
	FleetURL  string // its URL, as advertised to peers
	TokenFile string // "" without tokens
}

// newToken is a fresh fleet token.
func newToken(t *testing.T) string {
	t.Helper()
	b := make([]byte, 20)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// writeTokens replaces a token file, one token a line.
func writeTokens(t *testing.T, path string, tokens ...string) {
	t.Helper()
	body := "# fleet tokens\n"
	for _, tok := range tokens {
		body += tok + "\n"
	}
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

// fleetPortHost starts a berth on the fleet's bucket with a fleet port on a
// free loopback port that it advertises to its peers (scheme "http" or
// "https"), and a token file of its own holding tokens (none: no file).
func (f *fleet) fleetPortHost(t *testing.T, scheme string, tokens []string, extra ...string) *fleetHost {
	t.Helper()
	addr := testsupport.FreeAddr(t)
	h := &fleetHost{Fleet: addr, FleetURL: scheme + "://" + addr}
	args := []string{"--fleet-listen", addr, "--s3-advertise", h.FleetURL, "--tag-ttl", "5m"}
	if tokens != nil {
		h.TokenFile = filepath.Join(t.TempDir(), "fleet-tokens")
		writeTokens(t, h.TokenFile, tokens...)
		args = append(args, "--fleet-token-file", h.TokenFile)
	}
	h.Berth = f.host(t, "", append(args, extra...)...)
	return h
}

// reload sends SIGHUP and waits for berth to log the outcome; it reports
// whether the reload was taken.
func reload(t *testing.T, b *Berth) bool {
	t.Helper()
	done := strings.Count(b.Log(), "configuration reloaded")
	rejected := strings.Count(b.Log(), "configuration reload rejected")
	if err := b.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		log := b.Log()
		switch {
		case strings.Count(log, "configuration reloaded") > done:
			return true
		case strings.Count(log, "configuration reload rejected") > rejected:
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.ShowLog(t, 20)
	t.Fatalf("%s logged no reload outcome within 10s of SIGHUP", b.Host)
	return false
}

// fleetRequest sends one request to a fleet port with an optional bearer
// token and Berth-Peer header, and returns the status, headers and body.
func fleetRequest(t *testing.T, client *http.Client, method, url, token string, peer bool) (int, http.Header, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if peer {
		req.Header.Set("Berth-Peer", "1")
	}
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	return resp.StatusCode, resp.Header, body
}

// checkRegistryError checks a registry error answer: status, error code in
// the JSON body, and a body that is that error and nothing else.
func checkRegistryError(t *testing.T, what string, status int, body []byte, wantStatus int, wantCode string) {
	t.Helper()
	var e struct {
		Errors []struct {
			Code string `json:"code"`
		} `json:"errors"`
	}
	if status != wantStatus {
		t.Errorf("%s: status %d, want %d (%.200s)", what, status, wantStatus, body)
		return
	}
	if err := json.Unmarshal(body, &e); err != nil || len(e.Errors) != 1 || e.Errors[0].Code != wantCode {
		t.Errorf("%s: body %.300q is not the registry error %s (%v)", what, body, wantCode, err)
	}
}

// pullHolderFirst pulls repo:tag through holder and, once the upstream sees
// the holder's GET of the layer (so the holder has the blob's lease and is
// downloading), through each waiter at once. Every pull must succeed.
func pullHolderFirst(t *testing.T, f *fleet, img *PushedImage, repo, tag string, holder *Berth, waiters ...*Berth) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	errs := make(chan error, 1+len(waiters))
	go func() { errs <- pullImage(ctx, holder.Host, repo, tag, img) }()
	layer := img.Layers[0].Digest
	deadline := time.Now().Add(20 * time.Second)
	for len(f.up.blobGETs(layer)) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the holder %s did not start fetching layer %s", holder.Host, layer)
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // the holder's first bytes are on its disk
	for _, w := range waiters {
		go func() { errs <- pullImage(ctx, w.Host, repo, tag, img) }()
	}
	for range 1 + len(waiters) {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// noSecretInLogs fails the test if any host's log shows one of secrets.
func noSecretInLogs(t *testing.T, hosts []*Berth, secrets ...string) {
	t.Helper()
	for _, h := range hosts {
		log := h.Log()
		for _, s := range secrets {
			if strings.Contains(log, s) {
				t.Errorf("%s: its log shows a credential", h.Host)
			}
		}
	}
}

// TestFleetPortPeerStreamingWithToken: three hosts with fleet ports and one
// token. The two waiting on the holder's lease stream the layer from its
// fleet port, presenting the token: one upstream GET per blob, and the
// bytes counted as source="peer" on the waiting hosts.
func TestFleetPortPeerStreamingWithToken(t *testing.T) {
	f := startFleet(t)
	img := PushImage(t, Docker, f.reg.Host, "library/fleetport", "1", 4<<20, 1)
	token := newToken(t)
	var hosts []*Berth
	for range 3 {
		hosts = append(hosts, f.fleetPortHost(t, "http", []string{token}).Berth)
	}
	f.up.rate.Store(2 << 20) // the 4 MiB layer takes about 2s to come down
	pullHolderFirst(t, f, img, "library/fleetport", "1", hosts[0], hosts[1:]...)
	f.up.checkBlobGETs(t, "pulls over the fleet port", img.Blobs(), 1)
	layer := img.Layers[0].Size
	for _, h := range hosts[1:] {
		hostBlobs(t, h, img.Blobs())
		if got := servedFrom(t, h, "peer", layer); got < layer {
			t.Errorf("waiting host %s served %d bytes from a peer, want at least the %d-byte layer", h.Host, got, layer)
		}
	}
	noSecretInLogs(t, hosts, token)
}

// TestFleetPortWrongTokenFallsBackToTheBucket: of two hosts waiting on the
// holder, the one whose token file holds a token the holder does not know is
// refused (401) and completes its pulls from the bucket once the holder has
// uploaded, without failing its clients; the other streams from the holder.
func TestFleetPortWrongTokenFallsBackToTheBucket(t *testing.T) {
	f := startFleet(t)
	img := PushImage(t, Docker, f.reg.Host, "library/wrongtoken", "1", 4<<20, 1)
	good, wrong := newToken(t), newToken(t)
	holder := f.fleetPortHost(t, "http", []string{good})
	peer := f.fleetPortHost(t, "http", []string{good})
	outsider := f.fleetPortHost(t, "http", []string{wrong})
	f.up.rate.Store(2 << 20)

	// Two clients on the outsider: neither may fail.
	pullHolderFirst(t, f, img, "library/wrongtoken", "1", holder.Berth, peer.Berth, outsider.Berth, outsider.Berth)
	f.up.checkBlobGETs(t, "pulls with one host refused", img.Blobs(), 1)
	layer := img.Layers[0].Size
	if got := servedFrom(t, peer.Berth, "peer", layer); got < layer {
		t.Errorf("the host with the right token served %d bytes from a peer, want at least %d", got, layer)
	}
	if got := metric(t, outsider.Berth, "berth_bytes_served_total", "source", "peer"); got != 0 {
		t.Errorf("the refused host served %.0f bytes from a peer, want 0", got)
	}
	if got := servedFrom(t, outsider.Berth, "s3", layer); got < layer {
		t.Errorf("the refused host served %d bytes from the bucket, want at least the %d-byte layer", got, layer)
	}
	hostBlobs(t, outsider.Berth, img.Blobs())
	if n := strings.Count(outsider.Log(), "peer refused this host's fleet credential"); n != 1 {
		outsider.ShowLog(t, 30)
		t.Errorf("the refused host logged the refusal %d times, want once", n)
	}
	for _, line := range strings.Split(outsider.Log(), "\n") {
		if strings.Contains(line, "peer refused") && !strings.Contains(line, "level=warning") {
			t.Errorf("refusal not logged at warn: %s", line)
		}
	}
	noSecretInLogs(t, []*Berth{holder.Berth, peer.Berth, outsider.Berth}, good, wrong)
}

// TestFleetPortTokenRotation rotates the fleet token in the three steps of
// docs/fleet.md, one host after the other, with SIGHUP. Between any two
// reloads the hosts still stream from each other in both directions. A
// token file emptied by mistake is refused on SIGHUP and the tokens in force
// stay.
func TestFleetPortTokenRotation(t *testing.T) {
	f := startFleet(t)
	oldTok, newTok := newToken(t), newToken(t)
	a := f.fleetPortHost(t, "http", []string{oldTok})
	b := f.fleetPortHost(t, "http", []string{oldTok})
	f.up.rate.Store(2 << 20)

	round := 0
	// stream pushes a new image and has waiter stream its layer from holder.
	stream := func(what string, holder, waiter *fleetHost) {
		t.Helper()
		round++
		repo := fmt.Sprintf("library/rotation%d", round)
		img := PushImage(t, Docker, f.reg.Host, repo, "1", 4<<20, 1)
		before := int64(metric(t, waiter.Berth, "berth_bytes_served_total", "source", "peer"))
		pullHolderFirst(t, f, img, repo, "1", holder.Berth, waiter.Berth)
		f.up.checkBlobGETs(t, what, img.Blobs(), 1)
		if got := servedFrom(t, waiter.Berth, "peer", before+img.Layers[0].Size) - before; got < img.Layers[0].Size {
			t.Errorf("%s: %s served %d bytes from its peer, want the %d-byte layer", what, waiter.Host, got, img.Layers[0].Size)
		}
	}
	step := func(h *fleetHost, tokens ...string) {
		t.Helper()
		writeTokens(t, h.TokenFile, tokens...)
		if !reload(t, h.Berth) {
			h.ShowLog(t, 10)
			t.Fatalf("%s rejected a good token file", h.Host)
		}
	}
	stream("before the rotation", a, b)
	step(a, oldTok, newTok)
	stream("step 1, a accepts both, b only the old", a, b)
	stream("step 1, b holds", b, a)
	step(b, oldTok, newTok)
	step(a, newTok, oldTok)
	stream("step 2, a sends the new token", b, a)
	stream("step 2, b still sends the old token", a, b)
	step(b, newTok, oldTok)
	step(a, newTok)
	stream("step 3, a accepts only the new token", b, a)
	stream("step 3, b accepts both", a, b)
	step(b, newTok)
	stream("after the rotation", a, b)

	for _, h := range []*fleetHost{a, b} {
		if code, _, _ := fleetRequest(t, nil, "GET", "http://"+h.Fleet+"/status", oldTok, false); code != http.StatusUnauthorized {
			t.Errorf("%s: the dropped token got %d on /status, want 401", h.Fleet, code)
		}
		if code, _, _ := fleetRequest(t, nil, "GET", "http://"+h.Fleet+"/status", newTok, false); code != http.StatusOK {
			t.Errorf("%s: the new token got %d on /status, want 200", h.Fleet, code)
		}
	}

	// An emptied token file: the reload is rejected with one line, and the
	// new token still opens the fleet port.
	if err := os.WriteFile(a.TokenFile, []byte("# nothing\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if reload(t, a.Berth) {
		t.Fatalf("%s took an empty token file", a.Host)
	}
	if !a.LogContains("has no tokens") {
		t.Errorf("%s: the rejected reload does not say why", a.Host)
	}
	if code, _, _ := fleetRequest(t, nil, "GET", "http://"+a.Fleet+"/status", newTok, false); code != http.StatusOK {
		t.Errorf("after a rejected reload the token in force got %d on /status, want 200", code)
	}
	stream("after a rejected reload", b, a)
	noSecretInLogs(t, []*Berth{a.Berth, b.Berth}, oldTok, newTok)
}

// TestFleetPortAnswers: what the fleet port answers with and without a
// token. A blob on the host's disk: 401 and the registry error without a
// token, no byte of the blob; the blob to a credentialed peer; health
// without a token; nothing that would make berth contact its upstream.
// /metrics needs the token with --fleet-metrics-auth.
func TestFleetPortAnswers(t *testing.T) {
	testsupport.RequireTool(t, "registry")
	reg := StartRegistry(t)
	up := startFleetUpstream(t, reg.URL)
	img := PushImage(t, Docker, reg.Host, "library/fleetdoor", "1", 256<<10, 1)
	other := PushImage(t, Docker, reg.Host, "library/fleetdoor", "2", 256<<10, 1)
	token := newToken(t)
	tokenFile := filepath.Join(t.TempDir(), "tokens")
	writeTokens(t, tokenFile, token)
	fleetAddr := testsupport.FreeAddr(t)
	b := StartBerth(t, "--upstream", "docker.io="+up.URL, "--fleet-listen", fleetAddr, "--fleet-token-file", tokenFile)
	mustPull(t, b, "library/fleetdoor", "1", img)
	fleetURL := "http://" + fleetAddr
	layer := img.Layers[0].Digest
	blobURL := fleetURL + "/v2/library/fleetdoor/blobs/" + layer + "?ns=docker.io"

	for _, c := range []struct {
		what, token string
		peer        bool
	}{{"no token", "", true}, {"a wrong token", newToken(t), true}, {"no token, not a peer", "", false}} {
		for _, method := range []string{"GET", "HEAD"} {
			code, h, body := fleetRequest(t, nil, method, blobURL, c.token, c.peer)
			if method == "HEAD" {
				if code != http.StatusUnauthorized {
					t.Errorf("HEAD of a cached blob with %s: %d, want 401", c.what, code)
				}
				continue
			}
			checkRegistryError(t, "GET of a cached blob with "+c.what, code, body, http.StatusUnauthorized, "UNAUTHORIZED")
			if got := h.Get("WWW-Authenticate"); got != `Bearer realm="berth-fleet"` {
				t.Errorf("GET with %s: WWW-Authenticate %q", c.what, got)
			}
			if len(body) > 200 || h.Get("Docker-Content-Digest") != "" {
				t.Errorf("GET with %s: %d bytes, Docker-Content-Digest %q: more than the error", c.what, len(body), h.Get("Docker-Content-Digest"))
			}
		}
	}
	// A credentialed peer gets the blob.
	code, h, body := fleetRequest(t, nil, "GET", blobURL, token, true)
	if code != http.StatusOK || sha256Hex(body) != layer {
		t.Errorf("GET of a cached blob by a peer with the token: %d, %d bytes hashing to %s, want 200 and %s", code, len(body), sha256Hex(body), layer)
	}
	if h.Get("Authorization") != "" {
		t.Errorf("the answer echoes the credential")
	}
	// A blob berth does not have: nothing on the fleet port fetches it.
	missing := other.Layers[0].Digest
	missingURL := fleetURL + "/v2/library/fleetdoor/blobs/" + missing + "?ns=docker.io"
	code, _, body = fleetRequest(t, nil, "GET", missingURL, token, true)
	checkRegistryError(t, "a peer's GET of a blob not on this host", code, body, http.StatusNotFound, "BLOB_UNKNOWN")
	if code, _, _ := fleetRequest(t, nil, "HEAD", missingURL, token, true); code != http.StatusNotFound {
		t.Errorf("a peer's HEAD of a blob not on this host: %d, want 404", code)
	}
	code, _, body = fleetRequest(t, nil, "GET", missingURL, token, false)
	checkRegistryError(t, "a GET with the token but no Berth-Peer", code, body, http.StatusForbidden, "DENIED")
	code, _, body = fleetRequest(t, nil, "GET", fleetURL+"/v2/library/fleetdoor/manifests/2", token, true)
	checkRegistryError(t, "a manifest GET on the fleet port", code, body, http.StatusForbidden, "DENIED")
	for _, r := range up.requests() {
		if strings.HasSuffix(r.Path, missing) || strings.HasSuffix(r.Path, "/manifests/2") {
			t.Errorf("the fleet port made berth contact the upstream: %s %s", r.Method, r.Path)
		}
	}

	// Health without a token; /status and unknown paths need one.
	for _, p := range []string{"/healthz", "/livez", "/readyz", "/metrics"} {
		if code, _, _ := fleetRequest(t, nil, "GET", fleetURL+p, "", false); code != http.StatusOK {
			t.Errorf("GET %s without a token: %d, want 200", p, code)
		}
	}
	for _, p := range []string{"/status", "/v2/", "/berth/v1/prewarm"} {
		code, _, body := fleetRequest(t, nil, "GET", fleetURL+p, "", false)
		checkRegistryError(t, "GET "+p+" without a token", code, body, http.StatusUnauthorized, "UNAUTHORIZED")
	}
	if code, _, _ := fleetRequest(t, nil, "GET", fleetURL+"/status", token, false); code != http.StatusOK {
		t.Errorf("GET /status with the token: %d, want 200", code)
	}

	// --fleet-metrics-auth puts /metrics behind the token.
	fleetAddr2 := testsupport.FreeAddr(t)
	b2 := StartBerth(t, "--upstream", "docker.io="+up.URL, "--fleet-listen", fleetAddr2, "--fleet-token-file", tokenFile, "--fleet-metrics-auth")
	code, _, body = fleetRequest(t, nil, "GET", "http://"+fleetAddr2+"/metrics", "", false)
	checkRegistryError(t, "/metrics without a token with --fleet-metrics-auth", code, body, http.StatusUnauthorized, "UNAUTHORIZED")
	if code, _, body := fleetRequest(t, nil, "GET", "http://"+fleetAddr2+"/metrics", token, false); code != http.StatusOK || !strings.Contains(string(body), "berth_") {
		t.Errorf("/metrics with the token and --fleet-metrics-auth: %d", code)
	}
	if code, _, _ := fleetRequest(t, nil, "GET", "http://"+fleetAddr2+"/healthz", "", false); code != http.StatusOK {
		t.Errorf("/healthz with --fleet-metrics-auth: %d, want 200", code)
	}
	noSecretInLogs(t, []*Berth{b, b2}, token)
}

// TestRegistryListenerHTPasswd: with --htpasswd, crane pulls with the right
// user and password, and is refused with a Basic challenge without them or
// with a wrong password; probes stay open; no password in berth's log.
func TestRegistryListenerHTPasswd(t *testing.T) {
	testsupport.RequireTool(t, "registry")
	testsupport.RequireTool(t, "crane")
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/private", "1", 128<<10, 2)
	password := "pw-" + newToken(t)
	wrongPassword := "pw-" + newToken(t)
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	htpasswd := filepath.Join(t.TempDir(), "htpasswd")
	if err := os.WriteFile(htpasswd, []byte("puller:"+string(hash)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b := StartBerth(t, append(UpstreamArgs(reg.Host, reg.URL), "--htpasswd", htpasswd)...)
	ref := b.Host + "/library/private:1"

	// Without credentials: 401 and the Basic challenge, on /v2/ (how
	// docker login asks) and on a pull.
	for _, p := range []string{"/v2/", "/v2/library/private/manifests/1", "/metrics", "/status"} {
		code, h, body := fleetRequest(t, nil, "GET", b.URL+p, "", false)
		checkRegistryError(t, "GET "+p+" without credentials", code, body, http.StatusUnauthorized, "UNAUTHORIZED")
		if got := h.Get("WWW-Authenticate"); got != `Basic realm="berth"` {
			t.Errorf("GET %s: WWW-Authenticate %q, want Basic realm=\"berth\"", p, got)
		}
	}
	for _, p := range []string{"/healthz", "/livez", "/readyz"} {
		if code, _, _ := fleetRequest(t, nil, "GET", b.URL+p, "", false); code != http.StatusOK {
			t.Errorf("GET %s without credentials: %d, want 200", p, code)
		}
	}

	dockerConfig := func(user, pass string) []string {
		dir := t.TempDir()
		if user != "" {
			auths := map[string]any{"auths": map[string]any{b.Host: map[string]string{
				"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + pass)),
			}}}
			raw, _ := json.Marshal(auths)
			if err := os.WriteFile(filepath.Join(dir, "config.json"), raw, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		return []string{"DOCKER_CONFIG=" + dir, "HOME=" + dir}
	}
	pull := func(env []string) (string, error) {
		return RunErr(2*time.Minute, env, "crane", "pull", "--insecure", "--format=oci", ref, filepath.Join(t.TempDir(), "layout"))
	}
	if out, err := pull(dockerConfig("", "")); err == nil || !strings.Contains(out, "UNAUTHORIZED") {
		t.Errorf("crane pull without credentials: %v\n%s", err, out)
	}
	if out, err := pull(dockerConfig("puller", wrongPassword)); err == nil || !strings.Contains(out, "UNAUTHORIZED") {
		t.Errorf("crane pull with a wrong password: %v\n%s", err, out)
	}
	// crane auth login writes the credentials, crane pull uses them.
	env := dockerConfig("", "")
	Run(t, time.Minute, env, "crane", "auth", "login", b.Host, "-u", "puller", "-p", password)
	dir := filepath.Join(t.TempDir(), "layout")
	Run(t, 2*time.Minute, env, "crane", "pull", "--insecure", "--format=oci", ref, dir)
	VerifyOCILayout(t, dir, img)
	if got := strings.TrimSpace(Run(t, time.Minute, env, "crane", "digest", "--insecure", ref)); got != img.Digest {
		t.Errorf("crane digest through berth: %s, want %s", got, img.Digest)
	}

	// SIGHUP re-reads the file: a new password replaces the old one; a file
	// that cannot be parsed is refused and the users in force stay.
	basic := func(pass string) int {
		req, _ := http.NewRequest("GET", b.URL+"/v2/", nil)
		req.SetBasicAuth("puller", pass)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := basic(password); code != http.StatusOK {
		t.Fatalf("GET /v2/ with the password: %d", code)
	}
	newPassword := "pw-" + newToken(t)
	newHash, _ := bcrypt.GenerateFromPassword([]byte(newPassword), bcrypt.MinCost)
	if err := os.WriteFile(htpasswd, []byte("puller:"+string(newHash)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if !reload(t, b) {
		t.Fatal("a good htpasswd file was rejected on SIGHUP")
	}
	if code := basic(newPassword); code != http.StatusOK {
		t.Errorf("after SIGHUP, the new password: %d, want 200", code)
	}
	if code := basic(password); code != http.StatusUnauthorized {
		t.Errorf("after SIGHUP, the old password: %d, want 401", code)
	}
	// A broken edit (a line that is not USER:HASH). distribution keeps the
	// users it had for such a file; a file that parses but holds a hash
	// that is not bcrypt, distribution takes by itself once it changes,
	// whatever SIGHUP says (docs/fleet.md).
	if err := os.WriteFile(htpasswd, []byte("puller\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if reload(t, b) {
		t.Error("an htpasswd file with a line that is not USER:HASH was taken on SIGHUP")
	}
	if !b.LogContains("not USER:HASH") {
		t.Error("the rejected reload does not say what is wrong")
	}
	if code := basic(newPassword); code != http.StatusOK {
		t.Errorf("after a rejected reload, the password in force: %d, want 200", code)
	}
	noSecretInLogs(t, []*Berth{b}, password, wrongPassword, newPassword, string(hash), string(newHash))
}

// TestFleetPortChangeNeedsRestart: a SIGHUP with another fleet_listen in
// the configuration file is rejected, and the fleet port stays where it is.
func TestFleetPortChangeNeedsRestart(t *testing.T) {
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	token := newToken(t)
	writeTokens(t, tokens, token)
	fleetAddr, other := testsupport.FreeAddr(t), testsupport.FreeAddr(t)
	cfgFile := filepath.Join(dir, "config.yml")
	write := func(addr string) {
		yml := fmt.Sprintf("fleet_listen: %s\nfleet:\n  token_file: %s\n", addr, tokens)
		if err := os.WriteFile(cfgFile, []byte(yml), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(fleetAddr)
	b := StartBerth(t, "--config", cfgFile)
	if code, _, _ := fleetRequest(t, nil, "GET", "http://"+fleetAddr+"/status", token, false); code != http.StatusOK {
		t.Fatalf("fleet port /status: %d", code)
	}
	write(other)
	if reload(t, b) {
		t.Fatal("a new fleet_listen was taken without a restart")
	}
	if !b.LogContains("cannot change without a restart") {
		t.Error("the rejected reload does not say a restart is needed")
	}
	if code, _, _ := fleetRequest(t, nil, "GET", "http://"+fleetAddr+"/status", token, false); code != http.StatusOK {
		t.Errorf("after the rejected reload, fleet port /status: %d, want 200", code)
	}
	if _, err := net.DialTimeout("tcp", other, time.Second); err == nil {
		t.Errorf("berth listens on the new fleet_listen %s without a restart", other)
	}
}

// TestServeBadFleetInput: what berth cannot use stops it at start with one
// line naming the problem, and exit status 2.
func TestServeBadFleetInput(t *testing.T) {
	bin := testsupport.BerthBinary(t)
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty-tokens")
	writeTokens(t, empty)
	good := filepath.Join(dir, "tokens")
	writeTokens(t, good, newToken(t))
	ca := newTestCA(t, dir, "ca")
	certA, _ := ca.issue(t, dir, "a")
	_, keyB := ca.issue(t, dir, "b")
	listen := testsupport.FreeAddr(t)
	_, port, _ := net.SplitHostPort(listen)

	for _, c := range []struct {
		what string
		args []string
		want []string
	}{
		{"a missing token file", []string{"--fleet-listen", testsupport.FreeAddr(t), "--fleet-token-file", filepath.Join(dir, "nope")}, []string{"fleet.token_file", "no such file"}},
		{"an empty token file", []string{"--fleet-listen", testsupport.FreeAddr(t), "--fleet-token-file", empty}, []string{"fleet.token_file", "has no tokens"}},
		{"a certificate that does not match its key", []string{"--fleet-listen", testsupport.FreeAddr(t), "--fleet-token-file", good, "--fleet-tls-cert", certA, "--fleet-tls-key", keyB}, []string{"fleet.tls.cert_file", "private key does not match public key"}},
		{"the fleet port on the registry port", []string{"--fleet-listen", listen, "--fleet-token-file", good}, []string{"fleet_listen", "overlaps listen"}},
		{"the fleet port on every address, registry port", []string{"--fleet-listen", "0.0.0.0:" + port, "--fleet-token-file", good}, []string{"fleet_listen", "overlaps listen"}},
		{"a fleet port without credentials", []string{"--fleet-listen", testsupport.FreeAddr(t)}, []string{"fleet_listen", "fleet.token_file"}},
		{"a missing htpasswd file", []string{"--htpasswd", filepath.Join(dir, "nope")}, []string{"auth.htpasswd", "no such file"}},
	} {
		t.Run(c.what, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, append([]string{"serve", "--listen", listen, "--data", filepath.Join(t.TempDir(), "data")}, c.args...)...)
			cmd.Env = berthEnv()
			var stderr strings.Builder
			cmd.Stderr = &stderr
			err := cmd.Run()
			ee, ok := err.(*exec.ExitError)
			if !ok || ee.ExitCode() != 2 {
				t.Fatalf("berth serve with %s: %v, want exit status 2; stderr:\n%s", c.what, err, stderr.String())
			}
			out := strings.TrimSuffix(stderr.String(), "\n")
			if strings.Contains(out, "\n") || !strings.HasPrefix(out, "berth serve: ") {
				t.Errorf("want one line starting berth serve:, got:\n%s", out)
			}
			for _, w := range c.want {
				if !strings.Contains(out, w) {
					t.Errorf("%q does not say %q", out, w)
				}
			}
		})
	}
}

// testCA is a certificate authority made for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	File string // PEM
}

func newTestCA(t *testing.T, dir, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "berth test CA " + name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ca := &testCA{cert: cert, key: key, File: filepath.Join(dir, name+".crt")}
	writePEM(t, ca.File, "CERTIFICATE", der)
	return ca
}

var serial sync.Mutex
var nextSerial int64 = 100

// issue makes a certificate for the fleet (DNS berth-fleet and 127.0.0.1,
// server and client auth) and returns its certificate and key files.
func (ca *testCA) issue(t *testing.T, dir, name string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial.Lock()
	nextSerial++
	sn := nextSerial
	serial.Unlock()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(sn), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		DNSNames: []string{"berth-fleet"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", kder)
	return certFile, keyFile
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// tlsClient is an HTTPS client that trusts ca and presents cert and key
// when given.
func tlsClient(t *testing.T, ca *testCA, certFile, keyFile string) *http.Client {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	conf := &tls.Config{RootCAs: pool, ServerName: "berth-fleet"}
	if certFile != "" {
		c, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		conf.Certificates = []tls.Certificate{c}
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: conf}, Timeout: 20 * time.Second}
}

// TestFleetPortMutualTLS: two hosts whose fleet ports require client
// certificates from the fleet's CA, and no token. A client without a
// certificate, or with one from another CA, cannot connect; the hosts
// stream from each other over HTTPS with their certificates. A renewal that
// wrote a key not matching the certificate is refused on SIGHUP and the
// material in force stays.
func TestFleetPortMutualTLS(t *testing.T) {
	f := startFleet(t)
	dir := t.TempDir()
	ca := newTestCA(t, dir, "fleet-ca")
	cert, key := ca.issue(t, dir, "berth")
	tlsArgs := []string{"--fleet-tls-cert", cert, "--fleet-tls-key", key, "--fleet-client-ca", ca.File, "--fleet-ca", ca.File, "--fleet-tls-server-name", "berth-fleet"}
	a := f.fleetPortHost(t, "https", nil, tlsArgs...)
	b := f.fleetPortHost(t, "https", nil, tlsArgs...)

	other := newTestCA(t, dir, "other-ca")
	otherCert, otherKey := other.issue(t, dir, "intruder")
	clientCert, clientKey := ca.issue(t, dir, "client")
	for _, c := range []struct {
		what   string
		client *http.Client
	}{
		{"no client certificate", tlsClient(t, ca, "", "")},
		{"a certificate from another CA", tlsClient(t, ca, otherCert, otherKey)},
	} {
		for _, p := range []string{"/healthz", "/status"} {
			resp, err := c.client.Get("https://" + a.Fleet + p)
			if err == nil {
				resp.Body.Close()
				t.Errorf("%s: GET %s answered %d, want no connection", c.what, p, resp.StatusCode)
			}
		}
	}
	resp, err := http.Get("http://" + a.Fleet + "/healthz")
	if err == nil {
		if resp.StatusCode == http.StatusOK {
			t.Errorf("plain HTTP to the TLS fleet port answered 200")
		}
		resp.Body.Close()
	}
	good := tlsClient(t, ca, clientCert, clientKey)
	if code, _, _ := fleetRequest(t, good, "GET", "https://"+a.Fleet+"/status", "", false); code != http.StatusOK {
		t.Errorf("GET /status with a client certificate and no token: %d, want 200", code)
	}

	f.up.rate.Store(2 << 20)
	img := PushImage(t, Docker, f.reg.Host, "library/mtls", "1", 4<<20, 1)
	pullHolderFirst(t, f, img, "library/mtls", "1", a.Berth, b.Berth)
	f.up.checkBlobGETs(t, "pulls over mutual TLS", img.Blobs(), 1)
	if got := servedFrom(t, b.Berth, "peer", img.Layers[0].Size); got < img.Layers[0].Size {
		t.Errorf("the waiting host served %d bytes from its peer over mutual TLS, want the %d-byte layer", got, img.Layers[0].Size)
	}

	// A key that does not match the certificate: SIGHUP is refused, the
	// fleet port keeps its certificate.
	_, wrongKey := ca.issue(t, dir, "wrong")
	raw, err := os.ReadFile(wrongKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(key, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	if reload(t, a.Berth) {
		t.Fatalf("%s took a key that does not match its certificate", a.Host)
	}
	if !a.LogContains("private key does not match public key") {
		t.Errorf("the rejected reload does not say why")
	}
	if code, _, _ := fleetRequest(t, tlsClient(t, ca, clientCert, clientKey), "GET", "https://"+a.Fleet+"/status", "", false); code != http.StatusOK {
		t.Errorf("after a rejected reload: GET /status %d, want 200", code)
	}
}

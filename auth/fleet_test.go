package auth

import (
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// registryError is the body of a registry error answer.
type registryError struct {
	Errors []struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"errors"`
}

// checkUnauthorized checks a 401 answer: the challenge, the registry's
// JSON error UNAUTHORIZED, nothing of the handler behind, no credential.
func checkUnauthorized(t *testing.T, what string, resp *http.Response, challenge string, secrets ...string) {
	t.Helper()
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("%s: status %d, want 401", what, resp.StatusCode)
	}
	if got := resp.Header.Get("WWW-Authenticate"); got != challenge {
		t.Errorf("%s: WWW-Authenticate %q, want %q", what, got, challenge)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type %q", what, ct)
	}
	var e registryError
	if err := json.Unmarshal(body, &e); err != nil || len(e.Errors) != 1 || e.Errors[0].Code != "UNAUTHORIZED" {
		t.Errorf("%s: body %q, want the registry error UNAUTHORIZED", what, body)
	}
	if strings.Contains(string(body), "blob bytes") {
		t.Errorf("%s: the handler behind answered", what)
	}
	for _, s := range secrets {
		if s != "" && (strings.Contains(string(body), s) || strings.Contains(strings.Join(resp.Header.Values("WWW-Authenticate"), " "), s)) {
			t.Errorf("%s: the answer echoes the credential", what)
		}
	}
}

func get(t *testing.T, c *http.Client, url, authz string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func TestRequireFleetCredentialToken(t *testing.T) {
	toks, err := LoadTokens(writeFile(t, t.TempDir(), "tokens", tokA+"\n"+tokB+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	h := &ok{}
	srv := httptest.NewServer(RequireFleetCredential(toks, h))
	defer srv.Close()
	url := srv.URL + "/v2/library/alpine/blobs/sha256:0123"

	for _, authz := range []string{"Bearer " + tokA, "Bearer " + tokB, "bearer " + tokA, "Bearer  " + tokB + " "} {
		resp := get(t, srv.Client(), url, authz)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(body) != "blob bytes" {
			t.Errorf("%.12q: status %d %q", authz, resp.StatusCode, body)
		}
		if saw := h.sawAuth.Load(); saw != "" {
			t.Errorf("the handler behind saw the credential %.12q", saw)
		}
	}
	wrong := "Bearer " + tokC
	for _, authz := range []string{"", wrong, "Bearer", "Bearer ", "Basic " + tokA, tokA, "Bearer " + tokA + "x"} {
		checkUnauthorized(t, "Authorization "+authz[:min(len(authz), 12)], get(t, srv.Client(), url, authz), `Bearer realm="berth-fleet"`, tokA, tokB, tokC)
	}
	// HEAD gets the status and challenge, no body.
	resp, err := srv.Client().Head(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") == "" {
		t.Errorf("HEAD: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
}

func TestPeerTransportSendsTheCurrentToken(t *testing.T) {
	dir := t.TempDir()
	p := writeFile(t, dir, "tokens", tokA+"\n")
	toks, err := LoadTokens(p)
	if err != nil {
		t.Fatal(err)
	}
	// The peer has its own copy of the file, changed at its own pace.
	peerP := writeFile(t, t.TempDir(), "tokens", tokA+"\n")
	peerToks, err := LoadTokens(peerP)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(RequireFleetCredential(peerToks, &ok{}))
	defer srv.Close()
	pt, err := NewPeerTransport(PeerOptions{Tokens: toks})
	if err != nil {
		t.Fatal(err)
	}
	defer pt.CloseIdleConnections()
	c := &http.Client{Transport: pt}

	status := func() int {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, srv.URL+"/v2/x/blobs/sha256:1", nil)
		req.Header.Set("Berth-Peer", "1")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if req.Header.Get("Authorization") != "" {
			t.Error("PeerTransport changed the caller's request")
		}
		return resp.StatusCode
	}
	reload := func(toks *Tokens, path, body string) {
		t.Helper()
		writeFile(t, strings.TrimSuffix(path, "/tokens"), "tokens", body)
		if err := prepareAndApply(toks); err != nil {
			t.Fatal(err)
		}
	}
	if s := status(); s != 200 {
		t.Fatalf("same token: %d", s)
	}
	// A rotation: each step on this host and then on its peer, or the other
	// way round; every request in between succeeds.
	reload(toks, p, tokA+"\n"+tokB+"\n")
	reload(peerToks, peerP, tokA+"\n"+tokB+"\n")
	if s := status(); s != 200 {
		t.Fatalf("step 1: %d", s)
	}
	reload(peerToks, peerP, tokB+"\n"+tokA+"\n")
	if s := status(); s != 200 {
		t.Fatalf("step 2 on the peer only: %d", s)
	}
	reload(toks, p, tokB+"\n"+tokA+"\n")
	if s := status(); s != 200 {
		t.Fatalf("step 2: %d", s)
	}
	reload(peerToks, peerP, tokB+"\n")
	if s := status(); s != 200 {
		t.Fatalf("step 3 on the peer: %d", s)
	}
	// A host whose token the peer does not know is refused.
	reload(toks, p, tokC+"\n")
	if s := status(); s != 401 {
		t.Fatalf("unknown token: %d, want 401", s)
	}
	// Without tokens nothing is sent.
	bare, err := NewPeerTransport(PeerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Transport: bare}).Get(srv.URL + "/v2/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Fatalf("no token: %d, want 401", resp.StatusCode)
	}
}

// mtlsFixture is a CA, the fleet port's files issued by it, and a ServerTLS
// over them with the CA as client CA.
type mtlsFixture struct {
	dir                       string
	ca                        *testCA
	srvLeaf                   leaf
	certFile, keyFile, caFile string // the fleet port's files; caFile is its client CA
	rootFile                  string // the same CA, as the peers' ca_file
	clientCert, clientKey     string // a peer's certificate from the same CA
	strangerCert, strangerKey string // a certificate from another CA
	st                        *ServerTLS
}

func newMTLS(t *testing.T, clientCA bool) *mtlsFixture {
	t.Helper()
	f := &mtlsFixture{dir: t.TempDir(), ca: newCA(t, "berth fleet CA")}
	f.srvLeaf = f.ca.issue(t, "node-1")
	f.certFile = writeFile(t, f.dir, "tls.crt", f.srvLeaf.certPEM)
	f.keyFile = writeFile(t, f.dir, "tls.key", f.srvLeaf.keyPEM)
	f.caFile = writeFile(t, f.dir, "ca.crt", f.ca.pem)
	f.rootFile = writeFile(t, f.dir, "root.crt", f.ca.pem)
	peer := f.ca.issue(t, "node-2")
	f.clientCert = writeFile(t, f.dir, "peer.crt", peer.certPEM)
	f.clientKey = writeFile(t, f.dir, "peer.key", peer.keyPEM)
	stranger := newCA(t, "someone else").issue(t, "intruder")
	f.strangerCert = writeFile(t, f.dir, "stranger.crt", stranger.certPEM)
	f.strangerKey = writeFile(t, f.dir, "stranger.key", stranger.keyPEM)
	caFile := ""
	if clientCA {
		caFile = f.caFile
	}
	st, err := NewServerTLS(f.certFile, f.keyFile, caFile)
	if err != nil {
		t.Fatal(err)
	}
	f.st = st
	return f
}

func (f *mtlsFixture) clientConf(t *testing.T, certFile, keyFile, serverName string) *tls.Config {
	t.Helper()
	conf, err := ClientTLSConfig(f.rootFile, certFile, keyFile, serverName)
	if err != nil {
		t.Fatal(err)
	}
	return conf
}

func TestMutualTLS(t *testing.T) {
	f := newMTLS(t, true)
	if !f.st.Mutual() {
		t.Fatal("Mutual() is false with a client CA")
	}
	// No token file: client certificates alone.
	url := serveTLS(t, f.st.Config(), RequireFleetCredential(nil, &ok{}))

	// Without a client certificate the handshake fails: no HTTP answer at all.
	if resp, err := client(f.clientConf(t, "", "", "")).Get(url + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatalf("a client without a certificate got %d", resp.StatusCode)
	}
	// Nor does a certificate from another CA get through.
	if resp, err := client(f.clientConf(t, f.strangerCert, f.strangerKey, "")).Get(url + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatalf("a client with another CA's certificate got %d", resp.StatusCode)
	}
	// The same at the TLS level: the handshake itself is refused.
	conn, err := tls.Dial("tcp", strings.TrimPrefix(url, "https://"), f.clientConf(t, "", "", ""))
	if err == nil {
		_, err = conn.Read(make([]byte, 1)) // TLS 1.3: the server's refusal arrives after the client's Finished
		conn.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("handshake without a client certificate: %v, want a certificate error", err)
	}

	// A peer with a certificate from the fleet's CA needs no token.
	for _, name := range []string{"", "berth-fleet"} {
		resp, err := client(f.clientConf(t, f.clientCert, f.clientKey, name)).Get(url + "/v2/")
		if err != nil {
			t.Fatalf("server name %q: %v", name, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("server name %q: %d", name, resp.StatusCode)
		}
	}
	// The peer checks the fleet port's certificate too.
	conf, err := ClientTLSConfig("", f.clientCert, f.clientKey, "")
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := client(conf).Get(url + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatal("a fleet port's certificate verified against the system CAs")
	}
	if resp, err := client(f.clientConf(t, f.clientCert, f.clientKey, "other-name")).Get(url + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatal("a certificate for berth-fleet accepted as other-name")
	}
}

// Over TLS without a client CA the token is what counts, and a client
// certificate proves nothing.
func TestTLSWithTokens(t *testing.T) {
	f := newMTLS(t, false)
	if f.st.Mutual() {
		t.Fatal("Mutual() without a client CA")
	}
	toks, err := LoadTokens(writeFile(t, f.dir, "tokens", tokA+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	url := serveTLS(t, f.st.Config(), RequireFleetCredential(toks, &ok{}))
	c := client(f.clientConf(t, f.clientCert, f.clientKey, ""))
	checkUnauthorized(t, "certificate without a client CA", get(t, c, url+"/v2/", ""), `Bearer realm="berth-fleet"`)
	resp := get(t, c, url+"/v2/", "Bearer "+tokA)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("token over TLS: %d", resp.StatusCode)
	}
}

func servedSerial(t *testing.T, url string, conf *tls.Config) int64 {
	t.Helper()
	resp, err := client(conf).Get(url + "/v2/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.TLS.PeerCertificates[0].SerialNumber.Int64()
}

func TestServerTLSReload(t *testing.T) {
	f := newMTLS(t, true)
	url := serveTLS(t, f.st.Config(), RequireFleetCredential(nil, &ok{}))
	peerConf := f.clientConf(t, f.clientCert, f.clientKey, "berth-fleet")
	if s := servedSerial(t, url, peerConf); s != f.srvLeaf.serial {
		t.Fatalf("serves certificate %d, want %d", s, f.srvLeaf.serial)
	}

	// A renewed certificate written before its key: the reload fails and the
	// old pair stays in use.
	renewed := f.ca.issue(t, "node-1")
	writeFile(t, f.dir, "tls.crt", renewed.certPEM)
	err := prepareAndApply(f.st)
	if err == nil || !strings.Contains(err.Error(), "does not match") || strings.Contains(err.Error(), "PRIVATE KEY") {
		t.Fatalf("mismatched reload: %v", err)
	}
	if s := servedSerial(t, url, peerConf); s != f.srvLeaf.serial {
		t.Fatalf("after a failed reload serves %d, want the old %d", s, f.srvLeaf.serial)
	}
	// A missing key, an empty client CA: the same.
	writeFile(t, f.dir, "tls.key", renewed.keyPEM)
	writeFile(t, f.dir, "ca.crt", "not a certificate\n")
	if err := prepareAndApply(f.st); err == nil || !strings.Contains(err.Error(), "no PEM certificates") {
		t.Fatalf("empty client CA: %v", err)
	}
	if s := servedSerial(t, url, peerConf); s != f.srvLeaf.serial {
		t.Fatalf("after a failed reload serves %d", s)
	}

	// Both files renewed, and a new CA for clients: new connections get
	// the new certificate, and the old CA's clients are refused.
	ca2 := newCA(t, "next CA")
	writeFile(t, f.dir, "ca.crt", ca2.pem)
	if err := prepareAndApply(f.st); err != nil {
		t.Fatal(err)
	}
	if resp, err := client(peerConf).Get(url + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatal("a client of the replaced CA still gets in")
	}
	next := ca2.issue(t, "node-2")
	cert := writeFile(t, f.dir, "peer2.crt", next.certPEM)
	key := writeFile(t, f.dir, "peer2.key", next.keyPEM)
	if s := servedSerial(t, url, f.clientConf(t, cert, key, "berth-fleet")); s != renewed.serial {
		t.Fatalf("after reload serves %d, want %d", s, renewed.serial)
	}
}

// fleetPort is a fleet port over mutual TLS with a token file, and a
// PeerTransport calling it with both, over new connections every time.
type fleetPort struct {
	*mtlsFixture
	toks *Tokens
	url  string
	base *http.Transport // the PeerTransport's
	pt   *PeerTransport
}

func newFleetPort(t *testing.T) *fleetPort {
	t.Helper()
	fp := &fleetPort{mtlsFixture: newMTLS(t, true), base: &http.Transport{DisableKeepAlives: true}}
	var err error
	if fp.toks, err = LoadTokens(writeFile(t, fp.dir, "tokens", tokA+"\n")); err != nil {
		t.Fatal(err)
	}
	fp.url = serveTLS(t, fp.st.Config(), RequireFleetCredential(fp.toks, &ok{}))
	fp.pt, err = NewPeerTransport(PeerOptions{Base: fp.base, Tokens: fp.toks, CAFile: fp.rootFile, CertFile: fp.clientCert, KeyFile: fp.clientKey, ServerName: "berth-fleet"})
	if err != nil {
		t.Fatal(err)
	}
	return fp
}

// peerGet is a GET of /v2/ through the PeerTransport.
func (fp *fleetPort) peerGet() error {
	resp, err := (&http.Client{Transport: fp.pt}).Get(fp.url + "/v2/")
	if err == nil {
		resp.Body.Close()
	}
	return err
}

func TestPeerTransportTLS(t *testing.T) {
	fp := newFleetPort(t)
	f, url, base, pt := fp.mtlsFixture, fp.url, fp.base, fp.pt
	if base.TLSClientConfig != nil && len(base.TLSClientConfig.Certificates) > 0 {
		t.Fatal("NewPeerTransport put its certificate on its base transport")
	}
	c := &http.Client{Transport: pt}
	resp, err := c.Get(url + "/v2/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.ProtoMajor != 1 {
		t.Fatalf("status %d over %s", resp.StatusCode, resp.Proto)
	}

	// A failed reload (the key went missing) keeps the transport working.
	if err := writeFileErr(f.clientKey); err != nil {
		t.Fatal(err)
	}
	if err := prepareAndApply(pt); err == nil {
		t.Fatal("a reload with a missing key succeeded")
	}
	resp, err = c.Get(url + "/v2/")
	if err != nil {
		t.Fatalf("after a failed reload: %v", err)
	}
	resp.Body.Close()

	if _, err := NewPeerTransport(PeerOptions{CertFile: f.clientCert}); err == nil {
		t.Fatal("a certificate without its key accepted")
	}
	if _, err := NewPeerTransport(PeerOptions{CAFile: f.keyFile}); err == nil || !strings.Contains(err.Error(), "no PEM certificates") {
		t.Fatalf("a key as CA file: %v", err)
	}
}

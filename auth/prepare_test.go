package auth

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// A SIGHUP reloads several credentials together, and gives them all up when
// one of them cannot be used: a successful Prepare must change nothing
// until its apply runs, and a failed one must change nothing at all.
func TestPrepareChangesNothingUntilApplied(t *testing.T) {
	fp := newFleetPort(t)
	f, toks, url := fp.mtlsFixture, fp.toks, fp.url
	peerConf := f.clientConf(t, f.clientCert, f.clientKey, "berth-fleet")

	// New files for all three: another token, a renewed server
	// certificate, and a peer CA the server's certificate does not chain to.
	writeFile(t, f.dir, "tokens", tokB+"\n")
	renewed := f.ca.issue(t, "node-1")
	writeFile(t, f.dir, "tls.crt", renewed.certPEM)
	writeFile(t, f.dir, "tls.key", renewed.keyPEM)
	writeFile(t, f.dir, "root.crt", newCA(t, "another CA").pem)
	var applies []func()
	for name, p := range map[string]preparer{"tokens": toks, "server TLS": f.st, "peer transport": fp.pt} {
		apply, err := p.Prepare()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		applies = append(applies, apply)
	}
	if !toks.Valid(tokA) || toks.Valid(tokB) || toks.Current() != tokA || toks.Len() != 1 {
		t.Error("prepared tokens are in force before apply")
	}
	if s := servedSerial(t, url, peerConf); s != f.srvLeaf.serial {
		t.Errorf("a prepared certificate (serial %d) is served before apply, want %d", s, f.srvLeaf.serial)
	}
	if err := fp.peerGet(); err != nil {
		t.Errorf("a prepared peer CA is used before apply: %v", err)
	}

	for _, apply := range applies {
		apply()
	}
	if toks.Valid(tokA) || !toks.Valid(tokB) || toks.Current() != tokB {
		t.Error("applied tokens are not in force")
	}
	if s := servedSerial(t, url, peerConf); s != renewed.serial {
		t.Errorf("after apply serves certificate %d, want %d", s, renewed.serial)
	}
	if err := fp.peerGet(); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("after apply the peer transport still trusts the old CA: %v", err)
	}
}

func TestPrepareOfABadFileChangesNothing(t *testing.T) {
	fp := newFleetPort(t)
	f, toks, url := fp.mtlsFixture, fp.toks, fp.url
	peerConf := f.clientConf(t, f.clientCert, f.clientKey, "berth-fleet")
	h, err := NewHTPasswd(writeFile(t, f.dir, "htpasswd", htpasswdLine(t, "alice", alicePassword)), "")
	if err != nil {
		t.Fatal(err)
	}

	writeFile(t, f.dir, "tokens", tokB+"\nshort\n")
	writeFile(t, f.dir, "tls.crt", f.ca.issue(t, "node-1").certPEM) // its key is not written
	writeFile(t, f.dir, "root.crt", "not a certificate\n")
	writeFile(t, f.dir, "htpasswd", "alice\n")
	for name, p := range map[string]preparer{"tokens": toks, "server TLS": f.st, "peer transport": fp.pt, "htpasswd": h} {
		if apply, err := p.Prepare(); err == nil || apply != nil {
			t.Errorf("%s: Prepare of a bad file gave (%v, %v), want an error and no apply", name, apply != nil, err)
		}
	}
	if !toks.Valid(tokA) || toks.Valid(tokB) {
		t.Error("a bad token file changed the tokens in force")
	}
	if s := servedSerial(t, url, peerConf); s != f.srvLeaf.serial {
		t.Errorf("a bad certificate changed what is served: %d, want %d", s, f.srvLeaf.serial)
	}
	if err := fp.peerGet(); err != nil {
		t.Fatalf("a bad CA file changed the peer transport: %v", err)
	}
	srv := httptest.NewServer(RequireHTPasswd(h, &ok{}))
	defer srv.Close()
	resp := basicGet(t, srv.URL+"/v2/", "alice", alicePassword)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("a bad htpasswd file changed the users in force: alice got %d", resp.StatusCode)
	}
}

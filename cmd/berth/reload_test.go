package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/berth-dev/berth/internal/testsupport"
)

// sighup sends SIGHUP and waits for berth to log the outcome; it returns
// the log line that says it and whether the reload was taken.
func (b *berthProc) sighup(t *testing.T) (line string, taken bool) {
	t.Helper()
	outcomes := func() []string {
		var out []string
		for _, l := range strings.Split(b.logText(), "\n") {
			if strings.Contains(l, "configuration reloaded") || strings.Contains(l, "configuration reload rejected") {
				out = append(out, l)
			}
		}
		return out
	}
	before := len(outcomes())
	if err := b.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if o := outcomes(); len(o) > before {
			return o[before], strings.Contains(o[before], "configuration reloaded")
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no reload outcome logged within 10s of SIGHUP:\n%s", b.logText())
	return "", false
}

// A SIGHUP is all or nothing: when one part of the reload cannot be used
// (the htpasswd file, an upstream's CA file), nothing of it takes effect,
// not even the parts that were fine (a rotated fleet token, a new webhook);
// once the broken part is fixed, the next SIGHUP takes everything.
func TestSIGHUPIsAllOrNothing(t *testing.T) {
	up := slowUpstream(t, 64<<20)
	dir := t.TempDir()
	write := func(name, body string) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	oldTok, newTok := "old-fleet-token-0123456789abcdef", "new-fleet-token-fedcba9876543210"
	password := "pw-all-or-nothing-5f3e1c"
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	goodHTPasswd := "puller:" + string(hash) + "\n"
	tokens := write("fleet-tokens", oldTok+"\n")
	htpasswd := write("htpasswd", goodHTPasswd)
	noPEM := write("not-a-ca.pem", "not a certificate\n")
	fleetAddr := testsupport.FreeAddr(t)
	base := fmt.Sprintf("fleet_listen: %s\nfleet:\n  token_file: %s\nauth:\n  htpasswd: %s\nupstreams:\n  docker.io:\n    url: %s\n",
		fleetAddr, tokens, htpasswd, up.URL)
	const webhook = "webhooks:\n  - url: http://127.0.0.1:9/hook\n"
	cfg := write("berth.yml", base)
	b := startBerth(t, "--config", cfg)

	fleetStatus := func(token string) int {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, "http://"+fleetAddr+"/status", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	webhooks := func() int {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, "http://"+b.addr+"/berth/v1/webhooks", nil)
		req.SetBasicAuth("puller", password)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body struct{ Webhooks []json.RawMessage }
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /berth/v1/webhooks: %d", resp.StatusCode)
		}
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
			t.Fatal(err)
		}
		return len(body.Webhooks)
	}
	inForce := func(when, token string, hooks int) {
		t.Helper()
		other := map[string]string{oldTok: newTok, newTok: oldTok}[token]
		if got := fleetStatus(token); got != http.StatusOK {
			t.Errorf("%s: the token in force got %d on the fleet port, want 200", when, got)
		}
		if got := fleetStatus(other); got != http.StatusUnauthorized {
			t.Errorf("%s: the token not in force got %d on the fleet port, want 401", when, got)
		}
		if got := webhooks(); got != hooks {
			t.Errorf("%s: %d webhooks listed, want %d", when, got, hooks)
		}
	}
	inForce("at start", oldTok, 0)

	// A new token and a new webhook, with an htpasswd file that is not
	// USER:HASH.
	write("fleet-tokens", newTok+"\n")
	write("htpasswd", "puller\n")
	write("berth.yml", base+webhook)
	line, taken := b.sighup(t)
	if taken || !strings.Contains(line, "auth.htpasswd") || !strings.Contains(line, "not USER:HASH") {
		t.Errorf("a reload with a broken htpasswd file: want it rejected naming auth.htpasswd and why, got\n%s", line)
	}
	inForce("after a reload rejected for the htpasswd file", oldTok, 0)

	// The htpasswd file mended, but a new upstream whose CA file holds no
	// certificate: only building the upstreams finds that, after the
	// credentials and the webhooks have been read.
	write("htpasswd", goodHTPasswd)
	write("berth.yml", base+fmt.Sprintf("  quay.test:\n    url: %s\n    ca_file: %s\n", up.URL, noPEM)+webhook)
	line, taken = b.sighup(t)
	if taken || !strings.Contains(line, "upstream quay.test") || !strings.Contains(line, "no PEM certificates") {
		t.Errorf("a reload with an unusable upstream CA file: want it rejected naming the upstream and why, got\n%s", line)
	}
	inForce("after a reload rejected for an upstream", oldTok, 0)

	// Everything usable: all of it in force at once.
	write("berth.yml", base+webhook)
	line, taken = b.sighup(t)
	if !taken || !strings.Contains(line, "webhooks: 0 -> 1") {
		t.Errorf("the mended reload: want it taken with the webhook named, got\n%s", line)
	}
	inForce("after the mended reload", newTok, 1)

	for _, secret := range []string{oldTok, newTok, password, string(hash)} {
		if strings.Contains(b.logText(), secret) {
			t.Errorf("a credential is in berth's log")
		}
	}
}

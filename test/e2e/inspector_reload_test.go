package e2e

// SIGHUP reloads what the inspector and the node API read from the
// configuration: webhooks, the watch list and the admin tokens take effect
// in a running `berth serve` without a restart (docs/inspector.md,
// docs/prewarm.md).

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// hookLog is a webhook receiver that keeps every payload.
type hookLog struct {
	srv      *httptest.Server
	mu       sync.Mutex
	payloads []map[string]any
}

func newHookLog(t *testing.T) *hookLog {
	h := &hookLog{}
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var p map[string]any
		if err := json.NewDecoder(r.Body).Decode(&p); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		h.mu.Lock()
		h.payloads = append(h.payloads, p)
		h.mu.Unlock()
	}))
	t.Cleanup(h.srv.Close)
	return h
}

func (h *hookLog) got() []map[string]any {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]map[string]any(nil), h.payloads...)
}

func TestSIGHUPReloadsInspectorAndAdminTokens(t *testing.T) {
	reg := StartRegistry(t)
	img := PushImage(t, Docker, reg.Host, "library/watched", "v1", 16<<10, 1)
	before, after := newHookLog(t), newHookLog(t)
	dir := t.TempDir()
	cfgPath, tokPath := filepath.Join(dir, "berth.yml"), filepath.Join(dir, "admin-tokens")
	writeConfig := func(body string) {
		t.Helper()
		if err := os.WriteFile(cfgPath, []byte("admin_token_file: "+tokPath+"\n"+body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	oldTok, newTok1, newTok2 := newToken(t), newToken(t), newToken(t)
	writeTokens(t, tokPath, oldTok)
	writeConfig("webhooks:\n  - url: " + before.srv.URL + "/hook\n")
	b := StartBerth(t, append(UpstreamArgs(reg.Host, reg.URL), "--config", cfgPath)...)

	// A write to the node API with a token: 404 (no such job) once the
	// token is accepted, 401 when it is not.
	write := func(tok string) int {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodDelete, b.URL+"/berth/v1/jobs/no-such-job", nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := write(oldTok); got == http.StatusUnauthorized {
		t.Fatalf("the configured admin token was refused: %d", got)
	}
	if got := write(newTok1); got != http.StatusUnauthorized {
		t.Fatalf("a token not yet in the file was accepted: %d", got)
	}

	// Rotate the admin tokens (two now), swap the webhook, watch a
	// repository: one SIGHUP.
	writeTokens(t, tokPath, newTok1, newTok2)
	writeConfig("webhooks:\n  - url: " + after.srv.URL + "/hook\ninspector:\n  watch:\n    - repository: docker.io/library/watched\n      tags: [\"v*\"]\n      interval: 1s\n")
	if !reload(t, b) {
		b.ShowLog(t, 20)
		t.Fatal("the reload was rejected")
	}
	for tok, want := range map[string]int{oldTok: http.StatusUnauthorized, newTok1: http.StatusNotFound, newTok2: http.StatusNotFound} {
		if got := write(tok); got != want {
			t.Errorf("after the rotation a write answered %d, want %d", got, want)
		}
	}
	// The watch list revalidates the tag, nothing pulls it; the event
	// goes to the new webhook.
	deadline := time.Now().Add(30 * time.Second)
	for len(after.got()) == 0 {
		if time.Now().After(deadline) {
			b.ShowLog(t, 30)
			t.Fatal("the newly watched tag was not delivered to the new webhook within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if p := after.got()[0]; p["event"] != "new" || p["tag"] != "v1" || p["new_digest"] != img.Digest {
		t.Errorf("delivery %v", p)
	}
	if n := len(before.got()); n != 0 {
		t.Errorf("the removed webhook got %d deliveries", n)
	}
	var feed struct{ Images []struct{ Image string } }
	waitJSON(t, b.URL+"/berth/v1/scaler", &feed, func() bool { return len(feed.Images) == 1 })

	// Unwatch: the repository leaves the scaler feed.
	writeConfig("webhooks:\n  - url: " + after.srv.URL + "/hook\n")
	if !reload(t, b) {
		t.Fatal("the second reload was rejected")
	}
	waitJSON(t, b.URL+"/berth/v1/scaler", &feed, func() bool { return len(feed.Images) == 0 })
	if log := b.Log(); !strings.Contains(log, "inspector.watch") || !strings.Contains(log, "admin_tokens") {
		t.Errorf("the reload log does not name what changed:\n%s", log)
	}

	// A different admin_token_file is refused: the file named at start
	// is the one re-read.
	if err := os.WriteFile(cfgPath, []byte("admin_token_file: "+filepath.Join(dir, "other")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	writeTokens(t, filepath.Join(dir, "other"), oldTok)
	if reload(t, b) {
		t.Error("a reload naming another admin_token_file was taken")
	}
	if got := write(newTok1); got != http.StatusNotFound {
		t.Errorf("after a rejected reload the admin token answered %d", got)
	}
	noSecretInLogs(t, []*Berth{b}, oldTok, newTok1, newTok2)
}

package auth

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/crypto/bcrypt"
)

const (
	alicePassword = "correct horse battery staple"
	bobPassword   = "Tr0ub4dor&3-bob"
)

func htpasswdLine(t *testing.T, user, password string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return user + ":" + string(h) + "\n"
}

// captureLogs collects what distribution logs (through logrus's standard
// logger) during the test.
func captureLogs(t *testing.T) *syncBuffer {
	t.Helper()
	buf := &syncBuffer{}
	std := logrus.StandardLogger()
	out, level := std.Out, std.GetLevel()
	std.SetOutput(buf)
	std.SetLevel(logrus.DebugLevel)
	t.Cleanup(func() { std.SetOutput(out); std.SetLevel(level) })
	return buf
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func basicGet(t *testing.T, url, user, password string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if user != "" {
		req.SetBasicAuth(user, password)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func TestHTPasswd(t *testing.T) {
	logs := captureLogs(t)
	p := writeFile(t, t.TempDir(), "htpasswd", "# pull users\n"+htpasswdLine(t, "alice", alicePassword)+"\n")
	h, err := NewHTPasswd(p, "")
	if err != nil {
		t.Fatal(err)
	}
	if h.Realm() != "berth" {
		t.Fatalf("default realm %q", h.Realm())
	}
	next := &ok{}
	srv := httptest.NewServer(RequireHTPasswd(h, next))
	defer srv.Close()

	// docker login: GET /v2/ without credentials, the challenge, then with them.
	resp := basicGet(t, srv.URL+"/v2/", "", "")
	if v := resp.Header.Get("Docker-Distribution-API-Version"); v != "registry/2.0" {
		t.Errorf("Docker-Distribution-API-Version %q", v)
	}
	checkUnauthorized(t, "no credentials", resp, `Basic realm="berth"`)
	resp = basicGet(t, srv.URL+"/v2/", "alice", alicePassword)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "blob bytes" {
		t.Fatalf("right password: %d %q", resp.StatusCode, body)
	}
	if saw := next.sawAuth.Load(); saw != "" {
		t.Error("the handler behind saw the credentials")
	}
	resp = basicGet(t, srv.URL+"/v2/library/alpine/manifests/3.20", "alice", alicePassword)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("pull with the right password: %d", resp.StatusCode)
	}

	checkUnauthorized(t, "wrong password", basicGet(t, srv.URL+"/v2/", "alice", bobPassword), `Basic realm="berth"`, bobPassword)
	checkUnauthorized(t, "unknown user", basicGet(t, srv.URL+"/v2/", "mallory", alicePassword), `Basic realm="berth"`, alicePassword)
	checkUnauthorized(t, "bearer", get(t, srv.Client(), srv.URL+"/v2/", "Bearer "+tokA), `Basic realm="berth"`)

	for _, pw := range []string{alicePassword, bobPassword} {
		if strings.Contains(logs.String(), pw) {
			t.Errorf("a password is in the logs: %s", logs)
		}
	}
}

func TestHTPasswdRealm(t *testing.T) {
	p := writeFile(t, t.TempDir(), "htpasswd", htpasswdLine(t, "alice", alicePassword))
	h, err := NewHTPasswd(p, `build "farm"`)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(RequireHTPasswd(h, &ok{}))
	defer srv.Close()
	checkUnauthorized(t, "realm", basicGet(t, srv.URL+"/v2/", "", ""), `Basic realm="build \"farm\""`)
}

func TestCheckHTPasswd(t *testing.T) {
	captureLogs(t)
	dir := t.TempDir()
	good := htpasswdLine(t, "alice", alicePassword)
	cases := []struct{ name, body, want string }{
		{"empty", "", "has no users"},
		{"comments", "# nobody yet\n\n", "has no users"},
		{"plain password", good + alicePassword + "\n", "line 2: not USER:HASH"},
		{"no user", ":" + strings.TrimPrefix(good, "alice:"), "line 1: not USER:HASH"},
		{"md5", "bob:$apr1$hzyq0Ov1$4ocJ3CWYV0dPWprxZ4uP3.\n", `line 1: the password of user "bob" is not a bcrypt hash`},
		{"plaintext hash", "bob:" + bobPassword + "\n", `line 1: the password of user "bob" is not a bcrypt hash`},
	}
	for _, tc := range cases {
		p := writeFile(t, dir, strings.ReplaceAll(tc.name, " ", "-"), tc.body)
		err := CheckHTPasswd(p)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), p) {
			t.Errorf("%s: got %v, want an error naming %s and containing %q", tc.name, err, p, tc.want)
			continue
		}
		if strings.Contains(err.Error(), alicePassword) || strings.Contains(err.Error(), bobPassword) || strings.Contains(err.Error(), "$2") || strings.Contains(err.Error(), "$apr1") {
			t.Errorf("%s: the error shows a password or hash: %v", tc.name, err)
		}
		if _, err := NewHTPasswd(p, ""); err == nil {
			t.Errorf("%s: NewHTPasswd accepted it", tc.name)
		}
	}
	// htpasswd -B writes $2y$ hashes.
	y := "carol:" + strings.Replace(strings.TrimPrefix(good, "alice:"), "$2a$", "$2y$", 1)
	if err := CheckHTPasswd(writeFile(t, dir, "2y", y)); err != nil {
		t.Errorf("$2y$: %v", err)
	}

	missing := dir + "/missing"
	if _, err := NewHTPasswd(missing, ""); !os.IsNotExist(err) {
		t.Errorf("missing file: %v", err)
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Error("a missing htpasswd file was created (distribution provisions one with a random password)")
	}
}

func TestHTPasswdReload(t *testing.T) {
	logs := captureLogs(t)
	dir := t.TempDir()
	p := writeFile(t, dir, "htpasswd", htpasswdLine(t, "alice", alicePassword))
	h, err := NewHTPasswd(p, "")
	if err != nil {
		t.Fatal(err)
	}
	var reported []error
	var mu sync.Mutex
	h.OnError = func(err error) { mu.Lock(); reported = append(reported, err); mu.Unlock() }
	srv := httptest.NewServer(RequireHTPasswd(h, &ok{}))
	defer srv.Close()
	status := func(user, pw string) int {
		t.Helper()
		resp := basicGet(t, srv.URL+"/v2/", user, pw)
		resp.Body.Close()
		return resp.StatusCode
	}
	touch := func(d time.Duration) {
		t.Helper()
		// A modification time distribution has not seen, whatever the
		// file system's resolution.
		mt := time.Now().Add(d)
		if err := os.Chtimes(p, mt, mt); err != nil {
			t.Fatal(err)
		}
	}

	// A broken edit: SIGHUP reports it, and alice still pulls, both on
	// the first request after the edit and after it.
	writeFile(t, dir, "htpasswd", "alice\n"+htpasswdLine(t, "bob", bobPassword))
	touch(time.Minute)
	if err := prepareAndApply(h); err == nil || !strings.Contains(err.Error(), "line 1: not USER:HASH") {
		t.Fatalf("reload of a broken file: %v", err)
	}
	for i := 0; i < 2; i++ {
		if s := status("alice", alicePassword); s != 200 {
			t.Fatalf("alice after a broken edit, request %d: %d", i+1, s)
		}
	}
	if s := status("bob", bobPassword); s != 401 {
		t.Fatalf("bob from a broken file: %d", s)
	}

	// A good edit: bob in, alice out.
	writeFile(t, dir, "htpasswd", htpasswdLine(t, "bob", bobPassword))
	touch(2 * time.Minute)
	if err := prepareAndApply(h); err != nil {
		t.Fatal(err)
	}
	if s := status("bob", bobPassword); s != 200 {
		t.Fatalf("bob after reload: %d", s)
	}
	if s := status("alice", alicePassword); s != 401 {
		t.Fatalf("alice after reload: %d", s)
	}

	// The file removed: refused, reported without a password; a reload
	// keeps the checker.
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if err := prepareAndApply(h); !os.IsNotExist(err) {
		t.Fatalf("reload of a removed file: %v", err)
	}
	if s := status("bob", bobPassword); s != 401 {
		t.Fatalf("with the file gone: %d", s)
	}
	mu.Lock()
	if len(reported) != 1 || !strings.Contains(reported[0].Error(), p) || strings.Contains(reported[0].Error(), bobPassword) {
		t.Errorf("OnError got %v", reported)
	}
	mu.Unlock()
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Error("the removed file was created again")
	}
	for _, pw := range []string{alicePassword, bobPassword} {
		if strings.Contains(logs.String(), pw) {
			t.Errorf("a password is in the logs: %s", logs)
		}
	}
}

package healthcheck

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

func TestDirWritable(t *testing.T) {
	dir := t.TempDir()
	if err := DirWritable(dir)(context.Background()); err != nil {
		t.Fatalf("writable dir: %v", err)
	}
	left, _ := os.ReadDir(dir)
	if len(left) != 0 {
		t.Fatalf("the check left %d files behind", len(left))
	}

	missing := filepath.Join(dir, "missing")
	err := DirWritable(missing)(context.Background())
	if err == nil || !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Fatalf("missing dir: %v", err)
	}
	if _, err := os.Stat(missing); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("the check created the missing directory")
	}

	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := DirWritable(file)(context.Background()); err == nil {
		t.Fatal("a regular file passed as a writable directory")
	}
}

// TestDirWritableReadOnly makes a directory berth's user cannot write in.
// root ignores permission bits, so as root the check runs with the
// effective uid of nobody for its duration.
func TestDirWritableReadOnly(t *testing.T) {
	dir, err := os.MkdirTemp("", "berth-ro-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		os.Chmod(dir, 0o755)
		os.RemoveAll(dir)
	})
	const nobody = 65534
	asUser := func(f func() error) error { return f() }
	if os.Geteuid() == 0 {
		if err := os.Chown(dir, nobody, nobody); err != nil {
			t.Fatal(err)
		}
		asUser = func(f func() error) error {
			if err := syscall.Setresuid(-1, nobody, -1); err != nil {
				t.Fatalf("dropping to uid %d: %v", nobody, err)
			}
			defer func() {
				if err := syscall.Setresuid(-1, 0, -1); err != nil {
					panic("cannot return to root: " + err.Error())
				}
			}()
			return f()
		}
	}
	check := func() error { return DirWritable(dir)(context.Background()) }

	// Writable by its owner first, so the failure below is the permission's doing.
	if err := asUser(check); err != nil {
		t.Fatalf("owner-writable dir: %v", err)
	}
	if err := os.Chmod(dir, 0o555); err != nil {
		t.Fatal(err)
	}
	err = asUser(check)
	if err == nil || !errors.Is(err, os.ErrPermission) {
		t.Fatalf("read-only dir: %v; want a permission error", err)
	}
	if !strings.Contains(err.Error(), "cannot create a file in "+dir) {
		t.Errorf("error does not name the directory: %v", err)
	}
}

func TestHTTPGet(t *testing.T) {
	for _, tc := range []struct {
		code int
		up   bool
	}{
		{200, true},
		{401, true}, // a registry's /v2/ wanting a token is up
		{404, true},
		{500, false},
		{503, false},
	} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/v2/" || r.Header.Get("User-Agent") != "berth-healthcheck" {
				t.Errorf("request %s %q", r.URL.Path, r.Header.Get("User-Agent"))
			}
			w.WriteHeader(tc.code)
		}))
		err := HTTPGet(srv.Client(), srv.URL+"/v2/")(context.Background())
		srv.Close()
		if (err == nil) != tc.up {
			t.Errorf("answer %d: err = %v; want up=%v", tc.code, err, tc.up)
		}
		if err != nil && !strings.Contains(err.Error(), fmt.Sprintf("answered %d %s", tc.code, http.StatusText(tc.code))) {
			t.Errorf("answer %d: error %q does not say what the server answered", tc.code, err)
		}
	}

	if err := HTTPGet(nil, "http://"+closedAddr(t)+"/v2/")(context.Background()); err == nil {
		t.Error("a closed port is up")
	}

	hang := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-hang:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(hang)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := HTTPGet(srv.Client(), srv.URL)(ctx); err == nil {
		t.Error("a hanging server is up")
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("HTTPGet ignored its context for %s", took)
	}
}

func TestHTTPGetHidesPassword(t *testing.T) {
	err := HTTPGet(nil, "http://user:s3cret@"+closedAddr(t)+"/v2/")(context.Background())
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("err = %v", err)
	}
}

func TestTCPDial(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	if err := TCPDial(":" + port)(context.Background()); err != nil {
		t.Fatalf("dialling a listener through its listen address: %v", err)
	}
	if err := TCPDial(closedAddr(t))(context.Background()); err == nil {
		t.Fatal("a closed port accepts")
	}
}

func TestFunc(t *testing.T) {
	want := errors.New("x")
	if err := Func(func() error { return want })(context.Background()); err != want {
		t.Fatalf("Func = %v", err)
	}
}

// closedAddr is a loopback address where nothing listens.
func closedAddr(t *testing.T) string {
	return testsupport.FreeAddr(t)
}

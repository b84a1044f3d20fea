package auth

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"strings"
	"sync/atomic"

	registryauth "github.com/distribution/distribution/v3/registry/auth"
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd" // registers "htpasswd"
	"golang.org/x/crypto/bcrypt"
)

// DefaultRealm is the realm of the registry listener's Basic challenge.
const DefaultRealm = "berth"

// HTPasswd is pull authentication for the registry listener: the users and
// bcrypt password hashes of an htpasswd file (`htpasswd -B`), checked by
// distribution's own registry/auth/htpasswd.
//
// distribution re-reads the file by itself when its modification time
// changes; Prepare (SIGHUP) checks the file first and reports what is wrong.
// Either way a file that cannot be parsed leaves the users read before in
// force.
type HTPasswd struct {
	path, realm string
	ac          atomic.Pointer[registryauth.AccessController]

	// OnError, if set, is told when the file cannot be read while a request
	// is checked (it was removed, or made unreadable); such requests are
	// refused. The error names the file, never a password or a hash.
	OnError func(error)
}

// NewHTPasswd checks the htpasswd file at path and builds the checker.
// realm is the realm of the Basic challenge ("" is DefaultRealm).
func NewHTPasswd(path, realm string) (*HTPasswd, error) {
	if realm == "" {
		realm = DefaultRealm
	}
	h := &HTPasswd{path: path, realm: realm}
	apply, err := h.Prepare()
	if err != nil {
		return nil, err
	}
	apply()
	return h, nil
}

// Realm is the realm of the Basic challenge.
func (h *HTPasswd) Realm() string { return h.realm }

// Prepare checks the file again, builds a checker over it and returns the
// func that puts that checker in force. On error the error says what is
// wrong; until apply the checker in force stays.
func (h *HTPasswd) Prepare() (apply func(), err error) {
	if err := CheckHTPasswd(h.path); err != nil {
		return nil, err
	}
	// The file exists now: distribution's controller would otherwise create
	// one with a random password, and log it.
	ac, err := registryauth.GetAccessController("htpasswd", map[string]any{"realm": h.realm, "path": h.path})
	if err != nil {
		return nil, fmt.Errorf("%s: %v", h.path, err)
	}
	// distribution reads the file at the first request; have it read the
	// file now, while it is the one just checked, so that the users in force
	// are those of the last good load even if the file breaks before then.
	// No user has an empty name (CheckHTPasswd), so this compares the
	// password with distribution's dummy hash and fails as it should.
	probe, _ := http.NewRequest(http.MethodGet, "/v2/", nil)
	probe.SetBasicAuth("", "")
	var ch registryauth.Challenge
	if _, err := ac.Authorized(probe); err != nil && !errors.As(err, &ch) {
		return nil, h.safeError(err)
	}
	return func() { h.ac.Store(&ac) }, nil
}

// CheckHTPasswd reads an htpasswd file and reports, naming the file and the
// line but no hash or password, a line that is not USER:HASH, a hash that
// is not bcrypt (the only kind distribution accepts: `htpasswd -B`), or a
// file with no users.
func CheckHTPasswd(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	users := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	for line := 1; sc.Scan(); line++ {
		t := strings.TrimSpace(sc.Text())
		if t == "" || t[0] == '#' {
			continue
		}
		user, hash, ok := strings.Cut(t, ":")
		if !ok || user == "" {
			return fmt.Errorf("%s line %d: not USER:HASH", path, line)
		}
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			return fmt.Errorf("%s line %d: the password of user %q is not a bcrypt hash (make it with htpasswd -B)", path, line, user)
		}
		users++
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	if users == 0 {
		return fmt.Errorf("%s has no users", path)
	}
	return nil
}

// RequireHTPasswd lets a request through to next when it carries the Basic
// credentials of a user in h. Anything else gets 401 UNAUTHORIZED with the
// registry error JSON and `WWW-Authenticate: Basic realm="<realm>"`: the
// challenge `docker login` (which probes GET /v2/) and containerd answer
// with the user's credentials. The password is never logged (distribution
// logs a failed user's name at info level, not the password), and the
// Authorization header is removed before next runs.
func RequireHTPasswd(h *HTPasswd, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ac := *h.ac.Load()
		_, err := ac.Authorized(r)
		var ch registryauth.Challenge
		if err != nil && !errors.As(err, &ch) {
			// The file changed and could not be read or parsed. distribution
			// has noted its new modification time and keeps the users it
			// had, so a second look decides with those, unless the file is
			// gone or unreadable.
			_, err = ac.Authorized(r)
			if err != nil && !errors.As(err, &ch) && h.OnError != nil {
				h.OnError(fmt.Errorf("htpasswd: %w; refusing pulls", h.safeError(err)))
			}
		}
		r.Header.Del("Authorization")
		if err != nil {
			unauthorized(w, fmt.Sprintf("Basic realm=%q", h.realm))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// safeError keeps a file system error, which names the file, and replaces
// anything else, which might quote a line of the file.
func (h *HTPasswd) safeError(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe
	}
	return fmt.Errorf("%s cannot be parsed", h.path)
}

package auth

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
)

// MinTokenLength is the shortest token a token file may hold: a fleet token
// is a shared secret sent on every peer request, so it must not be
// guessable (`openssl rand -hex 32` makes a good one).
const MinTokenLength = 16

// Tokens is the set of fleet bearer tokens read from a file: one token a
// line, blank lines and lines starting with # skipped. Every token in the
// file is accepted, so during a rotation the old and the new token are both
// valid and no request is refused; the first one is the token this host
// presents to its peers (Current). Tokens is safe for concurrent use, and
// the func from Prepare swaps the whole set at once.
type Tokens struct {
	path string
	set  atomic.Pointer[tokenSet]
}

type tokenSet struct {
	sums    [][sha256.Size]byte // SHA-256 of each token: compared, never the tokens themselves
	current string
}

// LoadTokens reads the token file at path. An error names the file and,
// for a bad token, its line, never the token.
func LoadTokens(path string) (*Tokens, error) {
	t := &Tokens{path: path}
	apply, err := t.Prepare()
	if err != nil {
		return nil, err
	}
	apply()
	return t, nil
}

// Prepare reads the file again and returns the func that puts its tokens
// in force; until that is called, and whenever the file cannot be used,
// the tokens in force stay, so a reload of several files can be given up
// as a whole. The error says why the file was not taken.
func (t *Tokens) Prepare() (apply func(), err error) {
	s, err := readTokens(t.path)
	if err != nil {
		return nil, err
	}
	return func() { t.set.Store(s) }, nil
}

// Path is the token file's name.
func (t *Tokens) Path() string { return t.path }

// Len is the number of tokens in force.
func (t *Tokens) Len() int {
	if t == nil {
		return 0
	}
	return len(t.set.Load().sums)
}

// Current is the token this host sends to its peers: the first one in the
// file. It is "" for a nil Tokens.
func (t *Tokens) Current() string {
	if t == nil {
		return ""
	}
	return t.set.Load().current
}

// constantTimeCompare is subtle.ConstantTimeCompare; a variable so that a
// test can see it is used for every token.
var constantTimeCompare = subtle.ConstantTimeCompare

// Valid reports whether token is one of the tokens in force. It takes the
// same time whichever token matches, or none: the SHA-256 of token (fixed
// length, so nothing leaks through the length) is compared in constant time
// with every token's, without stopping at a match.
func (t *Tokens) Valid(token string) bool {
	if t == nil || token == "" {
		return false
	}
	sum := sha256.Sum256([]byte(token))
	set := t.set.Load()
	match := 0
	for i := range set.sums {
		match |= constantTimeCompare(sum[:], set.sums[i][:])
	}
	return match == 1
}

// SetAuthorization puts the current token on r as `Authorization: Bearer`.
// It does nothing for a nil Tokens.
func (t *Tokens) SetAuthorization(r *http.Request) {
	if tok := t.Current(); tok != "" {
		r.Header.Set("Authorization", "Bearer "+tok)
	}
}

func readTokens(path string) (*tokenSet, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err // *fs.PathError: "open PATH: no such file or directory"
	}
	s := &tokenSet{}
	for i, line := range strings.Split(string(b), "\n") {
		tok := strings.TrimSpace(line)
		if tok == "" || tok[0] == '#' {
			continue
		}
		for _, c := range tok {
			if c <= ' ' || c > '~' {
				return nil, fmt.Errorf("%s line %d: a token is one word of printable ASCII, one a line", path, i+1)
			}
		}
		if len(tok) < MinTokenLength {
			return nil, fmt.Errorf("%s line %d: token shorter than %d characters", path, i+1, MinTokenLength)
		}
		if s.current == "" {
			s.current = tok
		}
		s.sums = append(s.sums, sha256.Sum256([]byte(tok)))
	}
	if len(s.sums) == 0 {
		return nil, fmt.Errorf("%s has no tokens (one a line; blank lines and # comments are skipped)", path)
	}
	return s, nil
}

package auth

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
)

const (
	tokA = "aaaaaaaaaaaaaaaa-first-token"
	tokB = "bbbbbbbbbbbbbbbb-second-token"
	tokC = "cccccccccccccccc-third-token"
)

func TestTokensFile(t *testing.T) {
	p := writeFile(t, t.TempDir(), "tokens", "# fleet tokens\n\n  "+tokA+"  \r\n# the next one\n"+tokB+"\n\n")
	toks, err := LoadTokens(p)
	if err != nil {
		t.Fatal(err)
	}
	if toks.Len() != 2 || toks.Current() != tokA || toks.Path() != p {
		t.Fatalf("Len %d, Current %q, Path %q", toks.Len(), toks.Current(), toks.Path())
	}
	for _, tok := range []string{tokA, tokB} {
		if !toks.Valid(tok) {
			t.Errorf("%q is in the file but not valid", tok)
		}
	}
	for _, tok := range []string{"", tokC, tokA + "x", tokA[:len(tokA)-1], "# fleet tokens", strings.ToUpper(tokA)} {
		if toks.Valid(tok) {
			t.Errorf("%q is valid", tok)
		}
	}
	var none *Tokens
	if none.Valid(tokA) || none.Current() != "" || none.Len() != 0 {
		t.Error("a nil Tokens accepts or offers a token")
	}
}

func TestTokenFileErrors(t *testing.T) {
	dir := t.TempDir()
	secret := "s3cr3t-value-that-must-not-leak"
	cases := []struct{ name, body, want string }{
		{"empty", "", "has no tokens"},
		{"comments", "# only\n\n   \n#" + secret + "\n", "has no tokens"},
		{"short", tokA + "\nshort-" + "x\n", "line 2: token shorter than 16 characters"},
		{"space", "\n" + secret + " " + secret + "\n", "line 2: a token is one word"},
		{"control", secret + "\x00\n", "line 1: a token is one word"},
		{"non-ascii", secret + "é\n", "line 1: a token is one word"},
	}
	for _, tc := range cases {
		p := writeFile(t, dir, tc.name, tc.body)
		_, err := LoadTokens(p)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), p) {
			t.Errorf("%s: got %v, want an error naming %s and containing %q", tc.name, err, p, tc.want)
			continue
		}
		if strings.Contains(err.Error(), secret) || strings.Contains(err.Error(), "short-x") || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: error shows a token or spans lines: %q", tc.name, err)
		}
	}
	_, err := LoadTokens(dir + "/missing")
	if !os.IsNotExist(err) || !strings.Contains(err.Error(), dir+"/missing") {
		t.Errorf("missing file: %v", err)
	}
}

func TestTokensReloadKeepsOldOnError(t *testing.T) {
	dir := t.TempDir()
	p := writeFile(t, dir, "tokens", tokA+"\n")
	toks, err := LoadTokens(p)
	if err != nil {
		t.Fatal(err)
	}
	for name, change := range map[string]func(){
		"removed": func() { os.Remove(p) },
		"empty":   func() { writeFile(t, dir, "tokens", "# rotated away by mistake\n") },
		"bad":     func() { writeFile(t, dir, "tokens", tokB+"\nshort\n") },
	} {
		change()
		if err := prepareAndApply(toks); err == nil {
			t.Errorf("%s: the reload succeeded", name)
		}
		if !toks.Valid(tokA) || toks.Valid(tokB) || toks.Current() != tokA {
			t.Errorf("%s: a failed reload changed the tokens in force", name)
		}
	}
	writeFile(t, dir, "tokens", tokB+"\n")
	if err := prepareAndApply(toks); err != nil {
		t.Fatal(err)
	}
	if toks.Valid(tokA) || !toks.Valid(tokB) || toks.Current() != tokB {
		t.Error("a good reload did not replace the tokens")
	}
}

// The three steps of a rotation: at every step every host accepts the
// token every other host sends.
func TestTokenRotationHasNoGap(t *testing.T) {
	dir := t.TempDir()
	p := writeFile(t, dir, "tokens", tokA+"\n")
	toks, err := LoadTokens(p)
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		file          string
		sends         string
		valid, refuse []string
	}{
		{tokA + "\n" + tokB + "\n", tokA, []string{tokA, tokB}, nil}, // 1. add the new token
		{tokB + "\n" + tokA + "\n", tokB, []string{tokA, tokB}, nil}, // 2. send the new token
		{tokB + "\n", tokB, []string{tokB}, []string{tokA}},          // 3. drop the old one
	}
	for i, s := range steps {
		writeFile(t, dir, "tokens", s.file)
		if err := prepareAndApply(toks); err != nil {
			t.Fatal(err)
		}
		if toks.Current() != s.sends {
			t.Errorf("step %d: sends %q, want %q", i+1, toks.Current(), s.sends)
		}
		for _, v := range s.valid {
			if !toks.Valid(v) {
				t.Errorf("step %d: %q refused", i+1, v)
			}
		}
		for _, v := range s.refuse {
			if toks.Valid(v) {
				t.Errorf("step %d: %q still accepted", i+1, v)
			}
		}
	}
}

// Valid compares in constant time against every token, not stopping at
// the first match, and compares digests of equal length whatever the
// length of the token presented.
func TestValidComparesEveryTokenInConstantTime(t *testing.T) {
	p := writeFile(t, t.TempDir(), "tokens", tokA+"\n"+tokB+"\n"+tokC+"\n")
	toks, err := LoadTokens(p)
	if err != nil {
		t.Fatal(err)
	}
	var calls, uneven int
	orig := constantTimeCompare
	constantTimeCompare = func(x, y []byte) int {
		calls++
		if len(x) != len(y) {
			uneven++
		}
		return orig(x, y)
	}
	defer func() { constantTimeCompare = orig }()
	for _, c := range []struct {
		tok  string
		want bool
	}{{tokA, true}, {tokC, true}, {"wrong-token-of-some-length", false}, {"x", false}, {strings.Repeat("y", 4096), false}} {
		calls, uneven = 0, 0
		if got := toks.Valid(c.tok); got != c.want {
			t.Errorf("Valid(%.10q) = %v", c.tok, got)
		}
		if calls != 3 || uneven != 0 {
			t.Errorf("Valid(%.10q): %d constant-time compares (%d of unequal length), want 3 of equal length", c.tok, calls, uneven)
		}
	}
}

func TestTokensConcurrentReload(t *testing.T) {
	dir := t.TempDir()
	p := writeFile(t, dir, "tokens", tokA+"\n"+tokB+"\n")
	toks, err := LoadTokens(p)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				// tokA is in every version of the file.
				if !toks.Valid(tokA) {
					t.Error("tokA refused during a reload")
					return
				}
				_ = toks.Current()
			}
		}()
	}
	for i := 0; i < 200; i++ {
		writeFile(t, dir, "tokens.new", fmt.Sprintf("%s\n%s-%04d\n", tokA, tokC, i))
		if err := os.Rename(dir+"/tokens.new", p); err != nil {
			t.Fatal(err)
		}
		if err := prepareAndApply(toks); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
}

package config

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "berth.yml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaultIsValid(t *testing.T) {
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:5000" || c.DefaultUpstream != DockerHub || c.Upstreams[DockerHub].URL != "https://registry-1.docker.io" {
		t.Fatalf("unexpected default: %+v", c)
	}
	if c.TagTTL.D() != 5*time.Minute || c.StaleTimeout.D() != 2*time.Second || c.Cache.Size != 20<<30 {
		t.Fatalf("unexpected default durations/sizes: %+v", c)
	}
	if c.Data == "" {
		t.Fatal("default data dir is empty")
	}
}

func TestLoadOverridesDefault(t *testing.T) {
	p := writeFile(t, `
listen: 0.0.0.0:5001
cache:
  size: 512MiB
upstreams:
  ghcr.io:
    url: https://ghcr.io
    username: bot
    password: secret
default_upstream: ghcr.io
tag_ttl: 1m
`)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Listen != "0.0.0.0:5001" || c.Cache.Size != 512<<20 || c.TagTTL.D() != time.Minute {
		t.Fatalf("file values not applied: %+v", c)
	}
	if len(c.Upstreams) != 1 || c.Upstreams["ghcr.io"].Username != "bot" {
		t.Fatalf("a file's upstreams must replace the default's: %v", c.Upstreams)
	}
	if c.Cache.HighWatermark != 0.9 || c.StaleTimeout.D() != 2*time.Second {
		t.Fatalf("keys the file omits must keep their defaults: %+v", c)
	}
	if strings.Contains(c.Upstreams["ghcr.io"].String(), "secret") {
		t.Fatal("Upstream.String leaks the password")
	}
}

func TestLoadErrorsNameTheLine(t *testing.T) {
	cases := []struct{ body, want string }{
		{"listen: 127.0.0.1:5000\nbogus: 1\n", `line 2: unknown key "bogus"`},
		{"cache:\n  size: 12 parsecs\n", `line 2: "12 parsecs" is not a size`},
		{"tag_ttl: 5 minutes\n", `line 1: "5 minutes" is not a duration`},
		{"log:\n  level: info\n  colour: red\n", `line 3: unknown key "colour"`},
		{"cache:\n  high_watermark: lots\n", "line 2:"},
	}
	for _, tc := range cases {
		_, err := Load(writeFile(t, tc.body))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want error containing %q", tc.body, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "\n") {
			t.Errorf("%q: error spans lines: %q", tc.body, err)
		}
	}
}

func TestValidateNamesKeyAndLine(t *testing.T) {
	cases := []struct{ body, want string }{
		{"listen: nowhere\n", `line 1: listen: "nowhere" is not HOST:PORT`},
		{"upstreams:\n  docker.io:\n    url: ftp://x\n", `line 3: upstreams.docker.io.url: "ftp://x" is not an http:// or https:// URL`},
		{"default_upstream: quay.io\n", `line 1: default_upstream: "quay.io" is not one of the upstreams`},
		{"log:\n  format: xml\n", `line 2: log.format: "xml" is not text or json`},
		{"cache:\n  low_watermark: 0.95\n", "cache.low_watermark: need 0 < low_watermark"},
		{"stale_timeout: 0s\n", "stale_timeout: must be positive"},
		{"s3:\n  bucket: b\n  endpoint: '::'\n", `s3.endpoint: "::" is not a URL`},
	}
	for _, tc := range cases {
		c, err := Load(writeFile(t, tc.body))
		if err != nil {
			t.Fatalf("%q: %v", tc.body, err)
		}
		err = c.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want error containing %q", tc.body, err, tc.want)
		}
	}
}

func TestCheckDataDir(t *testing.T) {
	c := Default()
	c.Data = filepath.Join(t.TempDir(), "a", "b")
	if err := c.CheckDataDir(); err != nil {
		t.Fatal(err)
	}
	c.Data = "/proc/berth-cannot-be-here"
	if err := c.CheckDataDir(); err == nil || !strings.Contains(err.Error(), "data: cannot create") {
		t.Fatalf("got %v", err)
	}
}

func TestPrecedenceFileEnvFlags(t *testing.T) {
	p := writeFile(t, `
listen: 127.0.0.1:6000
tag_ttl: 1m
upstreams:
  docker.io:
    url: https://mirror.example
    username: u
    password: p
`)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	var o Overrides
	env := map[string]string{"BERTH_LISTEN": "127.0.0.1:7000", "BERTH_TAG_TTL": "2m", "BERTH_UPSTREAM": "docker.io=http://127.0.0.1:9,quay.io=https://quay.io"}
	o.ReadEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	o.BindFlags(fs)
	if err := fs.Parse([]string{"--listen", "127.0.0.1:8000", "--cache-size", "1GiB"}); err != nil {
		t.Fatal(err)
	}
	if err := o.Apply(c); err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:8000" {
		t.Errorf("flag must beat env: listen=%s", c.Listen)
	}
	if c.TagTTL.D() != 2*time.Minute {
		t.Errorf("env must beat file: tag_ttl=%s", c.TagTTL)
	}
	if c.Cache.Size != 1<<30 {
		t.Errorf("cache size=%d", c.Cache.Size)
	}
	if len(c.Upstreams) != 2 || c.Upstreams["docker.io"].URL != "http://127.0.0.1:9" || c.Upstreams["quay.io"].URL != "https://quay.io" {
		t.Errorf("upstreams=%v", c.Upstreams)
	}
	if c.Upstreams["docker.io"].Username != "u" {
		t.Errorf("a host the file names keeps its credentials: %+v", c.Upstreams["docker.io"])
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestFlagErrors(t *testing.T) {
	for _, args := range [][]string{{"--upstream", "nohost"}, {"--tag-ttl", "soon"}, {"--cache-size", "big"}, {"--s3-path-style", "maybe"}} {
		var o Overrides
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		o.BindFlags(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		err := o.Apply(Default())
		if err == nil || !strings.HasPrefix(err.Error(), args[0]+":") {
			t.Errorf("%v: got %v, want an error naming %s", args, err, args[0])
		}
	}
}

func TestParseSize(t *testing.T) {
	cases := map[string]int64{"1024": 1024, "512MiB": 512 << 20, "20GiB": 20 << 30, "1.5GB": 1500000000, "10 KiB": 10240, "0": 0}
	for in, want := range cases {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1", "ten", "5XB"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) succeeded", bad)
		}
	}
}

func TestEmptyFileIsDefault(t *testing.T) {
	c, err := Load(writeFile(t, ""))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

package config

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
	"gopkg.in/yaml.v3"
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
	for _, args := range [][]string{{"--upstream", "nohost"}, {"--tag-ttl", "soon"}, {"--cache-size", "big"}, {"--s3-path-style=maybe"}, {"--fleet-metrics-auth=sometimes"}} {
		var o Overrides
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		o.BindFlags(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		name, _, _ := strings.Cut(args[0], "=")
		err := o.Apply(Default())
		if err == nil || !strings.HasPrefix(err.Error(), name+":") {
			t.Errorf("%v: got %v, want an error naming %s", args, err, name)
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

// Boolean settings are switches, as in any Go command, and still take
// =true/=false and their BERTH_* variable.
func TestBoolFlagsAreSwitches(t *testing.T) {
	cases := []struct {
		env  map[string]string
		args []string
		file string
		want bool
	}{
		{args: []string{"--s3-path-style", "--s3-bucket", "b"}, want: true},
		{args: []string{"--s3-bucket", "b", "--s3-path-style"}, want: true},
		{args: []string{"-s3-path-style"}, want: true},
		{args: []string{"--s3-path-style=true"}, want: true},
		{args: []string{"--s3-path-style=1"}, want: true},
		{args: []string{"--s3-path-style=false"}, file: "s3:\n  path_style: true\n", want: false},
		{args: []string{"--s3-path-style", "--s3-path-style=false"}, want: false},
		{env: map[string]string{"BERTH_S3_PATH_STYLE": "true"}, want: true},
		{env: map[string]string{"BERTH_S3_PATH_STYLE": "false"}, file: "s3:\n  path_style: true\n", want: false},
		{env: map[string]string{"BERTH_S3_PATH_STYLE": "true"}, args: []string{"--s3-path-style=false"}, want: false},
		{file: "s3:\n  path_style: true\n", want: true},
		{want: false},
	}
	for _, tc := range cases {
		c := Default()
		if tc.file != "" {
			var err error
			if c, err = Load(writeFile(t, tc.file)); err != nil {
				t.Fatal(err)
			}
		}
		var o Overrides
		o.ReadEnv(func(k string) (string, bool) { v, ok := tc.env[k]; return v, ok })
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		o.BindFlags(fs)
		if err := fs.Parse(tc.args); err != nil {
			t.Errorf("%v: %v", tc.args, err)
			continue
		}
		if fs.NArg() != 0 {
			t.Errorf("%v: left arguments %v", tc.args, fs.Args())
		}
		if err := o.Apply(c); err != nil {
			t.Errorf("%v %v: %v", tc.env, tc.args, err)
			continue
		}
		if c.S3.PathStyle != tc.want {
			t.Errorf("env %v, args %v, file %q: path_style %v, want %v", tc.env, tc.args, tc.file, c.S3.PathStyle, tc.want)
		}
		if slices.Contains(tc.args, "b") && c.S3.Bucket != "b" {
			t.Errorf("%v: the flag after the switch was lost: bucket %q", tc.args, c.S3.Bucket)
		}
	}

	// Every boolean setting is a switch; every other setting needs a value.
	for _, s := range settings {
		var o Overrides
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		o.BindFlags(fs)
		err := fs.Parse([]string{"--" + s.flag})
		if s.boolean {
			c := Default()
			if err != nil || o.Apply(c) != nil {
				t.Errorf("--%s alone: %v", s.flag, err)
			}
			for _, v := range []string{"true", "false"} {
				if err := s.set(c, v); err != nil {
					t.Errorf("--%s=%s: %v", s.flag, v, err)
				}
			}
		} else if err == nil || !strings.Contains(err.Error(), "needs an argument") {
			t.Errorf("--%s alone: %v, want it to need a value", s.flag, err)
		}
	}
	c := Default()
	var o Overrides
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	o.BindFlags(fs)
	if err := fs.Parse([]string{"--fleet-metrics-auth"}); err != nil {
		t.Fatal(err)
	}
	if err := o.Apply(c); err != nil || !c.Fleet.MetricsAuth {
		t.Fatalf("--fleet-metrics-auth: %v, metrics_auth %v", err, c.Fleet.MetricsAuth)
	}

	// --help shows a switch without a value and the others with theirs.
	var help bytes.Buffer
	fs = flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(&help)
	o.BindFlags(fs)
	fs.PrintDefaults()
	for _, want := range []string{"  -s3-path-style\n", "  -fleet-metrics-auth\n", "  -listen ADDR\n", "  -fleet-token-file FILE\n"} {
		if !strings.Contains(help.String(), want) {
			t.Errorf("--help lacks %q:\n%s", want, help.String())
		}
	}
}

// The settings table keeps one naming rule, and every key it overrides is
// in the embedded default, where it is documented.
func TestSettingsTable(t *testing.T) {
	var root yaml.Node
	if err := yaml.Unmarshal(defaultYAML, &root); err != nil {
		t.Fatal(err)
	}
	keys := map[string]int{}
	collectLines(&root, "", keys)
	seen := map[string]bool{}
	for _, s := range settings {
		if want := "BERTH_" + strings.ToUpper(strings.ReplaceAll(s.flag, "-", "_")); s.env != want {
			t.Errorf("--%s reads %s, want %s", s.flag, s.env, want)
		}
		if _, ok := keys[s.key]; !ok {
			t.Errorf("--%s overrides %s, which default.yaml does not have", s.flag, s.key)
		}
		if seen[s.flag] || seen[s.env] {
			t.Errorf("--%s twice", s.flag)
		}
		seen[s.flag], seen[s.env] = true, true
		if strings.Contains(s.usage, "\n") {
			t.Errorf("--%s: usage spans lines", s.flag)
		}
	}
}

// fleetFiles makes the files of a working fleet configuration: tokens, a
// CA, a certificate issued by it and its key, and an htpasswd file.
type fleetFiles struct {
	dir, tokens, ca, cert, key, otherKey, htpasswd string
}

func newFleetFiles(t *testing.T) fleetFiles {
	t.Helper()
	dir := t.TempDir()
	put := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "fleet CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "berth-fleet"}, DNSNames: []string{"berth-fleet"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}, caTmpl, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := func(k *ecdsa.PrivateKey) string {
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}))
	}
	hash, err := bcrypt.GenerateFromPassword([]byte("pull-password"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return fleetFiles{
		dir:      dir,
		tokens:   put("tokens", "# fleet\n"+fleetToken+"\n"),
		ca:       put("ca.crt", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}))),
		cert:     put("tls.crt", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}))),
		key:      put("tls.key", keyPEM(key)),
		otherKey: put("other.key", keyPEM(other)),
		htpasswd: put("htpasswd", "puller:"+string(hash)+"\n"),
	}
}

const fleetToken = "0123456789abcdef-fleet-token-value"

func TestFleetSettings(t *testing.T) {
	f := newFleetFiles(t)
	c, err := Load(writeFile(t, `
listen: 127.0.0.1:5000
fleet_listen: 0.0.0.0:5001
fleet:
  token_file: `+f.tokens+`
  metrics_auth: true
  tls:
    cert_file: `+f.cert+`
    key_file: `+f.key+`
    client_ca_file: `+f.ca+`
    ca_file: `+f.ca+`
    server_name: berth-fleet
auth:
  htpasswd: `+f.htpasswd+`
s3:
  bucket: b
  advertise: https://10.0.3.7:5001
`))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	want := Fleet{TokenFile: f.tokens, MetricsAuth: true, TLS: FleetTLS{CertFile: f.cert, KeyFile: f.key, ClientCAFile: f.ca, CAFile: f.ca, ServerName: "berth-fleet"}}
	if c.FleetListen != "0.0.0.0:5001" || c.Fleet != want || !c.Fleet.TLS.Enabled() || !c.Fleet.TLS.Mutual() {
		t.Errorf("fleet settings: %q %+v", c.FleetListen, c.Fleet)
	}
	if c.Auth != (Auth{HTPasswd: f.htpasswd, Realm: "berth"}) {
		t.Errorf("auth: %+v (the realm defaults to berth)", c.Auth)
	}

	// The same from the environment and flags.
	d := Default()
	if d.FleetListen != "" || d.Fleet != (Fleet{}) || d.Auth != (Auth{Realm: "berth"}) {
		t.Errorf("default: fleet_listen %q, fleet %+v, auth %+v", d.FleetListen, d.Fleet, d.Auth)
	}
	env := map[string]string{
		"BERTH_FLEET_LISTEN": "10.0.3.7:5001", "BERTH_FLEET_TOKEN_FILE": f.tokens, "BERTH_FLEET_METRICS_AUTH": "true",
		"BERTH_FLEET_TLS_CERT": f.cert, "BERTH_FLEET_TLS_KEY": f.key, "BERTH_FLEET_CLIENT_CA": f.ca,
		"BERTH_FLEET_CA": f.ca, "BERTH_FLEET_TLS_SERVER_NAME": "berth-fleet", "BERTH_HTPASSWD": f.htpasswd, "BERTH_AUTH_REALM": "ci",
	}
	var o Overrides
	o.ReadEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err := o.Apply(d); err != nil {
		t.Fatal(err)
	}
	if err := d.Validate(); err != nil {
		t.Fatal(err)
	}
	if d.FleetListen != "10.0.3.7:5001" || d.Fleet != want || d.Auth != (Auth{HTPasswd: f.htpasswd, Realm: "ci"}) {
		t.Errorf("from the environment: %q %+v %+v", d.FleetListen, d.Fleet, d.Auth)
	}
	d = Default()
	o = Overrides{}
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	o.BindFlags(fs)
	err = fs.Parse([]string{"--fleet-listen", "127.0.0.1:5001", "--fleet-token-file", f.tokens, "--fleet-metrics-auth",
		"--fleet-tls-cert", f.cert, "--fleet-tls-key", f.key, "--fleet-client-ca", f.ca, "--fleet-ca", f.ca,
		"--fleet-tls-server-name", "berth-fleet", "--htpasswd", f.htpasswd, "--auth-realm", "ci"})
	if err != nil {
		t.Fatal(err)
	}
	if err := o.Apply(d); err != nil {
		t.Fatal(err)
	}
	if err := d.Validate(); err != nil {
		t.Fatal(err)
	}
	if d.FleetListen != "127.0.0.1:5001" || d.Fleet != want || d.Auth.HTPasswd != f.htpasswd {
		t.Errorf("from flags: %q %+v %+v", d.FleetListen, d.Fleet, d.Auth)
	}

	// Tokens alone, or a client CA alone, are enough credentials.
	for _, body := range []string{
		"fleet_listen: 127.0.0.1:5001\nfleet:\n  token_file: " + f.tokens + "\n",
		"fleet_listen: 127.0.0.1:5001\nfleet:\n  tls:\n    cert_file: " + f.cert + "\n    key_file: " + f.key + "\n    client_ca_file: " + f.ca + "\n",
		// A host without a fleet port of its own still calls its peers with these.
		"fleet:\n  token_file: " + f.tokens + "\n  tls:\n    ca_file: " + f.ca + "\n",
	} {
		c, err := Load(writeFile(t, body))
		if err == nil {
			err = c.Validate()
		}
		if err != nil {
			t.Errorf("%q: %v", body, err)
		}
	}
}

func TestFleetValidation(t *testing.T) {
	f := newFleetFiles(t)
	put := func(name, body string) string {
		p := filepath.Join(f.dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tok := "\n  token_file: " + f.tokens + "\n"
	fleet := func(listen string) string { return "fleet_listen: " + listen + "\nfleet:" + tok }
	cases := []struct{ body, want string }{
		{fleet("127.0.0.1:5000"), `line 1: fleet_listen: 127.0.0.1:5000 overlaps listen 127.0.0.1:5000: the fleet port needs a port of its own`},
		{fleet("0.0.0.0:5000"), "line 1: fleet_listen: 0.0.0.0:5000 overlaps listen 127.0.0.1:5000"},
		{fleet(`":5000"`), "fleet_listen: :5000 overlaps listen"},
		{fleet(`"[::]:5000"`), "fleet_listen: [::]:5000 overlaps listen"},
		{fleet("localhost:5000"), "fleet_listen: localhost:5000 overlaps listen"},
		{"listen: 0.0.0.0:5000\n" + fleet("10.0.3.7:5000"), "fleet_listen: 10.0.3.7:5000 overlaps listen 0.0.0.0:5000"},
		{fleet("nowhere"), `line 1: fleet_listen: "nowhere" is not HOST:PORT`},
		{"fleet_listen: 127.0.0.1:5001\n", "line 1: fleet_listen: needs fleet.token_file or fleet.tls.client_ca_file"},
		{"fleet:\n  token_file: " + f.dir + "/missing\n", "line 2: fleet.token_file: open " + f.dir + "/missing: no such file or directory"},
		{"fleet:\n  token_file: " + put("empty", "# rotated\n\n") + "\n", "fleet.token_file: " + f.dir + "/empty has no tokens"},
		{"fleet:\n  token_file: " + put("short", fleetToken+"\nsecret-value\n") + "\n", "fleet.token_file: " + f.dir + "/short line 2: token shorter than 16 characters"},
		{"fleet:\n  tls:\n    cert_file: " + f.cert + "\n", "line 3: fleet.tls.cert_file: needs fleet.tls.key_file, its private key"},
		{"fleet:\n  tls:\n    key_file: " + f.key + "\n", "line 3: fleet.tls.key_file: needs fleet.tls.cert_file, its certificate"},
		{"fleet:\n  tls:\n    cert_file: " + f.cert + "\n    key_file: " + f.otherKey + "\n", "line 3: fleet.tls.cert_file: certificate " + f.cert + " with key " + f.otherKey + ": tls: private key does not match public key"},
		{"fleet:\n  tls:\n    cert_file: " + f.dir + "/nocert\n    key_file: " + f.key + "\n", "fleet.tls.cert_file: open " + f.dir + "/nocert: no such file"},
		{"fleet:\n  tls:\n    ca_file: " + f.key + "\n", "line 3: fleet.tls.ca_file: " + f.key + " holds no PEM certificates"},
		{"fleet:\n  tls:\n    client_ca_file: " + put("garbage", "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n") + "\n", "fleet.tls.client_ca_file: " + f.dir + "/garbage: certificate 1:"},
		{"fleet_listen: 127.0.0.1:5001\nfleet:\n  tls:\n    client_ca_file: " + f.ca + "\n", "fleet.tls.client_ca_file: needs fleet.tls.cert_file and fleet.tls.key_file"},
		{"auth:\n  htpasswd: " + f.dir + "/missing\n", "line 2: auth.htpasswd: open " + f.dir + "/missing: no such file or directory"},
		{"auth:\n  htpasswd: " + put("plain", "puller\n") + "\n", "auth.htpasswd: " + f.dir + "/plain line 1: not USER:HASH"},
		{"auth:\n  htpasswd: " + put("md5", "puller:$apr1$hzyq0Ov1$4ocJ3CWYV0dPWprxZ4uP3.\n") + "\n", `auth.htpasswd: ` + f.dir + `/md5 line 1: the password of user "puller" is not a bcrypt hash`},
		{"auth:\n  htpasswd: " + f.htpasswd + "\n  realm: \"\"\n", "line 3: auth.realm: must not be empty with auth.htpasswd"},
		{fleet("127.0.0.1:5001") + "s3:\n  bucket: b\n  advertise: https://10.0.3.7:5001\n", "s3.advertise: \"https://10.0.3.7:5001\": the fleet port serves plain HTTP"},
		{fleet("127.0.0.1:5001") + "  tls:\n    cert_file: " + f.cert + "\n    key_file: " + f.key + "\ns3:\n  bucket: b\n  advertise: http://10.0.3.7:5001\n", "s3.advertise: \"http://10.0.3.7:5001\": the fleet port serves TLS"},
	}
	for _, tc := range cases {
		c, err := Load(writeFile(t, tc.body))
		if err != nil {
			t.Fatalf("%q: %v", tc.body, err)
		}
		err = c.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q:\n got %v\nwant an error containing %q", tc.body, err, tc.want)
			continue
		}
		if strings.Contains(err.Error(), "\n") || strings.Contains(err.Error(), "secret-value") || strings.Contains(err.Error(), fleetToken) {
			t.Errorf("%q: error spans lines or shows a token: %q", tc.body, err)
		}
	}
	// From a flag, the error names the key without a line.
	c := Default()
	c.FleetListen = "127.0.0.1:5000"
	c.Fleet.TokenFile = f.tokens
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "invalid configuration: fleet_listen: 127.0.0.1:5000 overlaps listen") {
		t.Errorf("got %v", err)
	}
}

func TestListenOverlap(t *testing.T) {
	cases := []struct {
		a, b string
		want bool
	}{
		{"127.0.0.1:5000", "127.0.0.1:5000", true},
		{"127.0.0.1:5000", "127.0.0.1:5001", false},
		{"0.0.0.0:5000", "127.0.0.1:5000", true},
		{"127.0.0.1:5000", "0.0.0.0:5000", true},
		{":5000", "10.0.3.7:5000", true},
		{"[::]:5000", "127.0.0.1:5000", true},
		{"[::1]:5000", "127.0.0.1:5000", false},
		{"localhost:5000", "127.0.0.1:5000", true},
		{"LOCALHOST:5000", "localhost:5000", true},
		{"[::ffff:127.0.0.1]:5000", "127.0.0.1:5000", true},
		{"10.0.3.7:5000", "127.0.0.1:5000", false},
		{"127.0.0.1:http", "127.0.0.1:80", true},
		{"127.0.0.1:0", "127.0.0.1:0", false},
		{"0.0.0.0:0", "127.0.0.1:0", false},
		{"nowhere", "127.0.0.1:5000", false},
	}
	for _, tc := range cases {
		if got := overlaps(tc.a, tc.b); got != tc.want {
			t.Errorf("overlaps(%q, %q) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}

// Command lines written when booleans took a separate value keep working.
func TestJoinBoolValues(t *testing.T) {
	got := JoinBoolValues([]string{"--s3-path-style", "true", "--s3-bucket", "b", "-fleet-metrics-auth", "false", "--listen", "true", "--", "--s3-path-style", "true"})
	want := []string{"--s3-path-style=true", "--s3-bucket", "b", "-fleet-metrics-auth=false", "--listen", "true", "--", "--s3-path-style", "true"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("JoinBoolValues: %q, want %q", got, want)
	}
}

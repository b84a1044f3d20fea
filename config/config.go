// Package config holds berth's configuration: the YAML file, its embedded
// default, and the BERTH_* environment and command-line overrides.
package config

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/berth-dev/berth/auth"
)

//go:embed default.yaml
var defaultYAML []byte

// DefaultYAML is the embedded default configuration, as `berth config default` prints it.
func DefaultYAML() []byte { return bytes.Clone(defaultYAML) }

// DockerHub is the name clients use for Docker Hub. Its other names,
// index.docker.io and the endpoint host registry-1.docker.io (which
// containerd sends in ?ns=), are folded into it when a request's registry
// is resolved to an upstream.
const DockerHub = "docker.io"

// Config is berth's whole configuration.
type Config struct {
	Listen          string              `yaml:"listen"`
	FleetListen     string              `yaml:"fleet_listen"` // the fleet port; "": none
	Fleet           Fleet               `yaml:"fleet"`
	Auth            Auth                `yaml:"auth"`
	AdminTokenFile  string              `yaml:"admin_token_file"` // bearer tokens for the node API's writes; "": loopback only
	Data            string              `yaml:"data"`
	Log             Log                 `yaml:"log"`
	Cache           Cache               `yaml:"cache"`
	Upstreams       map[string]Upstream `yaml:"upstreams"`
	DefaultUpstream string              `yaml:"default_upstream"`
	TagTTL          Duration            `yaml:"tag_ttl"`
	StaleTimeout    Duration            `yaml:"stale_timeout"`
	// SourceIdleTimeout is how long a blob download's source may send
	// nothing before berth resumes it from the byte reached.
	SourceIdleTimeout Duration `yaml:"source_idle_timeout"`
	// PeerIdleTimeout is how long another berth streaming a blob to this
	// one may send nothing before it is judged dead and its fetch taken
	// over.
	PeerIdleTimeout Duration  `yaml:"peer_idle_timeout"`
	ShutdownTimeout Duration  `yaml:"shutdown_timeout"`
	S3              S3        `yaml:"s3"`
	Inspector       Inspector `yaml:"inspector"`
	Webhooks        []Webhook `yaml:"webhooks"`

	// lines maps key paths ("cache.size", "upstreams.docker.io.url") to
	// their line in the file, so validation errors can point at it.
	lines map[string]int
	file  string
}

// Log configures logging.
type Log struct {
	Level  string `yaml:"level"`
	Format string `yaml:"format"`
}

// Cache is the local disk budget.
type Cache struct {
	Size          Size    `yaml:"size"`
	HighWatermark float64 `yaml:"high_watermark"`
	LowWatermark  float64 `yaml:"low_watermark"`
}

// Upstream is one registry berth may fetch from.
type Upstream struct {
	URL                string `yaml:"url"`
	Username           string `yaml:"username"`
	Password           string `yaml:"password"`
	CAFile             string `yaml:"ca_file"`
	InsecureSkipVerify bool   `yaml:"insecure_skip_verify"`
}

// Fleet holds the credentials of the fleet port (FleetListen), which other
// machines use: peers streaming blobs, the node API, metrics and health.
// The same files serve this host when it calls its peers.
type Fleet struct {
	// TokenFile holds bearer tokens, one a line (blank lines and # comments
	// skipped). Every token is accepted; the first is the one this host
	// sends to its peers.
	TokenFile   string   `yaml:"token_file"`
	MetricsAuth bool     `yaml:"metrics_auth"` // /metrics on the fleet port needs a credential too
	TLS         FleetTLS `yaml:"tls"`
}

// FleetTLS is the fleet port's TLS, and how this host checks its peers'.
type FleetTLS struct {
	CertFile     string `yaml:"cert_file"`      // the fleet port's certificate, also presented to peers asking for one
	KeyFile      string `yaml:"key_file"`       // its key
	ClientCAFile string `yaml:"client_ca_file"` // set: clients must present a certificate signed by it (mutual TLS)
	CAFile       string `yaml:"ca_file"`        // verifies peers' certificates; "": the system's CAs
	ServerName   string `yaml:"server_name"`    // name peers' certificates are checked against; "": the host called
}

// Enabled reports whether the fleet port serves TLS.
func (t FleetTLS) Enabled() bool { return t.CertFile != "" }

// Mutual reports whether the fleet port requires client certificates.
func (t FleetTLS) Mutual() bool { return t.ClientCAFile != "" }

// Auth is the registry listener's optional pull authentication.
type Auth struct {
	HTPasswd string `yaml:"htpasswd"` // bcrypt htpasswd file; "": no authentication
	Realm    string `yaml:"realm"`    // realm of the Basic challenge
}

// S3 is the fleet-wide shared tier; an empty Bucket disables it.
type S3 struct {
	Bucket    string   `yaml:"bucket"`
	Prefix    string   `yaml:"prefix"`
	Region    string   `yaml:"region"`
	Endpoint  string   `yaml:"endpoint"`
	PathStyle bool     `yaml:"path_style"`
	LeaseTTL  Duration `yaml:"lease_ttl"`
	Advertise string   `yaml:"advertise"` // URL other hosts reach this berth's fleet port at
}

// Inspector is the embedded image inspector (docs/inspector.md).
type Inspector struct {
	Enabled      bool    `yaml:"enabled"`
	Queue        int     `yaml:"queue"`          // inspections waiting; beyond it they are dropped and counted
	ShowEnvNames bool    `yaml:"show_env_names"` // show the names (never the values) of images' environment variables
	Watch        []Watch `yaml:"watch"`
}

// Watch is a repository whose tags berth revalidates on a schedule, so
// their changes are noticed (and webhooks sent) even when nothing pulls.
type Watch struct {
	Repository string   `yaml:"repository"` // upstream/name, e.g. docker.io/library/alpine
	Tags       []string `yaml:"tags"`       // tag patterns (path.Match), e.g. "3.*", "latest"
	Interval   Duration `yaml:"interval"`
}

// Webhook receives tag-change notifications.
type Webhook struct {
	URL          string   `yaml:"url"`
	SecretFile   string   `yaml:"secret_file"`  // HMAC-SHA256 key for the Berth-Signature header; "": unsigned
	Events       []string `yaml:"events"`       // new, changed, deleted; empty: all three
	Repositories []string `yaml:"repositories"` // upstream/name patterns (path.Match); empty: every repository
}

// WebhookEvents are the tag events a webhook may ask for.
var WebhookEvents = []string{"new", "changed", "deleted"}

// String never shows credentials, so a Config can be logged.
func (u Upstream) String() string {
	s := u.URL
	if u.Username != "" {
		s += " (user " + u.Username + ")"
	}
	return s
}

// Default returns the embedded default configuration.
func Default() *Config {
	c, err := parse(defaultYAML, nil, "embedded default")
	if err != nil {
		panic("config: embedded default is invalid: " + err.Error())
	}
	return c
}

// Load reads the file at path over the embedded default. Unknown keys and
// malformed values are errors that name the file and line.
func Load(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return parse(b, Default(), path)
}

func parse(b []byte, base *Config, name string) (*Config, error) {
	c := &Config{}
	if base != nil {
		*c = *base
		// A file's upstreams replace the default's rather than merge into it:
		// an operator who lists upstreams means exactly those.
		c.Upstreams = nil
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	// io.EOF: an empty file sets nothing.
	if err := dec.Decode(c); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("config %s: %s", name, yamlError(err))
	}
	var root yaml.Node
	if base != nil && yaml.Unmarshal(b, &root) == nil {
		c.lines = map[string]int{}
		collectLines(&root, "", c.lines)
	}
	c.file = name
	if c.Upstreams == nil && base != nil {
		c.Upstreams = cloneUpstreams(base.Upstreams)
	}
	if c.Data == "" {
		c.Data = DefaultDataDir()
	}
	return c, nil
}

func cloneUpstreams(m map[string]Upstream) map[string]Upstream {
	out := make(map[string]Upstream, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

var unknownField = regexp.MustCompile(`field (\S+) not found in type \S+`)

// yamlError turns yaml.v3's messages into one line per problem that names
// the key the way the file spells it.
func yamlError(err error) string {
	var te *yaml.TypeError
	msgs := []string{strings.TrimPrefix(err.Error(), "yaml: ")}
	if errors.As(err, &te) {
		msgs = te.Errors
	}
	for i, m := range msgs {
		msgs[i] = unknownField.ReplaceAllString(m, `unknown key "$1"`)
	}
	return singleLine(strings.Join(msgs, "; "))
}

// oneLine escapes line breaks (a key or value in the file may hold them),
// so an error is one log line and one message of `berth config check`.
func singleLine(s string) string {
	return strings.NewReplacer("\n", `\n`, "\r", `\r`).Replace(s)
}

// CheckDataDir makes sure the data directory exists or can be created, and is writable.
func (c *Config) CheckDataDir() error {
	if err := os.MkdirAll(c.Data, 0o755); err != nil {
		return fmt.Errorf("%sdata: cannot create %s: %v", c.where("data"), c.Data, errors.Unwrap(err))
	}
	f, err := os.CreateTemp(c.Data, ".write-check-*")
	if err != nil {
		return fmt.Errorf("%sdata: %s is not writable: %v", c.where("data"), c.Data, errors.Unwrap(err))
	}
	f.Close()
	os.Remove(f.Name())
	return nil
}

func collectLines(n *yaml.Node, prefix string, out map[string]int) {
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			collectLines(c, prefix, out)
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			key := n.Content[i].Value
			if prefix != "" {
				key = prefix + "." + key
			}
			out[key] = n.Content[i].Line
			collectLines(n.Content[i+1], key, out)
		}
	}
}

// forget drops the line of key and everything under it.
func (c *Config) forget(key string) {
	for k := range c.lines {
		if k == key || strings.HasPrefix(k, key+".") {
			delete(c.lines, k)
		}
	}
}

// where names the file and line a key was set on, when it came from a file.
func (c *Config) where(key string) string {
	if line, ok := c.lines[key]; ok {
		return fmt.Sprintf("%s line %d: ", c.file, line)
	}
	return ""
}

// DefaultDataDir is /var/lib/berth for root, the user's cache directory otherwise.
func DefaultDataDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/berth"
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "berth")
	}
	return filepath.Join(os.TempDir(), "berth")
}

// Clone returns a deep copy.
func (c *Config) Clone() *Config {
	n := *c
	n.Upstreams = cloneUpstreams(c.Upstreams)
	n.lines = make(map[string]int, len(c.lines))
	for k, v := range c.lines {
		n.lines[k] = v
	}
	return &n
}

// Validate checks values that parse but make no sense together.
func (c *Config) Validate() error {
	var errs []string
	add := func(key, format string, a ...any) {
		errs = append(errs, singleLine(c.where(key)+key+": "+fmt.Sprintf(format, a...)))
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		add("listen", "%q is not HOST:PORT", c.Listen)
	}
	if c.FleetListen != "" {
		if _, _, err := net.SplitHostPort(c.FleetListen); err != nil {
			add("fleet_listen", "%q is not HOST:PORT", c.FleetListen)
		} else if overlaps(c.FleetListen, c.Listen) {
			add("fleet_listen", "%s overlaps listen %s: the fleet port needs a port of its own", c.FleetListen, c.Listen)
		}
		if c.Fleet.TokenFile == "" && c.Fleet.TLS.ClientCAFile == "" {
			add("fleet_listen", "needs fleet.token_file or fleet.tls.client_ca_file: the fleet port never runs without credentials")
		}
	}
	c.validateFleetFiles(add)
	if c.AdminTokenFile != "" {
		if _, err := auth.LoadTokens(c.AdminTokenFile); err != nil {
			add("admin_token_file", "%v", err) // names the file and line, never a token
		}
	}
	if c.Auth.HTPasswd != "" {
		if err := auth.CheckHTPasswd(c.Auth.HTPasswd); err != nil {
			add("auth.htpasswd", "%v", err)
		}
		if c.Auth.Realm == "" {
			add("auth.realm", "must not be empty with auth.htpasswd")
		}
	}
	if c.Data == "" {
		add("data", "must name a directory")
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "warning", "error":
	default:
		add("log.level", "%q is not one of debug, info, warn, error", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		add("log.format", "%q is not text or json", c.Log.Format)
	}
	if c.Cache.Size <= 0 {
		add("cache.size", "must be positive")
	}
	if !(c.Cache.LowWatermark > 0 && c.Cache.LowWatermark < c.Cache.HighWatermark && c.Cache.HighWatermark <= 1) {
		add("cache.low_watermark", "need 0 < low_watermark (%g) < high_watermark (%g) <= 1", c.Cache.LowWatermark, c.Cache.HighWatermark)
	}
	if len(c.Upstreams) == 0 {
		add("upstreams", "at least one upstream is required")
	}
	for _, host := range c.UpstreamHosts() {
		u := c.Upstreams[host]
		if err := validHost(host); err != nil {
			add("upstreams."+host, "%v", err)
		}
		pu, err := url.Parse(u.URL)
		if err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
			add("upstreams."+host+".url", "%q is not an http:// or https:// URL", u.URL)
		}
		if u.CAFile != "" {
			if _, err := os.Stat(u.CAFile); err != nil {
				add("upstreams."+host+".ca_file", "%v", err)
			}
		}
	}
	if _, ok := c.Upstreams[c.DefaultUpstream]; !ok && len(c.Upstreams) > 0 {
		add("default_upstream", "%q is not one of the upstreams (%s)", c.DefaultUpstream, strings.Join(c.UpstreamHosts(), ", "))
	}
	if c.TagTTL < 0 {
		add("tag_ttl", "must not be negative")
	}
	if c.SourceIdleTimeout <= 0 {
		add("source_idle_timeout", "must be positive")
	}
	if c.PeerIdleTimeout <= 0 {
		add("peer_idle_timeout", "must be positive")
	}
	if c.StaleTimeout <= 0 {
		add("stale_timeout", "must be positive")
	}
	if c.ShutdownTimeout < 0 {
		add("shutdown_timeout", "must not be negative")
	}
	if c.S3.Bucket != "" {
		if c.S3.Endpoint != "" {
			if pu, err := url.Parse(c.S3.Endpoint); err != nil || pu.Scheme == "" || pu.Host == "" {
				add("s3.endpoint", "%q is not a URL", c.S3.Endpoint)
			}
		}
		if c.S3.Advertise != "" {
			if pu, err := url.Parse(c.S3.Advertise); err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
				add("s3.advertise", "%q is not an http:// or https:// URL", c.S3.Advertise)
			} else if c.FleetListen != "" && c.Fleet.TLS.Enabled() && pu.Scheme != "https" {
				add("s3.advertise", "%q: the fleet port serves TLS (fleet.tls.cert_file), so peers need an https:// URL", c.S3.Advertise)
			} else if c.FleetListen != "" && !c.Fleet.TLS.Enabled() && pu.Scheme != "http" {
				add("s3.advertise", "%q: the fleet port serves plain HTTP (no fleet.tls.cert_file), so peers need an http:// URL", c.S3.Advertise)
			}
		}
		if c.S3.LeaseTTL <= 0 {
			add("s3.lease_ttl", "must be positive")
		}
	}
	c.validateInspector(add)
	if len(errs) > 0 {
		return errors.New("invalid configuration: " + strings.Join(errs, "; "))
	}
	return nil
}

// validateInspector checks the inspector's queue, watch list and webhooks.
func (c *Config) validateInspector(add func(key, format string, a ...any)) {
	if c.Inspector.Queue <= 0 {
		add("inspector.queue", "must be positive")
	}
	for i, w := range c.Inspector.Watch {
		key := fmt.Sprintf("inspector.watch[%d]", i)
		host, name, ok := strings.Cut(w.Repository, "/")
		if !ok || name == "" {
			add(key+".repository", "%q is not UPSTREAM/NAME, e.g. docker.io/library/alpine", w.Repository)
		} else if _, known := c.Upstreams[host]; !known {
			add(key+".repository", "%q: %s is not one of the upstreams", w.Repository, host)
		}
		if len(w.Tags) == 0 {
			add(key+".tags", "needs at least one tag or pattern")
		}
		for _, p := range w.Tags {
			if _, err := path.Match(p, ""); err != nil {
				add(key+".tags", "%q is not a pattern: %v", p, err)
			}
		}
		if w.Interval <= 0 {
			add(key+".interval", "must be positive")
		}
	}
	for i, h := range c.Webhooks {
		key := fmt.Sprintf("webhooks[%d]", i)
		if pu, err := url.Parse(h.URL); err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
			add(key+".url", "%q is not an http:// or https:// URL", h.URL)
		}
		if h.SecretFile != "" {
			if b, err := os.ReadFile(h.SecretFile); err != nil {
				add(key+".secret_file", "%v", err)
			} else if strings.TrimSpace(string(b)) == "" {
				add(key+".secret_file", "%s is empty", h.SecretFile)
			}
		}
		for _, e := range h.Events {
			if !slices.Contains(WebhookEvents, e) {
				add(key+".events", "%q is not one of %s", e, strings.Join(WebhookEvents, ", "))
			}
		}
		for _, p := range h.Repositories {
			if _, err := path.Match(p, ""); err != nil {
				add(key+".repositories", "%q is not a pattern: %v", p, err)
			}
		}
	}
}

// validateFleetFiles reads the fleet's token, certificate and CA files, as
// berth will when it starts or reloads, and reports what it cannot use.
func (c *Config) validateFleetFiles(add func(key, format string, a ...any)) {
	f := c.Fleet
	if f.TokenFile != "" {
		if _, err := auth.LoadTokens(f.TokenFile); err != nil {
			add("fleet.token_file", "%v", err) // names the file and line, never a token
		}
	}
	switch {
	case f.TLS.CertFile != "" && f.TLS.KeyFile == "":
		add("fleet.tls.cert_file", "needs fleet.tls.key_file, its private key")
	case f.TLS.CertFile == "" && f.TLS.KeyFile != "":
		add("fleet.tls.key_file", "needs fleet.tls.cert_file, its certificate")
	case f.TLS.CertFile != "":
		if _, err := auth.LoadKeyPair(f.TLS.CertFile, f.TLS.KeyFile); err != nil {
			add("fleet.tls.cert_file", "%v", err)
		}
	}
	if f.TLS.ClientCAFile != "" {
		if f.TLS.CertFile == "" && c.FleetListen != "" {
			add("fleet.tls.client_ca_file", "needs fleet.tls.cert_file and fleet.tls.key_file: client certificates are checked only over TLS")
		}
		if _, err := auth.LoadCertPool(f.TLS.ClientCAFile); err != nil {
			add("fleet.tls.client_ca_file", "%v", err)
		}
	}
	if f.TLS.CAFile != "" {
		if _, err := auth.LoadCertPool(f.TLS.CAFile); err != nil {
			add("fleet.tls.ca_file", "%v", err)
		}
	}
}

// overlaps reports whether two listen addresses would take the same
// socket: the same port on the same address, or on any address where one
// is the wildcard ("", 0.0.0.0, ::). Port 0 (any free port) never overlaps.
func overlaps(a, b string) bool {
	ha, pa, errA := net.SplitHostPort(a)
	hb, pb, errB := net.SplitHostPort(b)
	if errA != nil || errB != nil {
		return false
	}
	na, errA := net.LookupPort("tcp", pa)
	nb, errB := net.LookupPort("tcp", pb)
	if errA != nil || errB != nil || na != nb || na == 0 {
		return false
	}
	ha, hb = listenHost(ha), listenHost(hb)
	return ha == hb || ha == "*" || hb == "*"
}

// listenHost normalises a listen address's host: "*" for every address,
// IPv4 in dotted form, localhost as the address Go listens on for it.
func listenHost(h string) string {
	h = strings.ToLower(h)
	if h == "localhost" {
		return "127.0.0.1"
	}
	if h == "" {
		return "*"
	}
	ip := net.ParseIP(h)
	if ip == nil {
		return h
	}
	if ip.IsUnspecified() {
		return "*"
	}
	return ip.String() // ::ffff:127.0.0.1 prints as 127.0.0.1
}

func validHost(h string) error {
	if h == "" || strings.ContainsAny(h, "/ ") || strings.ToLower(h) != h {
		return errors.New("not a registry host name (lower case, no slashes)")
	}
	return nil
}

// UpstreamHosts returns the configured registry names, sorted.
func (c *Config) UpstreamHosts() []string {
	hosts := make([]string, 0, len(c.Upstreams))
	for h := range c.Upstreams {
		hosts = append(hosts, h)
	}
	sort.Strings(hosts)
	return hosts
}

// Duration is a time.Duration written as "30s" or "5m" in YAML.
type Duration time.Duration

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

func (d Duration) String() string { return time.Duration(d).String() }

// UnmarshalYAML reports a bad duration with its line.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration (like 30s, 5m, 1h)", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration as text.
func (d Duration) MarshalYAML() (any, error) { return d.String(), nil }

// Size is a byte count written as 1048576, 512MiB, 20GiB or 1.5GB in YAML.
type Size int64

// UnmarshalYAML reports a bad size with its line.
func (s *Size) UnmarshalYAML(n *yaml.Node) error {
	v, err := ParseSize(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %v", n.Line, err)
	}
	*s = Size(v)
	return nil
}

// MarshalYAML writes the size as a plain byte count.
func (s Size) MarshalYAML() (any, error) { return int64(s), nil }

var sizeUnits = []struct {
	suffix string
	mult   float64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40},
	{"B", 1},
}

// ParseSize parses a byte count with an optional unit (KiB, MiB, GiB, TiB, KB, MB, GB, TB).
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := 1.0
	for _, u := range sizeUnits {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || f < 0 || f*mult > 1<<62 {
		return 0, fmt.Errorf("%q is not a size (like 1073741824, 512MiB, 20GiB)", s)
	}
	return int64(f * mult), nil
}

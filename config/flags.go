package config

import (
	"flag"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// A setting is one key that a flag and a BERTH_* variable can override.
// Keeping flag, variable and help in one table keeps `--help` and the
// documentation true to what the code reads.
type setting struct {
	flag, key, env, usage string // key: the YAML key path it overrides
	repeat                bool   // --upstream may be given many times; its variable is comma-separated
	boolean               bool   // a switch: --flag alone means true, --flag=false turns it off
	set                   func(c *Config, v string) error
}

func durationSetting(dst func(c *Config) *Duration) func(*Config, string) error {
	return func(c *Config, v string) error {
		d, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("%q is not a duration (like 30s, 5m, 1h)", v)
		}
		*dst(c) = Duration(d)
		return nil
	}
}

func stringSetting(dst func(c *Config) *string) func(*Config, string) error {
	return func(c *Config, v string) error { *dst(c) = v; return nil }
}

func boolSetting(dst func(c *Config) *bool) func(*Config, string) error {
	return func(c *Config, v string) error {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("%q is not true or false", v)
		}
		*dst(c) = b
		return nil
	}
}

var settings = []setting{
	{flag: "listen", key: "listen", env: "BERTH_LISTEN", usage: "`ADDR` to listen on (default 127.0.0.1:5000)",
		set: stringSetting(func(c *Config) *string { return &c.Listen })},
	{flag: "data", key: "data", env: "BERTH_DATA", usage: "local cache `DIR` (default /var/lib/berth as root, else ~/.cache/berth)",
		set: stringSetting(func(c *Config) *string { return &c.Data })},
	{flag: "upstream", key: "upstreams", env: "BERTH_UPSTREAM", repeat: true,
		usage: "`HOST=URL` upstream this mirror may fetch from, repeatable; replaces the configured list (default docker.io=https://registry-1.docker.io)",
		set:   setUpstream},
	{flag: "default-upstream", key: "default_upstream", env: "BERTH_DEFAULT_UPSTREAM", usage: "`HOST` for names with no registry host and no ?ns= (default docker.io)",
		set: stringSetting(func(c *Config) *string { return &c.DefaultUpstream })},
	{flag: "tag-ttl", key: "tag_ttl", env: "BERTH_TAG_TTL", usage: "`DURATION` a tag's digest is trusted before asking the upstream again (default 5m)",
		set: durationSetting(func(c *Config) *Duration { return &c.TagTTL })},
	{flag: "stale-timeout", key: "stale_timeout", env: "BERTH_STALE_TIMEOUT", usage: "`DURATION` to wait for the upstream before serving a stale tag (default 2s)",
		set: durationSetting(func(c *Config) *Duration { return &c.StaleTimeout })},
	{flag: "source-idle-timeout", key: "source_idle_timeout", env: "BERTH_SOURCE_IDLE_TIMEOUT", usage: "`DURATION` a blob download's source may send nothing before berth resumes it from the byte reached (default 15s)",
		set: durationSetting(func(c *Config) *Duration { return &c.SourceIdleTimeout })},
	{flag: "peer-idle-timeout", key: "peer_idle_timeout", env: "BERTH_PEER_IDLE_TIMEOUT", usage: "`DURATION` another berth streaming a blob to this one may send nothing before it is judged dead and its fetch taken over (default 5s)",
		set: durationSetting(func(c *Config) *Duration { return &c.PeerIdleTimeout })},
	{flag: "cache-size", key: "cache.size", env: "BERTH_CACHE_SIZE", usage: "local disk budget, `BYTES` or a size like 20GiB (default 20GiB)",
		set: func(c *Config, v string) error {
			n, err := ParseSize(v)
			c.Cache.Size = Size(n)
			return err
		}},
	{flag: "shutdown-timeout", key: "shutdown_timeout", env: "BERTH_SHUTDOWN_TIMEOUT", usage: "`DURATION` berth keeps serving the pulls under way after SIGTERM before it cuts them (default 30s)",
		set: durationSetting(func(c *Config) *Duration { return &c.ShutdownTimeout })},
	{flag: "log-level", key: "log.level", env: "BERTH_LOG_LEVEL", usage: "`LEVEL`: debug, info, warn or error (default info)",
		set: stringSetting(func(c *Config) *string { return &c.Log.Level })},
	{flag: "log-format", key: "log.format", env: "BERTH_LOG_FORMAT", usage: "`FORMAT`: text or json (default text)",
		set: stringSetting(func(c *Config) *string { return &c.Log.Format })},
	{flag: "s3-bucket", key: "s3.bucket", env: "BERTH_S3_BUCKET", usage: "shared S3 `BUCKET` for the fleet cache (default none: no S3 tier)",
		set: stringSetting(func(c *Config) *string { return &c.S3.Bucket })},
	{flag: "s3-prefix", key: "s3.prefix", env: "BERTH_S3_PREFIX", usage: "key `PREFIX` inside the bucket (default berth/)",
		set: stringSetting(func(c *Config) *string { return &c.S3.Prefix })},
	{flag: "s3-region", key: "s3.region", env: "BERTH_S3_REGION", usage: "S3 `REGION` (default $AWS_REGION or the shared AWS config, else us-east-1)",
		set: stringSetting(func(c *Config) *string { return &c.S3.Region })},
	{flag: "s3-endpoint", key: "s3.endpoint", env: "BERTH_S3_ENDPOINT", usage: "S3 endpoint `URL` for MinIO, Ceph and other S3-compatible stores",
		set: stringSetting(func(c *Config) *string { return &c.S3.Endpoint })},
	{flag: "s3-path-style", key: "s3.path_style", env: "BERTH_S3_PATH_STYLE", boolean: true, usage: "use path-style S3 addressing, as MinIO usually needs (default false)",
		set: boolSetting(func(c *Config) *bool { return &c.S3.PathStyle })},
	{flag: "s3-advertise", key: "s3.advertise", env: "BERTH_S3_ADVERTISE", usage: "`URL` of this berth's fleet port as other hosts reach it, so they stream a blob from it while it downloads (default none: they wait for the bucket)",
		set: stringSetting(func(c *Config) *string { return &c.S3.Advertise })},
	{flag: "s3-lease-ttl", key: "s3.lease_ttl", env: "BERTH_S3_LEASE_TTL", usage: "`DURATION` one host may hold the right to fetch a blob without renewing it; a live holder renews every third of it (default 15s)",
		set: durationSetting(func(c *Config) *Duration { return &c.S3.LeaseTTL })},
	{flag: "fleet-listen", key: "fleet_listen", env: "BERTH_FLEET_LISTEN", usage: "`ADDR` of the fleet port for other hosts: peer streaming, node API, metrics, health (default none)",
		set: stringSetting(func(c *Config) *string { return &c.FleetListen })},
	{flag: "fleet-token-file", key: "fleet.token_file", env: "BERTH_FLEET_TOKEN_FILE", usage: "`FILE` of fleet bearer tokens, one a line; all are accepted, the first is sent to peers",
		set: stringSetting(func(c *Config) *string { return &c.Fleet.TokenFile })},
	{flag: "fleet-metrics-auth", key: "fleet.metrics_auth", env: "BERTH_FLEET_METRICS_AUTH", boolean: true, usage: "require a fleet credential for /metrics on the fleet port too (default false)",
		set: boolSetting(func(c *Config) *bool { return &c.Fleet.MetricsAuth })},
	{flag: "fleet-tls-cert", key: "fleet.tls.cert_file", env: "BERTH_FLEET_TLS_CERT", usage: "certificate `FILE` (PEM) of the fleet port, also shown to peers that ask for one",
		set: stringSetting(func(c *Config) *string { return &c.Fleet.TLS.CertFile })},
	{flag: "fleet-tls-key", key: "fleet.tls.key_file", env: "BERTH_FLEET_TLS_KEY", usage: "private key `FILE` (PEM) of --fleet-tls-cert",
		set: stringSetting(func(c *Config) *string { return &c.Fleet.TLS.KeyFile })},
	{flag: "fleet-client-ca", key: "fleet.tls.client_ca_file", env: "BERTH_FLEET_CLIENT_CA", usage: "CA `FILE` (PEM): the fleet port requires client certificates it signed (mutual TLS)",
		set: stringSetting(func(c *Config) *string { return &c.Fleet.TLS.ClientCAFile })},
	{flag: "fleet-ca", key: "fleet.tls.ca_file", env: "BERTH_FLEET_CA", usage: "CA `FILE` (PEM) that peers' fleet port certificates must chain to (default the system's CAs)",
		set: stringSetting(func(c *Config) *string { return &c.Fleet.TLS.CAFile })},
	{flag: "fleet-tls-server-name", key: "fleet.tls.server_name", env: "BERTH_FLEET_TLS_SERVER_NAME", usage: "`NAME` peers' certificates are checked against (default the host of the peer's URL)",
		set: stringSetting(func(c *Config) *string { return &c.Fleet.TLS.ServerName })},
	{flag: "admin-token-file", key: "admin_token_file", env: "BERTH_ADMIN_TOKEN_FILE", usage: "`FILE` of admin bearer tokens, one a line, re-read on SIGHUP: the node API's writes (pre-warm) need one (default none: writes from loopback only)",
		set: stringSetting(func(c *Config) *string { return &c.AdminTokenFile })},
	{flag: "htpasswd", key: "auth.htpasswd", env: "BERTH_HTPASSWD", usage: "htpasswd `FILE` (bcrypt): pulls on --listen need a user and password (default none)",
		set: stringSetting(func(c *Config) *string { return &c.Auth.HTPasswd })},
	{flag: "inspector", key: "inspector.enabled", env: "BERTH_INSPECTOR", boolean: true, usage: "inspect every stored manifest in the background and serve /berth/v1/, /v1/images/ and /ui/ (default true)",
		set: boolSetting(func(c *Config) *bool { return &c.Inspector.Enabled })},
	{flag: "inspector-queue", key: "inspector.queue", env: "BERTH_INSPECTOR_QUEUE", usage: "`N` inspections that may wait; more are dropped and counted (default 256)",
		set: func(c *Config, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil {
				return fmt.Errorf("%q is not a number", v)
			}
			c.Inspector.Queue = n
			return nil
		}},
	{flag: "inspector-show-env-names", key: "inspector.show_env_names", env: "BERTH_INSPECTOR_SHOW_ENV_NAMES", boolean: true, usage: "show the names (never the values) of images' environment variables (default false)",
		set: boolSetting(func(c *Config) *bool { return &c.Inspector.ShowEnvNames })},
	{flag: "auth-realm", key: "auth.realm", env: "BERTH_AUTH_REALM", usage: "`REALM` of the registry listener's Basic challenge (default berth)",
		set: stringSetting(func(c *Config) *string { return &c.Auth.Realm })},
}

// setUpstream adds one HOST=URL. The first one given on a command line or in
// a variable replaces the configured list (see Overrides.Apply).
func setUpstream(c *Config, v string) error {
	host, u, ok := strings.Cut(v, "=")
	if !ok || host == "" || u == "" {
		return fmt.Errorf("%q is not HOST=URL", v)
	}
	if c.Upstreams == nil {
		c.Upstreams = map[string]Upstream{}
	}
	up := c.Upstreams[host]
	up.URL = u
	c.Upstreams[host] = up
	return nil
}

// Overrides are the settings given by flags and environment variables,
// kept apart so that SIGHUP can re-apply them over a reloaded file.
type Overrides struct {
	values []override
}

type override struct {
	s      *setting
	origin string
	value  string
}

// BindFlags registers every setting on fs; values land in o when fs parses.
// A boolean setting is a switch, as in any Go command: --s3-path-style alone
// means true, --s3-path-style=false turns it off.
func (o *Overrides) BindFlags(fs *flag.FlagSet) {
	for i := range settings {
		s := &settings[i]
		fs.Var(flagValue{o: o, s: s}, s.flag, s.usage+" [$"+s.env+"]")
	}
}

// flagValue records a flag's value in Overrides; Apply checks and sets it,
// so errors name the flag the same way whatever the kind of setting.
type flagValue struct {
	o *Overrides
	s *setting
}

func (v flagValue) Set(value string) error {
	v.o.values = append(v.o.values, override{s: v.s, origin: "--" + v.s.flag, value: value})
	return nil
}

// String is "": each usage line states its default, from the embedded file.
func (v flagValue) String() string { return "" }

// IsBoolFlag makes flag accept a boolean setting without a value.
func (v flagValue) IsBoolFlag() bool { return v.s != nil && v.s.boolean }

// ReadEnv records the BERTH_* variables found by lookup (os.LookupEnv).
// They are recorded before flags parse so that flags win.
func (o *Overrides) ReadEnv(lookup func(string) (string, bool)) {
	var env []override
	for i := range settings {
		s := &settings[i]
		v, ok := lookup(s.env)
		if !ok {
			continue
		}
		vals := []string{v}
		if s.repeat {
			vals = strings.Split(v, ",")
		}
		for _, one := range vals {
			env = append(env, override{s: s, origin: "$" + s.env, value: strings.TrimSpace(one)})
		}
	}
	o.values = append(env, o.values...)
}

// Apply sets every recorded override on c, later ones winning. A repeatable
// setting's first value from each origin kind replaces what the file said.
func (o *Overrides) Apply(c *Config) error {
	cleared := map[string]bool{}
	file := cloneUpstreams(c.Upstreams)
	for _, v := range o.values {
		kind := v.origin[:1] // "$" or "-": flags replace the variable's list too
		if v.s.repeat && !cleared[v.s.flag+kind] {
			cleared[v.s.flag+kind] = true
			c.Upstreams = map[string]Upstream{}
		}
		if v.s.repeat {
			// A host the file also names keeps the file's credentials and TLS settings.
			host, _, _ := strings.Cut(v.value, "=")
			if up, ok := file[host]; ok {
				c.Upstreams[host] = up
			}
		}
		c.forget(v.s.key) // the file's line no longer explains this value
		if err := v.s.set(c, v.value); err != nil {
			return fmt.Errorf("%s: %v", v.origin, err)
		}
	}
	return nil
}

// EnvNames lists every BERTH_* variable with its flag, for documentation tests.
func EnvNames() map[string]string {
	m := map[string]string{}
	for _, s := range settings {
		m[s.env] = s.flag
	}
	return m
}

// JoinBoolValues rewrites "--flag true" (or false) of a boolean setting
// into "--flag=true", so command lines written when booleans took a value
// keep their meaning instead of failing on a stray argument.
func JoinBoolValues(args []string) []string {
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			return append(out, args[i:]...)
		}
		name := strings.TrimLeft(a, "-")
		if i+1 < len(args) && name != a && !strings.Contains(name, "=") && isBoolSetting(name) {
			if _, err := strconv.ParseBool(args[i+1]); err == nil {
				out = append(out, a+"="+args[i+1])
				i++
				continue
			}
		}
		out = append(out, a)
	}
	return out
}

func isBoolSetting(flag string) bool {
	for _, s := range settings {
		if s.flag == flag {
			return s.boolean
		}
	}
	return false
}

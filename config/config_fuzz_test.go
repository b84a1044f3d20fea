package config

// Fuzz target for configuration files: berth reads them at start, at
// `berth config check` and on SIGHUP, where a bad file must be refused with
// a reason, never crash the daemon.

import (
	"strings"
	"testing"
)

// FuzzParse parses any bytes as a configuration file over the embedded
// default and validates the result. No panic, and every error is one line
// (berth prints it as one log line, and `config check` as one message).
func FuzzParse(f *testing.F) {
	f.Add(DefaultYAML())
	for _, s := range []string{
		"", "listen: 127.0.0.1:5000\n", "listen: [\n", "tag_ttl: 5x\n", "cache:\n  size: 1.5TB\n",
		"cache:\n  size: -1\n", "nope: 1\n", "upstreams:\n  docker.io:\n    url: ftp://x\n",
		"s3:\n  bucket: b\n  advertise: \"http://\"\n", "a: &a [*a]\n", "log: {level: trace}\n",
		"upstreams: {\"bad host\": {url: \"http://x\"}}\n", "\t\n", "---\n---\n", "cache: {high_watermark: 2}\n",
		"shutdown_timeout: 9999999999999h\n", "fleet_listen: 127.0.0.1:5000\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := parse(b, Default(), "fuzz.yaml")
		if err != nil {
			oneLine(t, "parse", err)
			return
		}
		if err := c.Validate(); err != nil {
			oneLine(t, "validate", err)
		}
	})
}

func oneLine(t *testing.T, what string, err error) {
	t.Helper()
	if msg := err.Error(); msg == "" || strings.ContainsAny(msg, "\n\r") {
		t.Fatalf("%s error is not one line: %q", what, msg)
	}
}

package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestInspectorDefaults(t *testing.T) {
	c := Default()
	if !c.Inspector.Enabled || c.Inspector.Queue != 256 || c.Inspector.ShowEnvNames || len(c.Inspector.Watch) != 0 || len(c.Webhooks) != 0 {
		t.Fatalf("inspector defaults: %+v, webhooks %+v", c.Inspector, c.Webhooks)
	}
}

func TestInspectorSettings(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("k\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(writeFile(t, `
inspector:
  queue: 10
  show_env_names: true
  watch:
    - repository: docker.io/library/alpine
      tags: ["3.*", latest]
      interval: 1m
webhooks:
  - url: https://hooks.example/berth
    secret_file: `+secret+`
    events: [changed, deleted]
    repositories: ["docker.io/library/*"]
`))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	w := c.Inspector.Watch[0]
	if c.Inspector.Queue != 10 || !c.Inspector.ShowEnvNames || w.Repository != "docker.io/library/alpine" || len(w.Tags) != 2 || w.Interval.D() != time.Minute {
		t.Fatalf("inspector %+v", c.Inspector)
	}
	if h := c.Webhooks[0]; h.URL != "https://hooks.example/berth" || h.SecretFile != secret || len(h.Events) != 2 || h.Repositories[0] != "docker.io/library/*" {
		t.Fatalf("webhook %+v", h)
	}

	// Flags and variables.
	var o Overrides
	env := map[string]string{"BERTH_INSPECTOR_QUEUE": "7"}
	o.ReadEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err := o.Apply(c); err != nil || c.Inspector.Queue != 7 {
		t.Fatalf("BERTH_INSPECTOR_QUEUE: %v, queue %d", err, c.Inspector.Queue)
	}
	env = map[string]string{"BERTH_INSPECTOR": "false"}
	o = Overrides{}
	o.ReadEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err := o.Apply(c); err != nil || c.Inspector.Enabled {
		t.Fatalf("BERTH_INSPECTOR=false: %v, enabled %v", err, c.Inspector.Enabled)
	}
	env = map[string]string{"BERTH_INSPECTOR_QUEUE": "many"}
	o = Overrides{}
	o.ReadEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err := o.Apply(c); err == nil || !strings.HasPrefix(err.Error(), "$BERTH_INSPECTOR_QUEUE:") {
		t.Fatalf("a bad queue: %v", err)
	}
}

func TestInspectorValidation(t *testing.T) {
	cases := []struct{ body, want string }{
		{"inspector:\n  queue: 0\n", "inspector.queue: must be positive"},
		{"inspector:\n  watch:\n    - repository: alpine\n      tags: [x]\n      interval: 1m\n", `inspector.watch[0].repository: "alpine" is not UPSTREAM/NAME`},
		{"inspector:\n  watch:\n    - repository: quay.io/x/y\n      tags: [x]\n      interval: 1m\n", "quay.io is not one of the upstreams"},
		{"inspector:\n  watch:\n    - repository: docker.io/x\n      interval: 1m\n", "inspector.watch[0].tags: needs at least one"},
		{"inspector:\n  watch:\n    - repository: docker.io/x\n      tags: [\"[\"]\n      interval: 1m\n", "is not a pattern"},
		{"inspector:\n  watch:\n    - repository: docker.io/x\n      tags: [x]\n", "inspector.watch[0].interval: must be positive"},
		{"webhooks:\n  - url: ftp://x\n", `webhooks[0].url: "ftp://x" is not an http:// or https:// URL`},
		{"webhooks:\n  - url: http://x\n    events: [pushed]\n", `webhooks[0].events: "pushed" is not one of new, changed, deleted`},
		{"webhooks:\n  - url: http://x\n    secret_file: /nonexistent/secret\n", "webhooks[0].secret_file:"},
		{"inspector:\n  colour: red\n", `unknown key "colour"`},
	}
	for _, tc := range cases {
		c, err := Load(writeFile(t, tc.body))
		if err == nil {
			err = c.Validate()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want an error containing %q", tc.body, err, tc.want)
		}
	}
	empty := filepath.Join(t.TempDir(), "empty")
	os.WriteFile(empty, []byte("\n"), 0o600)
	c, _ := Load(writeFile(t, "webhooks:\n  - url: http://x\n    secret_file: "+empty+"\n"))
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "is empty") {
		t.Errorf("an empty secret file: %v", err)
	}
}

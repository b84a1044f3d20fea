package coordinator

import (
	"reflect"
	"strings"
	"testing"
)

func TestImageRefs(t *testing.T) {
	cases := []struct {
		name, in string
		want     []string
	}{
		{"deployment with init and sidecar", `
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      initContainers:
        - name: migrate
          image: ghcr.io/org/migrate:1.2
      containers:
        - name: web
          image: nginx:1.27
        - name: sidecar
          image: ghcr.io/org/proxy@sha256:0000000000000000000000000000000000000000000000000000000000000000
`, []string{"ghcr.io/org/migrate:1.2", "nginx:1.27", "ghcr.io/org/proxy@sha256:0000000000000000000000000000000000000000000000000000000000000000"}},
		{"multi-document: every workload kind", `
apiVersion: v1
kind: Pod
spec:
  containers: [{name: a, image: "a:1"}]
  ephemeralContainers: [{name: debug, image: "busybox:1.36"}]
---
apiVersion: batch/v1
kind: CronJob
spec:
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{name: c, image: "c:1"}]
---
# a comment-only document
---
apiVersion: apps/v1
kind: StatefulSet
spec: {template: {spec: {containers: [{name: s, image: "s:1"}, {name: a, image: "a:1"}]}}}
---
apiVersion: apps/v1
kind: DaemonSet
spec: {template: {spec: {containers: [{name: d, image: "d:1"}]}}}
---
apiVersion: batch/v1
kind: Job
spec: {template: {spec: {containers: [{name: j, image: "j:1"}]}}}
---
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: ReplicaSet
    spec: {template: {spec: {containers: [{name: r, image: "r:1"}]}}}
---
apiVersion: v1
kind: Service
spec: {ports: [{port: 80}]}
`, []string{"a:1", "busybox:1.36", "c:1", "s:1", "d:1", "j:1", "r:1"}},
		{"kubectl JSON", `{"apiVersion":"v1","kind":"Pod","spec":{"containers":[{"name":"x","image":"quay.io/x/y:2"}]}}`, []string{"quay.io/x/y:2"}},
		{"compose", `
services:
  web:
    image: nginx:1.27
    ports: ["80:80"]
  worker:
    build: .
  db:
    image: postgres:16
volumes:
  data: {}
`, []string{"nginx:1.27", "postgres:16"}},
		{"plain list", `
# the deploy's images
alpine:3.20
ghcr.io/org/app:v1

docker.io/library/redis:7
alpine:3.20
`, []string{"alpine:3.20", "ghcr.io/org/app:v1", "docker.io/library/redis:7"}},
		{"YAML list", "- a:1\n- b:2\n", []string{"a:1", "b:2"}},
	}
	for _, c := range cases {
		got, err := ImageRefs(strings.NewReader(c.in), c.name)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: got %q, want %q", c.name, got, c.want)
		}
	}
}

func TestImageRefsErrors(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"apiVersion: v1\nkind: Service\nspec: {}\n", "no image references"},
		{"", "no image references"},
		{"apiVersion: v1\nkind: Pod\nspec:\n  containers: [\n", "deploy.yaml: document 1: line"},
		{"a: 1\n---\nkind: [\n", "document 2"},
	} {
		_, err := ImageRefs(strings.NewReader(c.in), "deploy.yaml")
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want one containing %q", c.in, err, c.want)
		}
	}
}

func TestPolicy(t *testing.T) {
	for _, c := range []struct {
		s         string
		ok, total int
		met       bool
	}{
		{"all", 5, 5, true}, {"all", 4, 5, false}, {"", 1, 1, true},
		{"3", 3, 5, true}, {"3", 2, 5, false}, {"6", 5, 5, false},
		{"80%", 4, 5, true}, {"80%", 3, 5, false}, {"50%", 2, 3, true}, {"51%", 1, 2, false},
		{"100%", 5, 5, true}, {"all", 0, 0, false},
	} {
		p, err := ParsePolicy(c.s)
		if err != nil {
			t.Fatalf("%q: %v", c.s, err)
		}
		if got := p.Met(c.ok, c.total); got != c.met {
			t.Errorf("--require %s with %d/%d: %v, want %v", c.s, c.ok, c.total, got, c.met)
		}
	}
	for _, bad := range []string{"0", "-1", "0%", "101%", "x", "1.5", "%"} {
		if _, err := ParsePolicy(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestParseReference(t *testing.T) {
	for _, c := range []struct{ in, repo, tag, dg string }{
		{"alpine", "docker.io/library/alpine", "latest", ""},
		{"alpine:3.20", "docker.io/library/alpine", "3.20", ""},
		{"127.0.0.1:5000/org/app:v1", "127.0.0.1:5000/org/app", "v1", ""},
		{"ghcr.io/org/app@sha256:0000000000000000000000000000000000000000000000000000000000000000", "ghcr.io/org/app", "", "sha256:0000000000000000000000000000000000000000000000000000000000000000"},
	} {
		repo, tag, d, err := ParseReference(c.in)
		if err != nil || repo != c.repo || tag != c.tag || string(d) != c.dg {
			t.Errorf("%s: %s %s %s %v", c.in, repo, tag, d, err)
		}
	}
	for _, bad := range []string{"", "org/App", "a b", "x@sha256:12"} {
		if _, _, _, err := ParseReference(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

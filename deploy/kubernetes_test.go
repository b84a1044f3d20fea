package deploy

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	ktypes "sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/berth-dev/berth/config"
)

const kubeDir = "kubernetes"

// decodeStrict reads one manifest into its Kubernetes API type; a field the
// type does not have (a typo, a wrong indentation, a wrong case) or a field
// given twice is an error, as for kubectl apply --validate=strict. Like the
// API server, it matches field names case-sensitively, which encoding/json
// (and so yaml.UnmarshalStrict) does not.
func decodeStrict(doc []byte) (any, error) {
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(doc, &meta); err != nil {
		return nil, err
	}
	var obj any
	switch meta.APIVersion + " " + meta.Kind {
	case "apps/v1 DaemonSet":
		obj = &appsv1.DaemonSet{}
	case "apps/v1 Deployment":
		obj = &appsv1.Deployment{}
	case "v1 Service":
		obj = &corev1.Service{}
	case "v1 ConfigMap":
		obj = &corev1.ConfigMap{}
	case "v1 Namespace":
		obj = &corev1.Namespace{}
	case "v1 ServiceAccount":
		obj = &corev1.ServiceAccount{}
	case "monitoring.coreos.com/v1 ServiceMonitor":
		obj = &monitoringv1.ServiceMonitor{}
	default:
		return nil, fmt.Errorf("no API type known for %s %s", meta.APIVersion, meta.Kind)
	}
	if err := strictYAML(doc, obj); err != nil {
		return nil, fmt.Errorf("%s: %v", meta.Kind, err)
	}
	return obj, nil
}

func strictYAML(doc []byte, obj any) error {
	j, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return err
	}
	strict, err := kjson.UnmarshalStrict(j, obj, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err == nil && len(strict) > 0 {
		err = errors.Join(strict...)
	}
	return err
}

func splitYAML(b []byte) [][]byte {
	var docs [][]byte
	for _, d := range bytes.Split(b, []byte("\n---")) {
		if len(bytes.TrimSpace(d)) > 0 {
			docs = append(docs, d)
		}
	}
	return docs
}

// Every file under deploy/kubernetes parses strictly: manifests and patches
// as their API types, kustomizations as kustomize's, config.yml as berth's
// own configuration. Files a kustomization names must exist.
func TestKubernetesFilesParseStrictly(t *testing.T) {
	seen := 0
	err := filepath.WalkDir(kubeDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		seen++
		switch name := d.Name(); {
		case name == "kustomization.yaml":
			var k ktypes.Kustomization
			if err := strictYAML(b, &k); err != nil {
				t.Errorf("%s: %v", path, err)
				return nil
			}
			var refs []string
			refs = append(refs, k.Resources...)
			for _, p := range k.Patches {
				refs = append(refs, p.Path)
			}
			for _, g := range k.ConfigMapGenerator {
				refs = append(refs, g.FileSources...)
				refs = append(refs, g.EnvSources...)
			}
			for _, r := range refs {
				if _, err := os.Stat(filepath.Join(filepath.Dir(path), r)); err != nil {
					t.Errorf("%s names %s: %v", path, r, err)
				}
			}
		case name == "config.yml":
			c, err := config.Load(path)
			if err == nil {
				err = c.Validate()
			}
			if err != nil {
				t.Errorf("%s: %v", path, err)
			}
		case strings.HasSuffix(name, ".yaml"):
			for _, doc := range splitYAML(b) {
				if _, err := decodeStrict(doc); err != nil {
					t.Errorf("%s: %v", path, err)
				}
			}
		case strings.HasSuffix(name, ".env"):
			for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
				k, _, _ := strings.Cut(line, "=")
				if _, ok := config.EnvNames()[k]; !ok {
					t.Errorf("%s: berth does not read %s", path, k)
				}
			}
		default:
			t.Errorf("%s: unexpected file; teach this test to check it", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen < 10 {
		t.Fatalf("checked only %d files under %s", seen, kubeDir)
	}
}

// The strict decoding above must reject what the API server would.
func TestDecodeStrictRejectsUnknownFields(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(kubeDir, "base", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, typo := range [][2]string{
		{"hostNetwork: true", "hostNetwrok: true"},
		{"readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true"},
		{"path: /readyz", "pathh: /readyz"},
	} {
		bad := strings.Replace(string(b), typo[0], typo[1], 1)
		if bad == string(b) {
			t.Fatalf("daemonset.yaml no longer contains %q; update this test", typo[0])
		}
		if _, err := decodeStrict([]byte(bad)); err == nil {
			t.Errorf("decodeStrict accepted %q", typo[1])
		}
	}
}

type rendered struct {
	ds       *appsv1.DaemonSet
	svc      *corev1.Service
	cms      map[string]*corev1.ConfigMap
	monitors []*monitoringv1.ServiceMonitor
	kinds    []string
}

// render builds a kustomization the way `kubectl apply -k` does, and
// decodes every resulting object strictly.
func render(t *testing.T, dir string) rendered {
	t.Helper()
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), filepath.Join(kubeDir, dir))
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	r := rendered{cms: map[string]*corev1.ConfigMap{}}
	for _, res := range m.Resources() {
		b, err := res.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		obj, err := decodeStrict(b)
		if err != nil {
			t.Fatalf("%s: rendered %s: %v", dir, res.GetKind(), err)
		}
		if ns := res.GetNamespace(); res.GetKind() != "Namespace" && ns != "berth" {
			t.Errorf("%s: %s %s is in namespace %q, want berth", dir, res.GetKind(), res.GetName(), ns)
		}
		r.kinds = append(r.kinds, res.GetKind())
		switch o := obj.(type) {
		case *appsv1.DaemonSet:
			r.ds = o
		case *corev1.Service:
			r.svc = o
		case *corev1.ConfigMap:
			r.cms[o.Name] = o
		case *monitoringv1.ServiceMonitor:
			r.monitors = append(r.monitors, o)
		}
	}
	if r.ds == nil || r.svc == nil {
		t.Fatalf("%s renders %v: no DaemonSet or Service", dir, r.kinds)
	}
	return r
}

func container(t *testing.T, ps corev1.PodSpec, name string, init bool) *corev1.Container {
	t.Helper()
	list := ps.Containers
	if init {
		list = ps.InitContainers
	}
	for i := range list {
		if list[i].Name == name {
			return &list[i]
		}
	}
	t.Fatalf("no container %q", name)
	return nil
}

// berthConfig is config.yml from the ConfigMap the DaemonSet mounts, as
// berth would load it, with the environment the container gets on top.
func berthConfig(t *testing.T, r rendered, env map[string]string) (*config.Config, string) {
	t.Helper()
	var cmName string
	for _, v := range r.ds.Spec.Template.Spec.Volumes {
		if v.Name == "config" && v.ConfigMap != nil {
			cmName = v.ConfigMap.Name
		}
	}
	cm := r.cms[cmName]
	if cm == nil {
		t.Fatalf("the DaemonSet mounts ConfigMap %q, which the build does not contain", cmName)
	}
	path := filepath.Join(t.TempDir(), "config.yml")
	if err := os.WriteFile(path, []byte(cm.Data["config.yml"]), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	var o config.Overrides
	o.ReadEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err := o.Apply(c); err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	return c, path
}

func TestBaseRendersANodeLocalMirror(t *testing.T) {
	r := render(t, "base")
	ps := r.ds.Spec.Template.Spec
	b := container(t, ps, "berth", false)
	cfg, _ := berthConfig(t, r, nil)

	if !ps.HostNetwork || ps.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("hostNetwork %v, dnsPolicy %q: want the node's network with cluster DNS", ps.HostNetwork, ps.DNSPolicy)
	}
	if cfg.Listen != "127.0.0.1:5000" {
		t.Errorf("berth listens on %s, want the node's loopback 127.0.0.1:5000", cfg.Listen)
	}
	if ps.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q", ps.PriorityClassName)
	}
	everywhere := false
	for _, tol := range ps.Tolerations {
		everywhere = everywhere || (tol.Key == "" && tol.Operator == corev1.TolerationOpExists && tol.Effect == "")
	}
	if !everywhere {
		t.Errorf("tolerations %+v do not tolerate every taint", ps.Tolerations)
	}
	if g := ps.TerminationGracePeriodSeconds; g == nil || float64(*g) <= cfg.ShutdownTimeout.D().Seconds() {
		t.Errorf("terminationGracePeriodSeconds %v does not outlast shutdown_timeout %v", g, cfg.ShutdownTimeout)
	}

	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{{"readiness", b.ReadinessProbe, "/readyz"}, {"liveness", b.LivenessProbe, "/healthz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s probe: want an HTTP GET", p.name)
			continue
		}
		g := p.probe.HTTPGet
		if addr := fmt.Sprintf("%s:%s", g.Host, g.Port.String()); g.Path != p.path || addr != cfg.Listen {
			t.Errorf("%s probe GET %s%s, want %s%s where berth listens", p.name, addr, g.Path, cfg.Listen, p.path)
		}
	}
	for _, res := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		if _, ok := b.Resources.Requests[res]; !ok {
			t.Errorf("no %s request", res)
		}
	}
	if _, ok := b.Resources.Limits[corev1.ResourceMemory]; !ok {
		t.Error("no memory limit")
	}
	for _, c := range append([]corev1.Container{*b}, ps.InitContainers...) {
		sc := c.SecurityContext
		if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
			sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
			sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0 {
			t.Errorf("container %s: securityContext %+v: want a read-only root, no privilege escalation, all capabilities dropped", c.Name, sc)
		}
	}
	if ps.SecurityContext == nil || ps.SecurityContext.SeccompProfile == nil || ps.SecurityContext.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Error("no RuntimeDefault seccomp profile")
	}

	// The cache: a hostPath mounted where the config puts berth's data.
	mounts := map[string]string{}
	for _, m := range b.VolumeMounts {
		mounts[m.Name] = m.MountPath
	}
	var cache *corev1.HostPathVolumeSource
	for _, v := range ps.Volumes {
		if v.Name == "cache" {
			cache = v.HostPath
		}
	}
	if cache == nil || cache.Path != "/var/lib/berth" || mounts["cache"] != cfg.Data {
		t.Errorf("cache volume %+v mounted at %q; config data is %q", cache, mounts["cache"], cfg.Data)
	}
	if !slices.Equal(b.Args, []string{"serve", "--config", mounts["config"] + "/config.yml"}) {
		t.Errorf("berth args %q do not serve the mounted config", b.Args)
	}

	// The headless Service selects exactly the DaemonSet's pods.
	if r.svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("Service clusterIP %q, want None (headless, for SRV records)", r.svc.Spec.ClusterIP)
	}
	for k, v := range r.svc.Spec.Selector {
		if r.ds.Spec.Template.Labels[k] != v {
			t.Errorf("Service selector %s=%s does not match the pods' labels %v", k, v, r.ds.Spec.Template.Labels)
		}
	}
	if len(r.svc.Spec.Selector) == 0 || len(r.svc.Spec.Ports) != 1 || r.svc.Spec.Ports[0].Port != 5000 || r.svc.Spec.Ports[0].Name == "" {
		t.Errorf("Service spec %+v: want a selector and one named port 5000", r.svc.Spec)
	}
	if len(r.monitors) != 0 {
		t.Error("the base must not need the Prometheus Operator's CRDs")
	}
}

// The init container's command line, run for real against the rendered
// config, writes a hosts.toml per upstream that points at berth's listener.
func TestInitContainerConfiguresContainerd(t *testing.T) {
	r := render(t, "base")
	ps := r.ds.Spec.Template.Spec
	ic := container(t, ps, "configure-containerd", true)
	cfg, cfgPath := berthConfig(t, r, nil)
	var hostDir string
	for _, m := range ic.VolumeMounts {
		for _, v := range ps.Volumes {
			if v.Name == m.Name && v.HostPath != nil && v.HostPath.Path == "/etc/containerd/certs.d" {
				hostDir = m.MountPath
			}
		}
	}
	if hostDir == "" {
		t.Fatal("the init container does not mount the node's /etc/containerd/certs.d")
	}
	if len(ic.Command) != 1 || ic.Command[0] != "/berth" || ic.Image != container(t, ps, "berth", false).Image {
		t.Fatalf("init container %q %q: want /berth from the berth image", ic.Image, ic.Command)
	}
	certs := t.TempDir()
	args := slices.Clone(ic.Args)
	for i, a := range args {
		switch a {
		case "/etc/berth/config.yml":
			args[i] = cfgPath
		case hostDir:
			args[i] = certs
		}
	}
	if !slices.Contains(args, certs) || !slices.Contains(args, cfgPath) || !slices.Contains(args, "--write") {
		t.Fatalf("init args %q: want --write, --config and --dir %s", ic.Args, hostDir)
	}
	res := run(t, nil, args...)
	if res.code != 0 {
		t.Fatalf("berth %s: exit %d\n%s", strings.Join(args, " "), res.code, res.stderr)
	}
	for _, h := range cfg.UpstreamHosts() {
		b, err := os.ReadFile(filepath.Join(certs, h, "hosts.toml"))
		if err != nil || !strings.Contains(string(b), `[host."http://`+cfg.Listen+`"]`) {
			t.Errorf("%s/hosts.toml: %v\n%s", h, err, b)
		}
	}
}

func TestS3OverlayConfiguresTheSharedCache(t *testing.T) {
	r := render(t, "overlays/s3")
	b := container(t, r.ds.Spec.Template.Spec, "berth", false)
	secret := false
	for _, src := range b.EnvFrom {
		if src.SecretRef != nil {
			secret = src.SecretRef.Name != "" && src.SecretRef.Optional != nil && *src.SecretRef.Optional
		}
	}
	if !secret {
		t.Error("no optional Secret for the S3 credentials")
	}
	cfg, _ := berthConfig(t, r, containerEnv(t, r, b))
	if cfg.S3.Bucket == "" || cfg.S3.Region == "" {
		t.Fatalf("S3 not configured: %+v", cfg.S3)
	}
	// The base is kept: still a loopback mirror.
	if cfg.Listen != "127.0.0.1:5000" || !r.ds.Spec.Template.Spec.HostNetwork {
		t.Errorf("the overlay changed the base: listen %s", cfg.Listen)
	}
	checkFleetPort(t, r, cfg)
}

func TestMonitoringOverlayIsScrapeable(t *testing.T) {
	r := render(t, "overlays/monitoring")
	if len(r.monitors) != 1 {
		t.Fatalf("%d ServiceMonitors", len(r.monitors))
	}
	sm := r.monitors[0]
	for k, v := range sm.Spec.Selector.MatchLabels {
		if r.svc.Labels[k] != v {
			t.Errorf("ServiceMonitor selects %s=%s; the Service has labels %v", k, v, r.svc.Labels)
		}
	}
	b := container(t, r.ds.Spec.Template.Spec, "berth", false)
	cfg, _ := berthConfig(t, r, containerEnv(t, r, b))
	// The registry stays on the node's loopback; Prometheus scrapes the
	// fleet port, which is on the node IP (the pod IP under hostNetwork).
	if cfg.Listen != "127.0.0.1:5000" {
		t.Errorf("berth's registry listens on %s, want the node's loopback 127.0.0.1:5000", cfg.Listen)
	}
	checkFleetPort(t, r, cfg)
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "fleet" || sm.Spec.Endpoints[0].Path != "/metrics" {
		t.Errorf("ServiceMonitor endpoints %+v: want the Service's port fleet, /metrics", sm.Spec.Endpoints)
	}
	if cfg.Fleet.MetricsAuth && sm.Spec.Endpoints[0].Authorization == nil {
		t.Errorf("/metrics needs the fleet token (fleet.metrics_auth), and the ServiceMonitor sends none")
	}
}

// nodeIP stands for the node's address, which the downward API gives the
// pod as status.hostIP.
const nodeIP = "10.0.3.7"

// containerEnv is the environment kubelet gives container c: its envFrom
// ConfigMaps, then its env entries with $(VAR) references expanded, the
// downward API's status.hostIP as nodeIP. A variable naming a file in a
// mounted Secret (BERTH_FLEET_TOKEN_FILE) is pointed at a file holding
// what such a Secret would.
func containerEnv(t *testing.T, r rendered, c *corev1.Container) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, src := range c.EnvFrom {
		if src.ConfigMapRef != nil {
			cm := r.cms[src.ConfigMapRef.Name]
			if cm == nil {
				t.Fatalf("envFrom ConfigMap %q is not in the build", src.ConfigMapRef.Name)
			}
			for k, v := range cm.Data {
				env[k] = v
			}
		}
	}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			v := e.Value
			for k, val := range env {
				v = strings.ReplaceAll(v, "$("+k+")", val)
			}
			if strings.Contains(v, "$(") {
				t.Errorf("env %s=%q refers to a variable not defined before it", e.Name, e.Value)
			}
			env[e.Name] = v
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP":
			env[e.Name] = nodeIP
		default:
			t.Fatalf("env %s: no value known for %+v", e.Name, e.ValueFrom)
		}
	}
	if path, ok := env["BERTH_FLEET_TOKEN_FILE"]; ok {
		secret := secretMountedAt(t, r, c, path)
		if secret != "berth-fleet" {
			t.Errorf("fleet token file %s is not in a mounted Secret berth-fleet (%q)", path, secret)
		}
		tokens := filepath.Join(t.TempDir(), "tokens")
		if err := os.WriteFile(tokens, []byte("3f1c9b0e6a2d4f7c8e1b5a9d0c3e6f2a\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		env["BERTH_FLEET_TOKEN_FILE"] = tokens
	}
	return env
}

// secretMountedAt names the Secret whose volume c mounts at path's
// directory, or "".
func secretMountedAt(t *testing.T, r rendered, c *corev1.Container, path string) string {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if filepath.Dir(path) != m.MountPath {
			continue
		}
		for _, v := range r.ds.Spec.Template.Spec.Volumes {
			if v.Name == m.Name && v.Secret != nil {
				return v.Secret.SecretName
			}
		}
	}
	return ""
}

// checkFleetPort: the fleet port listens on the node IP, is what the node
// advertises to its peers, is declared as the container's port fleet and
// the Service's, and needs the token.
func checkFleetPort(t *testing.T, r rendered, cfg *config.Config) {
	t.Helper()
	if cfg.FleetListen != nodeIP+":5001" {
		t.Errorf("fleet_listen %q, want the node IP's port 5001 (%s:5001)", cfg.FleetListen, nodeIP)
	}
	if cfg.S3.Advertise != "http://"+nodeIP+":5001" {
		t.Errorf("s3.advertise %q, want the fleet port http://%s:5001", cfg.S3.Advertise, nodeIP)
	}
	if cfg.Fleet.TokenFile == "" {
		t.Error("no fleet token file")
	}
	b := container(t, r.ds.Spec.Template.Spec, "berth", false)
	declared := false
	for _, p := range b.Ports {
		declared = declared || (p.Name == "fleet" && p.ContainerPort == 5001 && p.HostPort == 5001)
	}
	if !declared {
		t.Errorf("container ports %+v: no port fleet 5001", b.Ports)
	}
	inService := false
	for _, p := range r.svc.Spec.Ports {
		inService = inService || (p.Name == "fleet" && p.Port == 5001 && p.TargetPort.StrVal == "fleet")
	}
	if !inService || len(r.svc.Spec.Ports) != 2 {
		t.Errorf("Service ports %+v: want registry and fleet", r.svc.Spec.Ports)
	}
}

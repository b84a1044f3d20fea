package deploy

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	"github.com/berth-dev/berth/config"
)

// The prewarm overlay: the coordinator's Deployment and Service beside the
// DaemonSet, both reading the token Secret berth-prewarm, the coordinator
// finding the nodes through the headless Service's SRV records of the
// fleet port, and every flag it is given one that berth coordinator has.
func TestPrewarmOverlayRendersTheCoordinator(t *testing.T) {
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), filepath.Join(kubeDir, "overlays", "prewarm"))
	if err != nil {
		t.Fatalf("kustomize build: %v", err)
	}
	var ds *appsv1.DaemonSet
	var dep *appsv1.Deployment
	svcs := map[string]*corev1.Service{}
	cms := map[string]bool{}
	for _, res := range m.Resources() {
		b, err := res.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		obj, err := decodeStrict(b)
		if err != nil {
			t.Fatalf("rendered %s: %v", res.GetKind(), err)
		}
		if ns := res.GetNamespace(); res.GetKind() != "Namespace" && ns != "berth" {
			t.Errorf("%s %s in namespace %q", res.GetKind(), res.GetName(), ns)
		}
		switch o := obj.(type) {
		case *appsv1.DaemonSet:
			ds = o
		case *appsv1.Deployment:
			dep = o
		case *corev1.Service:
			svcs[o.Name] = o
		case *corev1.ConfigMap:
			cms[strings.TrimSuffix(o.Name, "-"+lastPart(o.Name))] = true
			cms[o.Name] = true
		}
	}
	if ds == nil || dep == nil {
		t.Fatalf("DaemonSet %v, Deployment %v", ds != nil, dep != nil)
	}
	if dep.Name != "berth-coordinator" {
		t.Errorf("Deployment %s", dep.Name)
	}
	ps := dep.Spec.Template.Spec
	if len(ps.Containers) != 1 {
		t.Fatalf("coordinator pod has %d containers", len(ps.Containers))
	}
	c := ps.Containers[0]
	dsBerth := container(t, ds.Spec.Template.Spec, "berth", false)
	if c.Image != dsBerth.Image || !strings.HasPrefix(c.Image, "ghcr.io/berth-dev/berth") {
		t.Errorf("coordinator image %q, DaemonSet's %q: want the same berth image", c.Image, dsBerth.Image)
	}
	if len(c.Args) == 0 || c.Args[0] != "coordinator" {
		t.Fatalf("args %q: want berth coordinator", c.Args)
	}
	arg := func(name string) string {
		i := slices.Index(c.Args, name)
		if i < 0 || i+1 >= len(c.Args) {
			t.Fatalf("args %q lack %s", c.Args, name)
		}
		return c.Args[i+1]
	}
	// Every flag exists: berth coordinator --help lists it.
	help := run(t, nil, "coordinator", "--help")
	for _, a := range c.Args[1:] {
		if strings.HasPrefix(a, "--") && !strings.Contains(help.stderr, "  -"+strings.TrimPrefix(a, "--")+" ") {
			t.Errorf("berth coordinator has no flag %s:\n%s", a, help.stderr)
		}
	}
	// The nodes: SRV records of the headless Service's fleet port.
	nodeSvc := svcs["berth"]
	if nodeSvc == nil {
		t.Fatal("no berth Service")
	}
	var fleetPort string
	for _, p := range nodeSvc.Spec.Ports {
		if p.Port == 5001 {
			fleetPort = p.Name
		}
	}
	if want := "_" + fleetPort + "._tcp." + nodeSvc.Name + "." + nodeSvc.Namespace + ".svc.cluster.local"; fleetPort == "" || arg("--nodes-dns") != want {
		t.Errorf("--nodes-dns %q, want %q (the fleet port's SRV name)", arg("--nodes-dns"), want)
	}
	// One Secret for both sides: the nodes accept what the coordinator sends.
	secretMount := func(ps corev1.PodSpec, ctr *corev1.Container, file string) string {
		for _, vm := range ctr.VolumeMounts {
			if strings.HasPrefix(file, vm.MountPath+"/") {
				for _, v := range ps.Volumes {
					if v.Name == vm.Name && v.Secret != nil {
						return v.Secret.SecretName
					}
				}
			}
		}
		return ""
	}
	if s := secretMount(ps, &c, arg("--token-file")); s != "berth-prewarm" {
		t.Errorf("--token-file %s is not from the Secret berth-prewarm (%q)", arg("--token-file"), s)
	}
	if arg("--api-token-file") != arg("--token-file") {
		t.Errorf("--api-token-file %s", arg("--api-token-file"))
	}
	var admin string
	for _, e := range dsBerth.Env {
		if e.Name == "BERTH_ADMIN_TOKEN_FILE" {
			admin = e.Value
		}
	}
	if _, ok := config.EnvNames()["BERTH_ADMIN_TOKEN_FILE"]; !ok || admin == "" {
		t.Fatalf("the DaemonSet sets no BERTH_ADMIN_TOKEN_FILE (%q) that berth reads", admin)
	}
	if s := secretMount(ds.Spec.Template.Spec, dsBerth, admin); s != "berth-prewarm" {
		t.Errorf("the nodes' admin token %s is not from the Secret berth-prewarm (%q)", admin, s)
	}
	// The bucket: the s3 overlay's ConfigMap, whose BERTH_S3_* the coordinator reads.
	found := false
	for _, ef := range c.EnvFrom {
		if ef.ConfigMapRef != nil && strings.HasPrefix(ef.ConfigMapRef.Name, "berth-s3") {
			found = cms[ef.ConfigMapRef.Name]
		}
	}
	if !found {
		t.Errorf("the coordinator does not get the berth-s3 ConfigMap of the build: %+v", c.EnvFrom)
	}
	// The coordinator's Service selects its pods and not the nodes'.
	svc := svcs["berth-coordinator"]
	if svc == nil {
		t.Fatal("no berth-coordinator Service")
	}
	matches := func(sel, labels map[string]string) bool {
		for k, v := range sel {
			if labels[k] != v {
				return false
			}
		}
		return len(sel) > 0
	}
	if !matches(svc.Spec.Selector, dep.Spec.Template.Labels) || matches(svc.Spec.Selector, ds.Spec.Template.Labels) {
		t.Errorf("Service selector %v: coordinator labels %v, node labels %v", svc.Spec.Selector, dep.Spec.Template.Labels, ds.Spec.Template.Labels)
	}
	if matches(nodeSvc.Spec.Selector, dep.Spec.Template.Labels) {
		t.Errorf("the nodes' Service %v also selects the coordinator", nodeSvc.Spec.Selector)
	}
	if !matches(dep.Spec.Selector.MatchLabels, dep.Spec.Template.Labels) {
		t.Errorf("Deployment selector %v does not match its pods %v", dep.Spec.Selector.MatchLabels, dep.Spec.Template.Labels)
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].TargetPort.StrVal != "api" || len(c.Ports) != 1 || c.Ports[0].Name != "api" || !strings.HasSuffix(arg("--listen"), ":5002") || c.Ports[0].ContainerPort != 5002 {
		t.Errorf("ports: Service %+v, container %+v, --listen %s", svc.Spec.Ports, c.Ports, arg("--listen"))
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Port.StrVal != "api" {
		t.Errorf("readiness probe %+v", c.ReadinessProbe)
	}
	sc := c.SecurityContext
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("securityContext %+v", sc)
	}
}

func lastPart(s string) string {
	i := strings.LastIndex(s, "-")
	if i < 0 {
		return ""
	}
	return s[i+1:]
}

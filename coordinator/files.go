package coordinator

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"gopkg.in/yaml.v3"
)

// ImageRefs reads the image references of a deploy from one file (name is
// for errors): Kubernetes manifests of any kind (multi-document YAML or
// JSON, kustomize and helm template output, List objects; containers,
// initContainers and ephemeralContainers wherever a pod spec sits), Docker
// Compose files (services.*.image), or a plain list (one reference a line,
// # comments and blank lines skipped). References come back in file
// order, each once.
func ImageRefs(r io.Reader, name string) ([]string, error) {
	b, err := io.ReadAll(io.LimitReader(r, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("%s: %v", name, err)
	}
	var refs []string
	if plain, ok := plainList(b); ok {
		refs = plain
	} else if refs, err = yamlRefs(b, name); err != nil {
		return nil, err
	}
	out := dedupe(refs)
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no image references found (expected Kubernetes manifests, a Compose file or one reference a line)", name)
	}
	return out, nil
}

func dedupe(refs []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, r := range refs {
		r = strings.TrimSpace(r)
		if r != "" && !seen[r] {
			seen[r] = true
			out = append(out, r)
		}
	}
	return out
}

// plainList reads a file of one reference a line; false when the file
// looks like YAML or JSON.
func plainList(b []byte) ([]string, bool) {
	var refs []string
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.ContainsAny(line, " \t{}[],\"'") || strings.HasSuffix(line, ":") || strings.HasPrefix(line, "-") {
			return nil, false
		}
		refs = append(refs, line)
	}
	return refs, len(refs) > 0
}

// podSpecKeys hold container lists in a pod spec.
var podSpecKeys = map[string]bool{"containers": true, "initContainers": true, "ephemeralContainers": true}

func yamlRefs(b []byte, name string) ([]string, error) {
	dec := yaml.NewDecoder(bytes.NewReader(b))
	var refs []string
	for doc := 1; ; doc++ {
		var n yaml.Node
		err := dec.Decode(&n)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %s", name, doc, strings.TrimPrefix(err.Error(), "yaml: "))
		}
		if len(n.Content) == 0 {
			continue
		}
		root := n.Content[0]
		switch root.Kind {
		case yaml.SequenceNode: // a YAML list of references
			for _, it := range root.Content {
				if it.Kind == yaml.ScalarNode {
					refs = append(refs, it.Value)
				}
			}
			continue
		case yaml.ScalarNode:
			continue
		}
		if svc := mapValue(root, "services"); svc != nil && mapValue(root, "kind") == nil && svc.Kind == yaml.MappingNode {
			// Compose: services.NAME.image; a service built locally has none.
			for i := 1; i < len(svc.Content); i += 2 {
				if img := mapValue(svc.Content[i], "image"); img != nil && img.Kind == yaml.ScalarNode {
					refs = append(refs, img.Value)
				}
			}
			continue
		}
		refs = append(refs, walkContainers(root)...)
	}
	return refs, nil
}

func mapValue(n *yaml.Node, key string) *yaml.Node {
	if n == nil || n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i+1]
		}
	}
	return nil
}

// walkContainers finds every containers / initContainers /
// ephemeralContainers list anywhere in a Kubernetes object (Pod,
// Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, List,
// custom resources that embed a pod template) and returns their images.
func walkContainers(n *yaml.Node) []string {
	var out []string
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i].Value, n.Content[i+1]
			if podSpecKeys[k] && v.Kind == yaml.SequenceNode {
				for _, c := range v.Content {
					if img := mapValue(c, "image"); img != nil && img.Kind == yaml.ScalarNode {
						out = append(out, img.Value)
					}
				}
				continue
			}
			out = append(out, walkContainers(v)...)
		}
	case yaml.SequenceNode:
		for _, c := range n.Content {
			out = append(out, walkContainers(c)...)
		}
	}
	return out
}

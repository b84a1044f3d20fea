package deploy

import (
	"fmt"
	"net/url"
	"reflect"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// planCRIO writes registries.conf mirror entries (containers-registries.conf
// v2 format, read by CRI-O and podman). The mirror location carries the
// registry as its first path component, 127.0.0.1:5000/docker.io, so
// requests arrive as /v2/docker.io/library/... and berth routes them by it.
func planCRIO(t Target, path string, read ReadFunc) ([]File, []string, error) {
	old, err := readExisting(read, path)
	if err != nil {
		return nil, nil, err
	}
	content := old
	var notes []string
	for _, h := range t.Hosts() {
		if strings.Contains(h, ":") {
			// 127.0.0.1:5000/registry.test:5001/app parses as a tag, so
			// containers/image rejects such a mirror location.
			notes = append(notes, fmt.Sprintf("skipped %s: a mirror location cannot carry a registry with a port; pull it as %s/%s/IMAGE instead", h, t.Addr(), h))
			continue
		}
		content, err = mergeRegistriesConf(path, content, h, t.Upstreams[h], t)
		if err != nil {
			return nil, nil, err
		}
	}
	if content == nil {
		return nil, nil, fmt.Errorf("no upstream registry can be configured for CRI-O (%s)", strings.Join(notes, "; "))
	}
	notes = append(notes,
		"apply with `systemctl reload crio` (or restart it); podman reads the file on each run",
		"a [[registry]] with the same prefix in /etc/containers/registries.conf is replaced by this drop-in; if you keep mirrors there, merge into that file with --file instead")
	return []File{newFile(path, old, content)}, notes, nil
}

// registriesConf is the part of registries.conf berth reads.
type registriesConf struct {
	Registries any `toml:"registries"` // the v1 format's table
	Registry   []struct {
		Prefix   string `toml:"prefix"`
		Location string `toml:"location"`
		Mirror   []struct {
			Location string `toml:"location"`
		} `toml:"mirror"`
	} `toml:"registry"`
}

// registryLocation is where CRI-O goes when berth is down: the registry
// itself, or berth's upstream for it when that is somewhere else.
func registryLocation(host, upstream string) (location string, insecure bool) {
	if strings.TrimSuffix(upstream, "/") == canonicalEndpoint(host) {
		return host, false
	}
	u, _ := url.Parse(upstream)
	return u.Host + strings.TrimSuffix(u.Path, "/"), u.Scheme == "http"
}

func crioMirrorBlock(t Target, host string) string {
	return "[[registry.mirror]]\n" +
		"# berth, the pull-through mirror on this node; written by `berth configure crio`\n" +
		"location = " + tomlString(t.Addr()+"/"+host) + "\n" +
		"insecure = true\n"
}

func crioRegistryBlock(t Target, host, upstream string) string {
	loc, insecure := registryLocation(host, upstream)
	s := "[[registry]]\nprefix = " + tomlString(host) + "\nlocation = " + tomlString(loc) + "\n"
	if insecure {
		s += "insecure = true\n"
	}
	return s + "\n" + crioMirrorBlock(t, host)
}

// mergeRegistriesConf makes berth the first mirror of host's [[registry]],
// adding the registry when the file has none for it.
func mergeRegistriesConf(path string, old []byte, host, upstream string, t Target) ([]byte, error) {
	mirror := t.Addr() + "/" + host
	if len(strings.TrimSpace(string(old))) == 0 {
		return []byte("# CRI-O and podman: pull through berth, the mirror on this node, then from the registry.\n\n" +
			crioRegistryBlock(t, host, upstream)), nil
	}
	doc, err := parseTOML(path, old)
	if err != nil {
		return nil, err
	}
	var conf registriesConf
	if err := toml.Unmarshal(old, &conf); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	if conf.Registries != nil {
		return nil, fmt.Errorf("%s: uses the v1 [registries] format, which cannot be mixed with berth's [[registry]] entries; convert it to v2 first", path)
	}
	// The i-th [[registry]] header is conf.Registry[i], unless the array is
	// also written inline, which berth does not edit.
	var headers []int
	for i, e := range doc.entries {
		if e.table && e.array && e.is("registry") {
			headers = append(headers, i)
		}
	}
	if len(headers) != len(conf.Registry) {
		return nil, fmt.Errorf("%s: registries are written in a form berth cannot edit (inline [[registry]] arrays); edit the file by hand", path)
	}
	idx := -1
	for i, r := range conf.Registry {
		prefix := r.Prefix
		if prefix == "" {
			prefix = r.Location
		}
		if prefix == host {
			idx = i
		}
	}
	var e edit
	switch {
	case idx < 0:
		e = appendBlock(old, crioRegistryBlock(t, host, upstream))
	default:
		for _, m := range conf.Registry[idx].Mirror {
			if m.Location == mirror {
				return old, nil
			}
		}
		h := headers[idx]
		inRegistry := func(x tomlEntry) bool { return x.under("registry") && !x.is("registry") }
		end, next := doc.tableEnd(h, inRegistry)
		e = edit{start: end, end: end, text: "\n" + crioMirrorBlock(t, host)}
		for j := h + 1; j < next; j++ {
			if doc.entries[j].table && doc.entries[j].is("registry", "mirror") {
				at := doc.commentStart(j)
				e = edit{start: at, end: at, text: crioMirrorBlock(t, host) + "\n"}
				break
			}
		}
	}
	out := applyEdits(old, []edit{e})
	if err := checkRegistriesMerge(path, doc, out, host, mirror, idx < 0); err != nil {
		return nil, err
	}
	return out, nil
}

// checkRegistriesMerge re-reads the merged file and insists that it differs
// from the original only by berth's mirror (and the registry berth added),
// and that berth is the registry's first mirror.
func checkRegistriesMerge(path string, before *tomlDoc, after []byte, host, mirror string, added bool) error {
	doc, err := parseTOML(path, after)
	if err != nil {
		return fmt.Errorf("merging into %s produced invalid TOML (please report this): %v", path, err)
	}
	got := cloneMap(doc.value)
	regs, _ := got["registry"].([]any)
	fail := fmt.Errorf("%s: berth could not add its mirror for %s without changing other entries; edit the file by hand", path, host)
	for i, r := range regs {
		reg, _ := r.(map[string]any)
		prefix, _ := reg["prefix"].(string)
		if prefix == "" {
			prefix, _ = reg["location"].(string)
		}
		if prefix != host {
			continue
		}
		mirrors, _ := reg["mirror"].([]any)
		if len(mirrors) == 0 {
			return fail
		}
		if first, _ := mirrors[0].(map[string]any); first["location"] != mirror {
			return fail
		}
		if added {
			regs = append(regs[:i:i], regs[i+1:]...)
		} else {
			c := cloneMap(reg)
			if len(mirrors) == 1 {
				delete(c, "mirror")
			} else {
				c["mirror"] = mirrors[1:]
			}
			regs = append(append(regs[:i:i], c), regs[i+1:]...)
		}
		break
	}
	if len(regs) == 0 {
		delete(got, "registry")
	} else {
		got["registry"] = regs
	}
	if !reflect.DeepEqual(before.value, got) {
		return fail
	}
	return nil
}

package deploy

import (
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
)

// planContainerd writes one hosts.toml per upstream registry under dir
// (containerd's registry config_path). containerd tries the [host] entries
// in file order and then `server`, and sends ?ns=<registry> to hosts that
// are not the registry itself, which is how berth knows what to fetch.
func planContainerd(t Target, dir string, read ReadFunc) ([]File, []string, error) {
	var files []File
	var notes []string
	for _, h := range t.Hosts() {
		path := filepath.Join(dir, h, "hosts.toml")
		old, err := readExisting(read, path)
		if err != nil {
			return nil, nil, err
		}
		content, n, err := mergeHostsTOML(path, old, h, t.Upstreams[h], t)
		if err != nil {
			return nil, nil, err
		}
		notes = append(notes, n...)
		files = append(files, newFile(path, old, content))
	}
	notes = append(notes,
		fmt.Sprintf("containerd reads these files only with config_path = %q in its CRI registry settings (docs/runtimes.md); it needs no restart for changes to them", dir),
		"the dial_timeout key takes effect from containerd 2.1; older versions ignore it")
	return files, notes, nil
}

func berthHostBlock(t Target, registry string) string {
	return fmt.Sprintf("[host.%s]\n"+
		"  # berth, the pull-through mirror on this node; written by `berth configure containerd`\n"+
		"  capabilities = [\"pull\", \"resolve\"]\n"+
		"  dial_timeout = %s\n", tomlString(t.MirrorURL()), tomlString(t.DialTimeout.String()))
}

// mergeHostsTOML puts berth's [host] entry into a hosts.toml, first among
// the hosts so containerd asks berth before any other mirror. An existing
// berth entry is replaced; every other line stays as the operator wrote it,
// including a server they chose.
func mergeHostsTOML(path string, old []byte, registry, upstream string, t Target) ([]byte, []string, error) {
	mirror := t.MirrorURL()
	block := berthHostBlock(t, registry)
	server := "server = " + tomlString(upstream) + "\n"
	if len(strings.TrimSpace(string(old))) == 0 {
		return []byte(fmt.Sprintf("# containerd: pull %s images through berth first, then from server.\n%s\n%s",
			registry, server, block)), nil, nil
	}
	doc, err := parseTOML(path, old)
	if err != nil {
		return nil, nil, err
	}
	var notes []string
	var edits []edit
	berth, firstHost, firstTable := -1, -1, -1
	hasServer := false
	for i, e := range doc.entries {
		switch {
		case !e.table && firstTable < 0 && e.is("server"):
			hasServer = true
		case e.table && firstTable < 0:
			firstTable = i
		}
		if e.table && len(e.key) >= 2 && e.key[0] == "host" && firstHost < 0 {
			firstHost = i
		}
		if e.table && e.is("host", mirror) {
			berth = i
		}
	}
	if hosts, _ := doc.value["host"].(map[string]any); hosts[mirror] != nil && berth < 0 {
		return nil, nil, fmt.Errorf("%s: defines host %q other than as a [host.%q] table; containerd ignores that form, and berth will not guess: edit the file by hand", path, mirror, mirror)
	}
	if !hasServer {
		at := len(old)
		if firstTable >= 0 {
			at = doc.commentStart(firstTable)
		}
		edits = append(edits, edit{start: at, end: at, text: server + "\n"})
	} else if s, _ := doc.value["server"].(string); s != upstream {
		notes = append(notes, fmt.Sprintf("%s: kept server = %q; berth fetches %s from %s", path, s, registry, upstream))
	}
	switch {
	case berth >= 0:
		end, _ := doc.tableEnd(berth, func(e tomlEntry) bool { return false })
		edits = append(edits, edit{start: doc.entries[berth].start, end: end, text: block})
	case firstHost >= 0:
		at := doc.commentStart(firstHost)
		edits = append(edits, edit{start: at, end: at, text: block + "\n"})
	default:
		edits = append(edits, appendBlock(old, block))
	}
	if !hasServer && len(edits) == 2 && edits[0].start == edits[1].start {
		// Both land before the first table: server must come first, as
		// a top-level key cannot follow a table header.
		edits = []edit{{start: edits[0].start, end: edits[1].end, text: edits[0].text + edits[1].text}}
	}
	out := applyEdits(old, edits)
	if err := checkHostsMerge(path, doc, out, mirror, !hasServer, berth < 0); err != nil {
		return nil, nil, err
	}
	return out, notes, nil
}

// checkHostsMerge re-reads the merged file and insists that it differs from
// the original only in berth's entry (and a server berth added), and that an
// entry berth inserted is the first host containerd will try. (An entry
// that was already there keeps the place the operator gave it.)
func checkHostsMerge(path string, before *tomlDoc, after []byte, mirror string, addedServer, inserted bool) error {
	doc, err := parseTOML(path, after)
	if err != nil {
		return fmt.Errorf("merging into %s produced invalid TOML (please report this): %v", path, err)
	}
	strip := func(v map[string]any, server bool) map[string]any {
		c := cloneMap(v)
		if hosts, ok := c["host"].(map[string]any); ok {
			delete(hosts, mirror)
			if len(hosts) == 0 {
				delete(c, "host")
			}
		}
		if server {
			delete(c, "server")
		}
		return c
	}
	if !reflect.DeepEqual(strip(before.value, false), strip(doc.value, addedServer)) {
		return fmt.Errorf("%s: berth could not add its entry without changing others; edit the file by hand", path)
	}
	for _, e := range doc.entries {
		if inserted && e.table && len(e.key) >= 2 && e.key[0] == "host" {
			if e.key[1] != mirror {
				return fmt.Errorf("%s: the host %q would be tried before berth; edit the file by hand", path, e.key[1])
			}
			break
		}
	}
	return nil
}

func cloneMap(m map[string]any) map[string]any {
	c := make(map[string]any, len(m))
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok {
			v = cloneMap(sub)
		}
		c[k] = v
	}
	return c
}

package deploy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// planDocker adds berth to registry-mirrors in daemon.json. Docker consults
// mirrors for Docker Hub only, and sends them no registry name: berth serves
// those requests from its default upstream.
func planDocker(t Target, path string, read ReadFunc) ([]File, []string, error) {
	if _, ok := t.Upstreams["docker.io"]; !ok {
		return nil, nil, fmt.Errorf("berth has no docker.io upstream, and Docker uses registry-mirrors for Docker Hub only: add --upstream docker.io=https://registry-1.docker.io")
	}
	old, err := readExisting(read, path)
	if err != nil {
		return nil, nil, err
	}
	content, err := mergeDaemonJSON(path, old, t)
	if err != nil {
		return nil, nil, err
	}
	notes := []string{"apply with `systemctl reload docker` (dockerd re-reads registry-mirrors on SIGHUP)"}
	for _, h := range t.Hosts() {
		if h != "docker.io" {
			notes = append(notes, fmt.Sprintf("Docker mirrors only Docker Hub: pull %s images through berth by naming it, e.g. docker pull %s/%s/IMAGE", h, t.Addr(), h))
		}
	}
	return []File{newFile(path, old, content)}, notes, nil
}

// jsonMember is one key of a JSON object, its value kept as written.
type jsonMember struct {
	key   string
	value json.RawMessage
}

// mergeDaemonJSON puts berth first in registry-mirrors (Docker tries mirrors
// in order) and, when berth is not on loopback, into insecure-registries,
// since berth speaks plain HTTP. Every other key keeps its place and value;
// a file that already says all this is returned unchanged.
func mergeDaemonJSON(path string, old []byte, t Target) ([]byte, error) {
	members, err := parseJSONObject(path, old)
	if err != nil {
		return nil, err
	}
	changed := false
	add := func(key, value string, first bool) error {
		idx := -1
		var list []string
		for i, m := range members {
			if m.key == key {
				idx = i
				if err := json.Unmarshal(m.value, &list); err != nil {
					return fmt.Errorf("%s: %q must be a list of strings", path, key)
				}
			}
		}
		for _, v := range list {
			if strings.TrimSuffix(v, "/") == value {
				return nil
			}
		}
		if first {
			list = append([]string{value}, list...)
		} else {
			list = append(list, value)
		}
		raw, _ := json.Marshal(list)
		changed = true
		if idx >= 0 {
			members[idx].value = raw
		} else {
			members = append(members, jsonMember{key: key, value: raw})
		}
		return nil
	}
	if err := add("registry-mirrors", t.MirrorURL(), true); err != nil {
		return nil, err
	}
	if !t.loopback() {
		if err := add("insecure-registries", t.Addr(), false); err != nil {
			return nil, err
		}
	}
	if !changed {
		return old, nil
	}
	var out bytes.Buffer
	out.WriteString("{\n")
	for i, m := range members {
		key, _ := json.Marshal(m.key)
		var val bytes.Buffer
		if err := json.Indent(&val, m.value, "  ", "  "); err != nil {
			return nil, fmt.Errorf("%s: %v", path, err)
		}
		fmt.Fprintf(&out, "  %s: %s", key, val.Bytes())
		if i < len(members)-1 {
			out.WriteString(",")
		}
		out.WriteString("\n")
	}
	out.WriteString("}\n")
	return out.Bytes(), nil
}

func parseJSONObject(path string, b []byte) ([]jsonMember, error) {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, nil
	}
	bad := func(err error) error {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			line := bytes.Count(b[:se.Offset], []byte("\n")) + 1
			return fmt.Errorf("%s: line %d: not valid JSON: %v", path, line, err)
		}
		return fmt.Errorf("%s: not valid JSON: %v", path, err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	tok, err := dec.Token()
	if err != nil {
		return nil, bad(err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("%s: must hold a JSON object ({...})", path)
	}
	var members []jsonMember
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, bad(err)
		}
		key, _ := tok.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, bad(err)
		}
		members = append(members, jsonMember{key: key, value: v})
	}
	if _, err := dec.Token(); err != nil {
		return nil, bad(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%s: text after the JSON object", path)
	}
	return members, nil
}

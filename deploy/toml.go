package deploy

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// The runtime files are merged by editing their text, not by decoding and
// re-encoding them: an operator's comments, ordering and spelling survive,
// and only the lines berth owns change. The unstable go-toml parser gives the
// byte ranges of each top-level expression for that.

// tomlEntry is one top-level expression of a TOML document.
type tomlEntry struct {
	table bool // a [table] or [[array table]] header; otherwise key = value
	array bool // [[array table]]
	key   []string
	start int // offset of the start of its first line
	end   int // offset just past its last line
}

func (e tomlEntry) is(key ...string) bool { return reflect.DeepEqual(e.key, key) }

func (e tomlEntry) under(prefix ...string) bool {
	return len(e.key) >= len(prefix) && reflect.DeepEqual(e.key[:len(prefix)], prefix)
}

// tomlDoc is a parsed document: its text, expressions and decoded value.
type tomlDoc struct {
	text    []byte
	entries []tomlEntry
	value   map[string]any
}

func parseTOML(path string, b []byte) (*tomlDoc, error) {
	d := &tomlDoc{text: b, value: map[string]any{}}
	if err := toml.Unmarshal(b, &d.value); err != nil {
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, _ := de.Position()
			return nil, fmt.Errorf("%s: line %d: not valid TOML: %s", path, row, de.Error())
		}
		return nil, fmt.Errorf("%s: not valid TOML: %v", path, err)
	}
	var p unstable.Parser
	p.Reset(b)
	for p.NextExpression() {
		e := p.Expression()
		var ent tomlEntry
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			ent.table, ent.array = true, e.Kind == unstable.ArrayTable
		case unstable.KeyValue:
		default:
			continue
		}
		first, last := -1, 0
		for it := e.Key(); it.Next(); {
			n := it.Node()
			ent.key = append(ent.key, string(n.Data))
			if first < 0 {
				first = int(n.Raw.Offset)
			}
			last = int(n.Raw.Offset + n.Raw.Length)
		}
		if e.Kind == unstable.KeyValue {
			last = int(e.Raw.Offset + e.Raw.Length)
		}
		ent.start, ent.end = lineStart(b, first), lineEnd(b, last)
		d.entries = append(d.entries, ent)
	}
	if err := p.Error(); err != nil {
		return nil, fmt.Errorf("%s: not valid TOML: %v", path, err)
	}
	return d, nil
}

func lineStart(b []byte, off int) int {
	return bytes.LastIndexByte(b[:off], '\n') + 1
}

func lineEnd(b []byte, off int) int {
	if i := bytes.IndexByte(b[off:], '\n'); i >= 0 {
		return off + i + 1
	}
	return len(b)
}

// tableEnd is where the body of the table whose header is entries[i] ends:
// after its last key, before any blank lines or comments that introduce the
// next table. sameTable says whether a later header still belongs to it.
func (d *tomlDoc) tableEnd(i int, sameTable func(tomlEntry) bool) (end, next int) {
	end = d.entries[i].end
	for j := i + 1; j < len(d.entries); j++ {
		e := d.entries[j]
		if e.table && !sameTable(e) {
			return end, j
		}
		end = e.end
	}
	return end, len(d.entries)
}

// commentStart backs up from a header over the comment lines directly above
// it, which describe it and must stay attached to it.
func (d *tomlDoc) commentStart(i int) int {
	floor := 0
	if i > 0 {
		floor = d.entries[i-1].end
	}
	pos := d.entries[i].start
	for pos > floor {
		prev := lineStart(d.text, pos-1)
		if !strings.HasPrefix(strings.TrimSpace(string(d.text[prev:pos])), "#") {
			break
		}
		pos = prev
	}
	return pos
}

// edit replaces text[start:end] with text; edits must not overlap.
type edit struct {
	start, end int
	text       string
}

func applyEdits(b []byte, edits []edit) []byte {
	sort.SliceStable(edits, func(i, j int) bool { return edits[i].start < edits[j].start })
	var out bytes.Buffer
	pos := 0
	for _, e := range edits {
		out.Write(b[pos:e.start])
		out.WriteString(e.text)
		pos = e.end
	}
	out.Write(b[pos:])
	return out.Bytes()
}

// appendBlock adds a block at the end of a document, one blank line apart.
func appendBlock(b []byte, block string) edit {
	lead := ""
	switch {
	case len(bytes.TrimSpace(b)) == 0:
	case bytes.HasSuffix(b, []byte("\n\n")):
	case bytes.HasSuffix(b, []byte("\n")):
		lead = "\n"
	default:
		lead = "\n\n"
	}
	return edit{start: len(b), end: len(b), text: lead + block}
}

// tomlString quotes s as a TOML basic string. Go's quoting and TOML's agree
// on printable ASCII, and the hosts and URLs berth writes are validated to be
// that.
func tomlString(s string) string { return strconv.Quote(s) }

package inspector

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/storage"
)

// store keeps inspection records on this host's disk, under
// <data>/inspect/records/<upstream>/<algorithm>/<hex>.json, and in the
// fleet's bucket (objects inspect/v1/<upstream>/<algorithm>/<hex>), so
// each digest is inspected once for the whole fleet.
type store struct {
	dir     string
	objects storage.Objects // nil: no bucket, or one without objects
}

func (s *store) path(upstream string, d digest.Digest) string {
	return filepath.Join(s.dir, "records", upstream, string(d.Algorithm()), d.Encoded()+".json")
}

func objectName(upstream string, d digest.Digest) string {
	return fmt.Sprintf("inspect/v%d/%s/%s/%s", recordVersion, upstream, d.Algorithm(), d.Encoded())
}

// get returns the record on this host's disk.
func (s *store) get(upstream string, d digest.Digest) (*Record, bool) {
	if d.Validate() != nil {
		return nil, false
	}
	b, err := os.ReadFile(s.path(upstream, d))
	if err != nil {
		return nil, false
	}
	var r Record
	if json.Unmarshal(b, &r) != nil || r.Version != recordVersion || r.Digest != d.String() {
		return nil, false
	}
	return &r, true
}

// shared returns the fleet's record from the bucket, keeping a copy on disk.
func (s *store) shared(ctx context.Context, upstream string, d digest.Digest) (*Record, bool) {
	if s.objects == nil {
		return nil, false
	}
	b, err := s.objects.GetObject(ctx, objectName(upstream, d))
	if err != nil {
		return nil, false
	}
	var r Record
	if json.Unmarshal(b, &r) != nil || r.Version != recordVersion || r.Digest != d.String() {
		return nil, false
	}
	_ = s.putLocal(&r)
	return &r, true
}

func (s *store) putLocal(r *Record) error {
	d, err := digest.Parse(r.Digest)
	if err != nil {
		return err
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return storage.WriteFileAtomic(s.path(r.Upstream, d), b)
}

// put keeps a record on disk and writes it to the bucket unless the
// bucket has one: of hosts that inspected the same digest at once, the
// first write stays and the others keep their own copy on disk.
func (s *store) put(ctx context.Context, r *Record) error {
	if err := s.putLocal(r); err != nil {
		return err
	}
	if s.objects == nil {
		return nil
	}
	d, _ := digest.Parse(r.Digest)
	b, _ := json.Marshal(r)
	_, err := s.objects.CreateObject(ctx, objectName(r.Upstream, d), b)
	return err
}

// each calls fn with every record on disk.
func (s *store) each(fn func(*Record)) {
	root := filepath.Join(s.dir, "records")
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || filepath.Ext(p) != ".json" {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		var r Record
		if json.Unmarshal(b, &r) == nil && r.Version == recordVersion {
			fn(&r)
		}
		return nil
	})
}

// journal is an append-only JSON-lines file with its last entries in
// memory: the tag history and the webhook delivery log.
type journal[T any] struct {
	path string
	max  int

	mu       sync.Mutex
	entries  []T
	appended int // lines appended since the file was last rewritten
}

func openJournal[T any](path string, max int) *journal[T] {
	j := &journal[T]{path: path, max: max}
	b, err := os.ReadFile(path)
	if err != nil {
		return j
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var v T
		if json.Unmarshal(sc.Bytes(), &v) == nil {
			j.entries = append(j.entries, v)
		}
	}
	if len(j.entries) > max {
		j.entries = j.entries[len(j.entries)-max:]
	}
	// Keep the file from growing without bound: rewrite it with what is kept.
	if len(j.entries) == max {
		j.rewrite()
	}
	return j
}

// rewrite replaces the file with the entries kept in memory.
func (j *journal[T]) rewrite() {
	var buf bytes.Buffer
	for _, e := range j.entries {
		line, _ := json.Marshal(e)
		buf.Write(append(line, '\n'))
	}
	_ = storage.WriteFileAtomic(j.path, buf.Bytes())
	j.appended = 0
}

func (j *journal[T]) add(v T) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.entries = append(j.entries, v)
	if len(j.entries) > j.max {
		j.entries = j.entries[len(j.entries)-j.max:]
	}
	line, err := json.Marshal(v)
	if err != nil {
		return
	}
	if err := os.MkdirAll(filepath.Dir(j.path), 0o755); err != nil {
		return
	}
	f, err := os.OpenFile(j.path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	f.Write(append(line, '\n'))
	f.Close()
	if j.appended++; j.appended >= j.max {
		j.rewrite() // at most 2 × max lines on disk
	}
}

// list returns the kept entries, newest first, that keep accepts.
func (j *journal[T]) list(keep func(T) bool) []T {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := []T{}
	for i := len(j.entries) - 1; i >= 0; i-- {
		if keep == nil || keep(j.entries[i]) {
			out = append(out, j.entries[i])
		}
	}
	return out
}

// claimLocal creates a marker file once: false when it exists already.
func claimLocal(path string) (bool, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if errors.Is(err, fs.ErrExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return true, f.Close()
}

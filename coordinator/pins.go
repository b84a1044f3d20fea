package coordinator

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/berth-dev/berth/storage"
)

// pinStore is the node's durable record of its pins: a JSON file under the
// data directory, written atomically on every change. The engine's pin
// set is in memory; at start the node re-applies every pin still in force
// from here (engine.Prefetch with the stored time), so pins survive a
// restart. Expired pins are dropped whenever the file is written.
type pinStore struct {
	path string
	mu   sync.Mutex
	pins map[string]Pin // by Repository's upstream + digest (pinKey)
}

func pinKey(upstream, d string) string { return upstream + "@" + d }

// upstreamOf is the upstream part of a pin's Repository (upstream/name).
func upstreamOf(repository string) string {
	for i := 0; i < len(repository); i++ {
		if repository[i] == '/' {
			return repository[:i]
		}
	}
	return repository
}

func openPinStore(path string) (*pinStore, error) {
	s := &pinStore{path: path, pins: map[string]Pin{}}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, err
	}
	var list []Pin
	if err := json.Unmarshal(b, &list); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	for _, p := range list {
		s.pins[pinKey(upstreamOf(p.Repository), p.Digest.String())] = p
	}
	return s, nil
}

// active lists the pins in force at now, sorted.
func (s *pinStore) active(now time.Time) []Pin {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Pin
	for _, p := range s.pins {
		if p.Until.After(now) {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Repository != out[j].Repository {
			return out[i].Repository < out[j].Repository
		}
		return out[i].Digest < out[j].Digest
	})
	return out
}

// get returns the pin of a blob, if any is in force.
func (s *pinStore) get(upstream, d string, now time.Time) (Pin, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.pins[pinKey(upstream, d)]
	return p, ok && p.Until.After(now)
}

// put records pins (a later time wins over an earlier one) and restores
// others to a previous state (prev: a pin to put back as it was, or a
// zero Until to remove it), then writes the file.
func (s *pinStore) update(add []Pin, restore map[string]Pin) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range add {
		k := pinKey(upstreamOf(p.Repository), p.Digest.String())
		if old, ok := s.pins[k]; ok && old.Until.After(p.Until) {
			continue
		}
		s.pins[k] = p
	}
	for k, p := range restore {
		if p.Until.IsZero() {
			delete(s.pins, k)
		} else {
			s.pins[k] = p
		}
	}
	return s.saveLocked()
}

func (s *pinStore) saveLocked() error {
	now := time.Now()
	list := make([]Pin, 0, len(s.pins))
	for k, p := range s.pins {
		if !p.Until.After(now) {
			delete(s.pins, k)
			continue
		}
		p.OnDisk = false
		list = append(list, p)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Digest < list[j].Digest })
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return err
	}
	return storage.WriteFileAtomic(s.path, b)
}

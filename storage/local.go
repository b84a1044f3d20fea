package storage

import (
	"container/list"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
)

// Local is the host's disk tier. Layout under its root:
//
//	blobs/<upstream>/sha256/<hex>          verified blob bytes
//	manifests/<upstream>/sha256/<hex>.json  Manifest (media type + bytes)
//	repos/<upstream>/<repo>/_tags/<tag>     TagRecord
//	tmp/                                    downloads in progress
//
// Only verified, fsynced files are renamed out of tmp/, so a crash leaves
// nothing a restart would serve; tmp/ is emptied on open.
type Local struct {
	root      string
	budget    int64
	high, low float64
	// freeSpace is replaceable so tests can simulate a full disk.
	freeSpace func(dir string) (int64, error)
	onEvict   func(k Key, size int64)

	mu    sync.Mutex
	index map[Key]*entry
	lru   *list.List // front = most recently used
	total int64      // bytes of the blobs in index
	// reserved is the declared size of the downloads in progress, held
	// against the budget until they commit or abort.
	reserved int64
	// unwritten is the part of reserved not yet on disk: the free-space
	// check counts it, as statfs does not see it yet. Writes lower it
	// without the lock.
	unwritten atomic.Int64
	// unlinking is the size of evicted files not yet unlinked: free space
	// any moment now.
	unlinking int64
	evictions int // names evicted files in tmp/
}

type entry struct {
	key     Key
	size    int64
	pins    int
	elem    *list.Element
	touched time.Time // when this Local last bumped the file's mtime
}

// victim is a blob evicted under the lock whose file is unlinked, and
// OnEvict called, after it.
type victim struct {
	key  Key
	size int64
	tmp  string // where its file was moved; "" when it was already gone
}

// diskMargin is kept free on the filesystem for everything else.
const diskMargin = 64 << 20

// LocalOptions configures the disk tier.
type LocalOptions struct {
	Budget                      int64   // bytes of blobs kept
	HighWatermark, LowWatermark float64 // eviction runs from high to low
	OnEvict                     func(k Key, size int64)
	// FreeSpace reports the bytes available to the filesystem holding dir;
	// nil means statfs. Tests replace it to simulate a full disk.
	FreeSpace func(dir string) (int64, error)
}

// OpenLocal opens (creating if needed) the disk tier at root and indexes
// what it already holds.
func OpenLocal(root string, o LocalOptions) (*Local, error) {
	for _, d := range []string{"blobs", "manifests", "repos", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return nil, fmt.Errorf("data directory: %w", err)
		}
	}
	// Leftovers of downloads cut short by a crash are never served.
	if err := os.RemoveAll(filepath.Join(root, "tmp")); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(root, "tmp"), 0o755); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	l := &Local{
		root: root, budget: o.Budget, high: o.HighWatermark, low: o.LowWatermark,
		freeSpace: diskFree, onEvict: o.OnEvict,
		index: map[Key]*entry{}, lru: list.New(),
	}
	if o.FreeSpace != nil {
		l.freeSpace = o.FreeSpace
	}
	if l.high == 0 {
		l.high, l.low = 0.9, 0.8
	}
	type found struct {
		e  *entry
		at time.Time
	}
	var all []found
	blobs := filepath.Join(root, "blobs")
	err := filepath.WalkDir(blobs, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		k, ok := keyFromPath(blobs, p)
		if !ok {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		all = append(all, found{&entry{key: k, size: info.Size()}, info.ModTime()})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("indexing cache: %w", err)
	}
	// Modification times are bumped on use (see touch), so they order the LRU across restarts.
	for _, f := range all {
		l.index[f.e.key] = f.e
		l.total += f.e.size
	}
	sort.Slice(all, func(i, j int) bool { return all[i].at.Before(all[j].at) })
	for _, f := range all {
		f.e.elem = l.lru.PushFront(f.e)
	}
	l.mu.Lock()
	victims := l.evictLocked(0)
	l.mu.Unlock()
	l.dropVictims(victims)
	return l, nil
}

func keyFromPath(base, p string) (Key, bool) {
	rel, err := filepath.Rel(base, p)
	if err != nil {
		return Key{}, false
	}
	parts := strings.Split(rel, string(filepath.Separator))
	if len(parts) != 3 {
		return Key{}, false
	}
	d := digest.NewDigestFromEncoded(digest.Algorithm(parts[1]), parts[2])
	if d.Validate() != nil {
		return Key{}, false
	}
	return Key{Upstream: parts[0], Digest: d}, true
}

// OnEvict sets a function called for every evicted blob.
func (l *Local) OnEvict(fn func(k Key, size int64)) {
	l.mu.Lock()
	l.onEvict = fn
	l.mu.Unlock()
}

// Pin keeps a cached blob from eviction until release is called.
func (l *Local) Pin(k Key) (release func(), ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e, ok := l.index[k]
	if !ok {
		return func() {}, false
	}
	e.pins++
	return func() {
		l.mu.Lock()
		e.pins--
		l.mu.Unlock()
	}, true
}

func (l *Local) blobPath(k Key) string {
	return filepath.Join(l.root, "blobs", k.Upstream, string(k.Digest.Algorithm()), k.Digest.Encoded())
}

// Usage reports the bytes and number of blobs held.
func (l *Local) Usage() (bytes int64, blobs int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total, len(l.index)
}

// Budget reports the configured disk budget.
func (l *Local) Budget() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.budget
}

// SetBudget changes the budget (on reload) and evicts down to it.
func (l *Local) SetBudget(budget int64, high, low float64) {
	l.mu.Lock()
	l.budget, l.high, l.low = budget, high, low
	victims := l.evictLocked(0)
	l.mu.Unlock()
	l.dropVictims(victims)
}

// OpenBlob opens a cached blob and pins it against eviction until release
// is called. The *os.File lets http.ServeContent use sendfile.
func (l *Local) OpenBlob(k Key) (f *os.File, size int64, release func(), err error) {
	l.mu.Lock()
	e, ok := l.index[k]
	if !ok {
		l.mu.Unlock()
		return nil, 0, nil, ErrNotFound
	}
	e.pins++
	l.lru.MoveToFront(e.elem)
	// mtimes order the LRU across restarts; bumping them at most once a
	// minute spares a write per request.
	now := time.Now()
	touch := now.Sub(e.touched) >= time.Minute
	if touch {
		e.touched = now
	}
	l.mu.Unlock()
	release = func() {
		l.mu.Lock()
		e.pins--
		l.mu.Unlock()
	}
	f, err = os.Open(l.blobPath(k))
	if err != nil {
		release()
		if errors.Is(err, fs.ErrNotExist) {
			// Removed behind berth's back: forget it so it is refetched.
			l.forget(k)
			return nil, 0, nil, ErrNotFound
		}
		return nil, 0, nil, err
	}
	if touch {
		os.Chtimes(f.Name(), now, now)
	}
	return f, e.size, release, nil
}

// HasBlob reports whether the blob is cached, without pinning it.
func (l *Local) HasBlob(k Key) (int64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e, ok := l.index[k]
	if !ok {
		return 0, false
	}
	return e.size, true
}

// DeleteBlob removes a blob (a failed re-verification); a pinned one is
// forgotten from the index now and unlinked, readers keep their open file.
func (l *Local) DeleteBlob(k Key) {
	l.mu.Lock()
	if e, ok := l.index[k]; ok {
		l.lru.Remove(e.elem)
		delete(l.index, k)
		l.total -= e.size
	}
	// Moved aside under the lock, so a download of k committed once the
	// lock is released cannot lose its file to this unlink.
	tmp := l.moveAsideLocked(k)
	l.mu.Unlock()
	if tmp != "" {
		os.Remove(tmp)
	}
}

func (l *Local) forget(k Key) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e, ok := l.index[k]; ok {
		l.lru.Remove(e.elem)
		delete(l.index, k)
		l.total -= e.size
	}
}

// evictLocked drops least recently used, unpinned blobs from the index
// once the cached and reserved bytes (and extra more) pass the high
// watermark, until they are under the low one. Their files are moved aside
// at once; the caller unlinks them with dropVictims after unlocking, as
// unlinking a large file can take a while.
func (l *Local) evictLocked(extra int64) []victim {
	if float64(l.total+l.reserved+extra) <= l.high*float64(l.budget) {
		return nil
	}
	target := int64(l.low*float64(l.budget)) - extra - l.reserved
	var victims []victim
	for el := l.lru.Back(); el != nil && l.total > target; {
		e := el.Value.(*entry)
		prev := el.Prev()
		if e.pins == 0 {
			l.lru.Remove(el)
			delete(l.index, e.key)
			l.total -= e.size
			v := victim{key: e.key, size: e.size, tmp: l.moveAsideLocked(e.key)}
			if v.tmp != "" {
				l.unlinking += v.size
			}
			victims = append(victims, v)
		}
		el = prev
	}
	return victims
}

// moveAsideLocked renames k's file into tmp/ and returns its new name, or
// "" if it is not there. Once it is out of blobs/, unlinking it later
// cannot touch a new file committed for k meanwhile.
func (l *Local) moveAsideLocked(k Key) string {
	l.evictions++
	tmp := filepath.Join(l.root, "tmp", "evicted-"+strconv.Itoa(l.evictions))
	if err := os.Rename(l.blobPath(k), tmp); err != nil {
		return ""
	}
	return tmp
}

// dropVictims finishes an eviction without the lock: OnEvict, then unlink.
func (l *Local) dropVictims(victims []victim) {
	if len(victims) == 0 {
		return
	}
	l.mu.Lock()
	onEvict := l.onEvict
	// Counted as free no longer before they are: a moment's false
	// ErrNoSpace, never an overcommitted disk.
	for _, v := range victims {
		if v.tmp != "" {
			l.unlinking -= v.size
		}
	}
	l.mu.Unlock()
	for _, v := range victims {
		if onEvict != nil {
			onEvict(v.key, v.size)
		}
		if v.tmp != "" {
			os.Remove(v.tmp)
		}
	}
}

// reserve makes room for a download of size bytes and, when size is known,
// holds it against the budget and the disk until the writer releases it.
// It evicts if the budget needs it and checks the filesystem has the space
// for this and the other downloads in progress. size < 0 (unknown) checks
// only that the disk is not already full or promised.
func (l *Local) reserve(size int64) error {
	l.mu.Lock()
	if size >= 0 && size > l.budget-l.reserved {
		l.mu.Unlock()
		return ErrNoSpace
	}
	var victims []victim
	if size > 0 {
		victims = l.evictLocked(size) // as if the blob were already here
	}
	// Under the lock, so that two downloads checking at once cannot both
	// count on the same free bytes. unwritten is read before statfs: a
	// write in between lowers both, or only free space (erring safe).
	need := max(size, 0) + l.unwritten.Load() + diskMargin
	free, err := l.freeSpace(filepath.Join(l.root, "tmp"))
	ok := err != nil || free+l.unlinking >= need // can't tell: let the write find out
	if ok && size > 0 {
		l.reserved += size
		l.unwritten.Add(size)
	}
	l.mu.Unlock()
	l.dropVictims(victims)
	if !ok {
		return ErrNoSpace
	}
	return nil
}

func diskFree(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// BlobWriter receives a blob being downloaded. Its temp file can be read by
// others while it grows (see Path); Commit makes it visible only if the
// bytes match the digest.
type BlobWriter struct {
	l        *Local
	key      Key
	f        *os.File
	h        hash.Hash
	n        int64
	reserved int64 // held in l.reserved until Commit or Abort
	done     bool
}

// CreateBlob starts a download of k. size may be -1 when unknown. It
// returns ErrNoSpace when the cache cannot hold the blob beside the other
// downloads in progress. A known size is held against the budget and the
// disk until Commit or Abort, one of which must end every writer.
func (l *Local) CreateBlob(k Key, size int64) (*BlobWriter, error) {
	if err := k.Digest.Validate(); err != nil {
		return nil, err
	}
	if err := l.reserve(size); err != nil {
		return nil, err
	}
	w := &BlobWriter{l: l, key: k, h: k.Digest.Algorithm().Hash(), reserved: max(size, 0)}
	f, err := os.CreateTemp(filepath.Join(l.root, "tmp"), "blob-*")
	if err != nil {
		w.release()
		return nil, err
	}
	w.f = f
	return w, nil
}

// release gives back what the writer still holds of its reservation.
func (w *BlobWriter) release() {
	if w.reserved == 0 {
		return
	}
	l := w.l
	l.mu.Lock()
	l.reserved -= w.reserved
	l.unwritten.Add(-max(w.reserved-w.n, 0))
	l.mu.Unlock()
	w.reserved = 0
}

// Path is the temp file's name; readers may open it while it is written.
func (w *BlobWriter) Path() string { return w.f.Name() }

// Write appends to the blob and its running digest.
func (w *BlobWriter) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.h.Write(p[:n])
	if left := w.reserved - w.n; left > 0 {
		w.l.unwritten.Add(-min(int64(n), left))
	}
	w.n += int64(n)
	if err != nil && errors.Is(err, syscall.ENOSPC) {
		err = fmt.Errorf("%w: %v", ErrNoSpace, err)
	}
	return n, err
}

// Written is the number of bytes written so far.
func (w *BlobWriter) Written() int64 { return w.n }

// ErrDigestMismatch means the bytes do not hash to the digest they were asked for.
var ErrDigestMismatch = errors.New("content does not match its digest")

// Commit verifies the digest, syncs and renames the blob into place.
func (w *BlobWriter) Commit() error {
	if w.done {
		return errors.New("blob writer already closed")
	}
	w.done = true
	got := digest.NewDigest(w.key.Digest.Algorithm(), w.h)
	if got != w.key.Digest {
		w.discard()
		return fmt.Errorf("%w: want %s, got %s", ErrDigestMismatch, w.key.Digest, got)
	}
	if err := w.f.Sync(); err != nil {
		w.discard()
		return err
	}
	dst := w.l.blobPath(w.key)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		w.discard()
		return err
	}
	w.f.Close()
	if err := os.Rename(w.f.Name(), dst); err != nil {
		w.discard()
		return err
	}
	syncDir(filepath.Dir(dst))
	l := w.l
	l.mu.Lock()
	if old, ok := l.index[w.key]; ok {
		l.total -= old.size
		l.lru.Remove(old.elem)
	}
	e := &entry{key: w.key, size: w.n}
	e.elem = l.lru.PushFront(e)
	l.index[w.key] = e
	l.total += w.n
	// The reservation becomes the cached blob in the same step, so the
	// bytes are never counted twice or not at all.
	l.reserved -= w.reserved
	l.unwritten.Add(-max(w.reserved-w.n, 0))
	w.reserved = 0
	victims := l.evictLocked(0)
	l.mu.Unlock()
	l.dropVictims(victims)
	return nil
}

// Abort discards the download.
func (w *BlobWriter) Abort() {
	if w.done {
		return
	}
	w.done = true
	w.discard()
}

func (w *BlobWriter) discard() {
	w.f.Close()
	os.Remove(w.f.Name())
	w.release()
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// writeFileAtomic writes dst as WriteFileAtomic does, its temporary file
// in the tier's tmp directory, which is emptied at start.
func (l *Local) writeFileAtomic(dst string, b []byte) error {
	return writeAtomic(filepath.Join(l.root, "tmp"), "meta-*", dst, b)
}

// WriteFileAtomic replaces path with b: written to a temporary file beside
// it, synced, then renamed, so a reader or a crash finds the old file or
// the new one, never a part of one.
func WriteFileAtomic(path string, b []byte) error {
	return writeAtomic(filepath.Dir(path), ".tmp-*", path, b)
}

func writeAtomic(tmpDir, pattern, dst string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(tmpDir, pattern)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), dst)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

func (l *Local) manifestPath(k Key) string {
	return filepath.Join(l.root, "manifests", k.Upstream, string(k.Digest.Algorithm()), k.Digest.Encoded()+".json")
}

// PutManifest stores a manifest after checking its bytes match k's digest.
func (l *Local) PutManifest(k Key, m Manifest) error {
	if err := k.Digest.Validate(); err != nil {
		return err
	}
	if got := k.Digest.Algorithm().FromBytes(m.Content); got != k.Digest {
		return fmt.Errorf("%w: want %s, got %s", ErrDigestMismatch, k.Digest, got)
	}
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return l.writeFileAtomic(l.manifestPath(k), b)
}

// GetManifest returns a stored manifest, re-verifying its digest so a file
// damaged on disk is never served.
func (l *Local) GetManifest(k Key) (Manifest, error) {
	if k.Digest.Validate() != nil {
		return Manifest{}, ErrNotFound
	}
	b, err := os.ReadFile(l.manifestPath(k))
	if errors.Is(err, fs.ErrNotExist) {
		return Manifest{}, ErrNotFound
	}
	if err != nil {
		return Manifest{}, err
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil || k.Digest.Algorithm().FromBytes(m.Content) != k.Digest {
		os.Remove(l.manifestPath(k))
		return Manifest{}, ErrNotFound
	}
	return m, nil
}

func (l *Local) tagPath(upstream, repo, tag string) string {
	return filepath.Join(l.root, "repos", upstream, filepath.FromSlash(repo), "_tags", tag)
}

// PutTag records what the upstream said a tag points at.
func (l *Local) PutTag(upstream, repo, tag string, r TagRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return l.writeFileAtomic(l.tagPath(upstream, repo, tag), b)
}

// GetTag returns the last record of a tag, or ErrNotFound.
func (l *Local) GetTag(upstream, repo, tag string) (TagRecord, error) {
	b, err := os.ReadFile(l.tagPath(upstream, repo, tag))
	if errors.Is(err, fs.ErrNotExist) {
		return TagRecord{}, ErrNotFound
	}
	if err != nil {
		return TagRecord{}, err
	}
	var r TagRecord
	if err := json.Unmarshal(b, &r); err != nil || r.Digest.Validate() != nil {
		return TagRecord{}, ErrNotFound
	}
	return r, nil
}

// Tags lists the cached tags of a repository.
func (l *Local) Tags(upstream, repo string) ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(l.root, "repos", upstream, filepath.FromSlash(repo), "_tags"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	tags := make([]string, 0, len(ents))
	for _, e := range ents {
		tags = append(tags, e.Name())
	}
	return tags, nil
}

// Repositories lists every upstream/repository pair with a cached tag.
func (l *Local) Repositories() ([][2]string, error) {
	base := filepath.Join(l.root, "repos")
	var out [][2]string
	err := filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "_tags" {
			rel, _ := filepath.Rel(base, filepath.Dir(p))
			up, repo, ok := strings.Cut(filepath.ToSlash(rel), "/")
			if ok {
				out = append(out, [2]string{up, repo})
			}
			return filepath.SkipDir
		}
		return nil
	})
	return out, err
}

// Hash is the running digest of what was written, for a caller that takes
// over verifying the rest of the blob elsewhere (a download that relays
// what the disk had no room for).
func (w *BlobWriter) Hash() hash.Hash { return w.h }

package storage

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

const localTestUpstream = "registry.test"

func openTestLocal(t *testing.T, root string, o LocalOptions) *Local {
	t.Helper()
	l, err := OpenLocal(root, o)
	if err != nil {
		t.Fatalf("OpenLocal: %v", err)
	}
	return l
}

// blobOf makes content of size bytes that differs per seed, so every blob
// in a test has its own digest.
func localBlobOf(seed, size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(seed*31 + i*7)
	}
	copy(b, fmt.Sprintf("blob-%d-", seed))
	return b
}

func localKeyOf(b []byte) Key { return Key{Upstream: localTestUpstream, Digest: digest.FromBytes(b)} }

func commitLocal(t *testing.T, l *Local, b []byte) Key {
	t.Helper()
	k := localKeyOf(b)
	w, err := l.CreateBlob(k, int64(len(b)))
	if err != nil {
		t.Fatalf("CreateBlob: %v", err)
	}
	if _, err := w.Write(b); err != nil {
		t.Fatalf("Write: %v", err)
	}
	if err := w.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	return k
}

func readLocalBlob(t *testing.T, l *Local, k Key) []byte {
	t.Helper()
	f, size, release, err := l.OpenBlob(k)
	if err != nil {
		t.Fatalf("OpenBlob(%s): %v", k, err)
	}
	defer release()
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != size {
		t.Fatalf("OpenBlob size %d, file holds %d bytes", size, len(b))
	}
	return b
}

func localTmpEntries(t *testing.T, root string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(root, "tmp"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// cached returns which of keys the index still holds, by position.
func cachedLocal(l *Local, keys []Key) []int {
	var in []int
	for i, k := range keys {
		if _, ok := l.HasBlob(k); ok {
			in = append(in, i)
		}
	}
	return in
}

func TestLocalCommitServesVerifiedBlob(t *testing.T) {
	root := t.TempDir()
	l := openTestLocal(t, root, LocalOptions{Budget: 1 << 20})
	b := localBlobOf(1, 3000)
	k := commitLocal(t, l, b)
	if size, ok := l.HasBlob(k); !ok || size != int64(len(b)) {
		t.Fatalf("HasBlob = %d, %v; want %d, true", size, ok, len(b))
	}
	if got := readLocalBlob(t, l, k); !bytes.Equal(got, b) {
		t.Fatal("OpenBlob returned different bytes than were committed")
	}
	if bytes, n := l.Usage(); bytes != int64(len(b)) || n != 1 {
		t.Fatalf("Usage = %d bytes, %d blobs; want %d, 1", bytes, n, len(b))
	}
	if left := localTmpEntries(t, root); len(left) != 0 {
		t.Fatalf("tmp/ still holds %v after commit", left)
	}
}

func TestLocalCommitRejectsDigestMismatch(t *testing.T) {
	root := t.TempDir()
	l := openTestLocal(t, root, LocalOptions{Budget: 1 << 20})
	b := localBlobOf(1, 3000)
	k := localKeyOf(b)
	w, err := l.CreateBlob(k, int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(b)
	bad[len(bad)/2] ^= 0xff
	w.Write(bad)
	if err := w.Commit(); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Commit of corrupt bytes = %v, want ErrDigestMismatch", err)
	}
	if _, ok := l.HasBlob(k); ok {
		t.Fatal("corrupt blob was indexed")
	}
	if _, err := os.Stat(l.blobPath(k)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("corrupt blob is on disk at its final path (stat: %v)", err)
	}
	if left := localTmpEntries(t, root); len(left) != 0 {
		t.Fatalf("tmp/ still holds %v after a failed commit", left)
	}
}

func TestLocalAbortLeavesNothing(t *testing.T) {
	root := t.TempDir()
	l := openTestLocal(t, root, LocalOptions{Budget: 1 << 20})
	b := localBlobOf(1, 3000)
	w, err := l.CreateBlob(localKeyOf(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	w.Write(b[:100])
	w.Abort()
	if _, ok := l.HasBlob(localKeyOf(b)); ok {
		t.Fatal("aborted blob was indexed")
	}
	if left := localTmpEntries(t, root); len(left) != 0 {
		t.Fatalf("tmp/ still holds %v after Abort", left)
	}
}

// A crash leaves downloads half written in tmp/ and committed blobs in
// blobs/; a restart must serve only the latter.
func TestLocalReopenAfterCrash(t *testing.T) {
	root := t.TempDir()
	l := openTestLocal(t, root, LocalOptions{Budget: 1 << 20})
	done := localBlobOf(1, 5000)
	kDone := commitLocal(t, l, done)

	partial := localBlobOf(2, 5000)
	w, err := l.CreateBlob(localKeyOf(partial), int64(len(partial)))
	if err != nil {
		t.Fatal(err)
	}
	w.Write(partial[:1234]) // the process dies here: no Commit, no Abort
	os.WriteFile(filepath.Join(root, "tmp", "meta-123"), []byte("{half"), 0o644)
	os.MkdirAll(filepath.Join(root, "tmp", "nested"), 0o755)
	// Files in blobs/ that are not named by a digest are not blobs.
	junk := filepath.Join(root, "blobs", localTestUpstream, "sha256", "not-a-digest")
	os.WriteFile(junk, []byte("junk"), 0o644)
	if err := l.PutManifest(Key{Upstream: localTestUpstream, Digest: digest.FromString("{}")}, Manifest{MediaType: "x", Content: []byte("{}")}); err != nil {
		t.Fatal(err)
	}

	l2 := openTestLocal(t, root, LocalOptions{Budget: 1 << 20})
	if left := localTmpEntries(t, root); len(left) != 0 {
		t.Fatalf("reopen left %v in tmp/", left)
	}
	if size, ok := l2.HasBlob(kDone); !ok || size != int64(len(done)) {
		t.Fatalf("committed blob after reopen: HasBlob = %d, %v", size, ok)
	}
	if got := readLocalBlob(t, l2, kDone); !bytes.Equal(got, done) {
		t.Fatal("committed blob reads back different bytes after reopen")
	}
	if _, ok := l2.HasBlob(localKeyOf(partial)); ok {
		t.Fatal("a blob whose download never committed is visible after reopen")
	}
	if _, _, _, err := l2.OpenBlob(localKeyOf(partial)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("OpenBlob of the partial blob = %v, want ErrNotFound", err)
	}
	if bytes, n := l2.Usage(); bytes != int64(len(done)) || n != 1 {
		t.Fatalf("Usage after reopen = %d bytes, %d blobs; want %d, 1", bytes, n, len(done))
	}
	if m, err := l2.GetManifest(Key{Upstream: localTestUpstream, Digest: digest.FromString("{}")}); err != nil || string(m.Content) != "{}" {
		t.Fatalf("manifest after reopen: %q, %v", m.Content, err)
	}
}

func TestLocalEvictsLRUBetweenWatermarks(t *testing.T) {
	var mu sync.Mutex
	var evicted []Key
	l := openTestLocal(t, t.TempDir(), LocalOptions{
		Budget: 1000, HighWatermark: 0.9, LowWatermark: 0.5,
		OnEvict: func(k Key, size int64) {
			mu.Lock()
			evicted = append(evicted, k)
			mu.Unlock()
		},
	})
	var keys []Key
	for i := range 9 {
		keys = append(keys, commitLocal(t, l, localBlobOf(i, 100)))
	}
	// 900 bytes is exactly the high watermark: nothing goes yet.
	if got := cachedLocal(l, keys); len(got) != 9 {
		t.Fatalf("evicted at the high watermark; cached %v", got)
	}
	// Using blob 0 makes it the most recent: blobs 1.. are older now.
	readLocalBlob(t, l, keys[0])
	keys = append(keys, commitLocal(t, l, localBlobOf(9, 100)))
	// 1000 > 900: evict least recently used down to 500 bytes.
	if got, want := cachedLocal(l, keys), []int{0, 6, 7, 8, 9}; !slices.Equal(got, want) {
		t.Fatalf("cached after eviction %v, want %v", got, want)
	}
	if bytes, n := l.Usage(); bytes != 500 || n != 5 {
		t.Fatalf("Usage = %d, %d; want 500, 5", bytes, n)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []Key{keys[1], keys[2], keys[3], keys[4], keys[5]}; !slices.Equal(evicted, want) {
		t.Fatalf("OnEvict saw %v, want least recent first %v", evicted, want)
	}
	for _, k := range evicted {
		if _, err := os.Stat(l.blobPath(k)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("evicted blob %s still on disk", k)
		}
	}
}

func TestLocalNeverEvictsPinnedBlob(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1000, HighWatermark: 0.9, LowWatermark: 0.5})
	var keys []Key
	for i := range 9 {
		keys = append(keys, commitLocal(t, l, localBlobOf(i, 100)))
	}
	// A client is still reading blob 0; then the others are used, so blob 0
	// is the least recently used one when the budget is exceeded.
	f, _, release, err := l.OpenBlob(keys[0])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, k := range keys[1:] {
		readLocalBlob(t, l, k)
	}
	keys = append(keys, commitLocal(t, l, localBlobOf(9, 100)))
	if _, ok := l.HasBlob(keys[0]); !ok {
		t.Fatal("a blob open for reading was evicted")
	}
	if b, err := io.ReadAll(f); err != nil || !bytes.Equal(b, localBlobOf(0, 100)) {
		t.Fatalf("reading the pinned blob: %v", err)
	}
	if bytes, _ := l.Usage(); bytes > 500 {
		t.Fatalf("Usage %d after eviction, want <= 500 (unpinned blobs go instead)", bytes)
	}
	// Once released it is an ordinary candidate again.
	release()
	l.SetBudget(100, 0.9, 0.5)
	if _, ok := l.HasBlob(keys[0]); ok {
		t.Fatal("released blob kept although the budget now requires evicting it")
	}
}

// Pin is how the mirror holds a freshly committed blob for readers of its
// download; it must protect like OpenBlob does.
func TestLocalPinProtectsFromEviction(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1000, HighWatermark: 0.9, LowWatermark: 0.5})
	k := commitLocal(t, l, localBlobOf(0, 400))
	release, ok := l.Pin(k)
	if !ok {
		t.Fatal("Pin of a cached blob failed")
	}
	l.SetBudget(100, 0.9, 0.5)
	if _, ok := l.HasBlob(k); !ok {
		t.Fatal("pinned blob evicted by SetBudget")
	}
	release()
	l.SetBudget(100, 0.9, 0.5)
	if _, ok := l.HasBlob(k); ok {
		t.Fatal("released blob not evicted")
	}
	if _, ok := l.Pin(localKeyOf(localBlobOf(5, 1))); ok {
		t.Fatal("Pin of an uncached blob reported success")
	}
}

func TestLocalSetBudgetEvicts(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 10000, HighWatermark: 0.9, LowWatermark: 0.8})
	var keys []Key
	for i := range 10 {
		keys = append(keys, commitLocal(t, l, localBlobOf(i, 100)))
	}
	if l.Budget() != 10000 {
		t.Fatalf("Budget = %d", l.Budget())
	}
	l.SetBudget(500, 0.9, 0.6)
	if l.Budget() != 500 {
		t.Fatalf("Budget after SetBudget = %d", l.Budget())
	}
	if got, want := cachedLocal(l, keys), []int{7, 8, 9}; !slices.Equal(got, want) {
		t.Fatalf("cached after SetBudget(500, low 0.6) = %v, want the 3 most recent %v", got, want)
	}
}

// Reserving room for an incoming blob of known size evicts before the
// download, so the disk never holds more than the budget.
func TestLocalCreateBlobMakesRoom(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1000, HighWatermark: 0.9, LowWatermark: 0.5})
	var keys []Key
	for i := range 8 {
		keys = append(keys, commitLocal(t, l, localBlobOf(i, 100)))
	}
	big := localBlobOf(100, 300)
	w, err := l.CreateBlob(localKeyOf(big), int64(len(big)))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Abort()
	// 800 + 300 > 900: room for 300 below 500 means 200 stays.
	if got, want := cachedLocal(l, keys), []int{6, 7}; !slices.Equal(got, want) {
		t.Fatalf("cached while reserving = %v, want %v", got, want)
	}
	if _, err := l.CreateBlob(localKeyOf(localBlobOf(101, 1)), 1001); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("CreateBlob larger than the budget = %v, want ErrNoSpace", err)
	}
}

func TestLocalFreeSpaceHook(t *testing.T) {
	var free int64
	var ferr error
	var asked []string
	var mu sync.Mutex
	root := t.TempDir()
	l := openTestLocal(t, root, LocalOptions{Budget: 1 << 30, FreeSpace: func(dir string) (int64, error) {
		mu.Lock()
		defer mu.Unlock()
		asked = append(asked, dir)
		return free, ferr
	}})
	b := localBlobOf(1, 1000)
	if _, err := l.CreateBlob(localKeyOf(b), int64(len(b))); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("CreateBlob on a full disk = %v, want ErrNoSpace", err)
	}
	if _, err := l.CreateBlob(localKeyOf(b), -1); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("CreateBlob of unknown size on a full disk = %v, want ErrNoSpace", err)
	}
	mu.Lock()
	if len(asked) == 0 || asked[0] != filepath.Join(root, "tmp") {
		t.Fatalf("FreeSpace asked about %v, want the tmp directory", asked)
	}
	free = 10 << 30
	mu.Unlock()
	commitLocal(t, l, b)
	// When the filesystem cannot tell, the write itself finds out.
	mu.Lock()
	free, ferr = 0, errors.New("statfs failed")
	mu.Unlock()
	commitLocal(t, l, localBlobOf(2, 10))
}

// Use bumps a blob's modification time, and a restart orders the LRU by
// it, so recently used blobs outlive a restart's eviction.
func TestLocalLRUOrderSurvivesReopen(t *testing.T) {
	root := t.TempDir()
	l := openTestLocal(t, root, LocalOptions{Budget: 1 << 20})
	var keys []Key
	base := time.Now().Add(-time.Hour)
	for i := range 4 {
		k := commitLocal(t, l, localBlobOf(i, 100))
		// Distinct commit times: file timestamps are too coarse to order
		// four writes made within microseconds.
		at := base.Add(time.Duration(i) * time.Minute)
		if err := os.Chtimes(l.blobPath(k), at, at); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	readLocalBlob(t, l, keys[0]) // now the most recently used
	// 400 bytes over a budget of 400 at 0.9: evict down to 200, the two
	// least recently used (1 and 2).
	l2 := openTestLocal(t, root, LocalOptions{Budget: 400, HighWatermark: 0.9, LowWatermark: 0.5})
	if got, want := cachedLocal(l2, keys), []int{0, 3}; !slices.Equal(got, want) {
		t.Fatalf("cached after reopen = %v, want %v", got, want)
	}
}

func TestLocalOpenBlobOfRemovedFileForgetsIt(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1 << 20})
	k := commitLocal(t, l, localBlobOf(1, 100))
	os.Remove(l.blobPath(k))
	if _, _, _, err := l.OpenBlob(k); !errors.Is(err, ErrNotFound) {
		t.Fatalf("OpenBlob of a file removed behind berth's back = %v, want ErrNotFound", err)
	}
	if _, ok := l.HasBlob(k); ok {
		t.Fatal("removed blob still indexed")
	}
	if bytes, n := l.Usage(); bytes != 0 || n != 0 {
		t.Fatalf("Usage = %d, %d after forgetting the only blob", bytes, n)
	}
}

func TestLocalDeleteBlobKeepsOpenReaders(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1 << 20})
	b := localBlobOf(1, 100)
	k := commitLocal(t, l, b)
	f, _, release, err := l.OpenBlob(k)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	defer f.Close()
	l.DeleteBlob(k)
	if _, ok := l.HasBlob(k); ok {
		t.Fatal("deleted blob still indexed")
	}
	if got, err := io.ReadAll(f); err != nil || !bytes.Equal(got, b) {
		t.Fatalf("open reader after DeleteBlob: %v", err)
	}
}

func TestLocalManifests(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1 << 20})
	content := []byte(`{"schemaVersion":2}`)
	k := Key{Upstream: localTestUpstream, Digest: digest.FromBytes(content)}
	if err := l.PutManifest(k, Manifest{MediaType: "application/vnd.oci.image.manifest.v1+json", Content: []byte(`{"other":1}`)}); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("PutManifest with wrong bytes = %v, want ErrDigestMismatch", err)
	}
	if _, err := l.GetManifest(k); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetManifest after rejected put = %v", err)
	}
	m := Manifest{MediaType: "application/vnd.oci.image.manifest.v1+json", Content: content}
	if err := l.PutManifest(k, m); err != nil {
		t.Fatal(err)
	}
	got, err := l.GetManifest(k)
	if err != nil || got.MediaType != m.MediaType || !bytes.Equal(got.Content, content) {
		t.Fatalf("GetManifest = %+v, %v", got, err)
	}
	// Damage on disk is caught on read, never served.
	p := l.manifestPath(k)
	os.WriteFile(p, []byte(`{"mediaType":"x","content":"e30="}`), 0o644)
	if _, err := l.GetManifest(k); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetManifest of a damaged file = %v, want ErrNotFound", err)
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("damaged manifest file was kept")
	}
	if _, err := l.GetManifest(Key{Upstream: localTestUpstream, Digest: "sha256:nope"}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetManifest of an invalid digest = %v", err)
	}
}

func TestLocalTagsAndRepositories(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1 << 20})
	if _, err := l.GetTag("docker.io", "library/alpine", "3"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetTag of unknown tag = %v", err)
	}
	if _, err := l.Tags("docker.io", "library/alpine"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Tags of unknown repo = %v", err)
	}
	rec := TagRecord{Digest: digest.FromString("a"), MediaType: "m", Size: 1, Checked: time.Now().Round(0)}
	for _, x := range []struct{ up, repo, tag string }{
		{"docker.io", "library/alpine", "3"},
		{"docker.io", "library/alpine", "latest"},
		{"docker.io", "org/app", "v1"},
		{"docker.io", "org/app/sub", "v1"},
		{"127.0.0.1:5001", "team/tool", "1.0"},
	} {
		if err := l.PutTag(x.up, x.repo, x.tag, rec); err != nil {
			t.Fatal(err)
		}
	}
	got, err := l.GetTag("docker.io", "library/alpine", "3")
	if err != nil || got.Digest != rec.Digest || !got.Checked.Equal(rec.Checked) {
		t.Fatalf("GetTag = %+v, %v", got, err)
	}
	tags, err := l.Tags("docker.io", "library/alpine")
	sort.Strings(tags)
	if err != nil || !slices.Equal(tags, []string{"3", "latest"}) {
		t.Fatalf("Tags = %v, %v", tags, err)
	}
	repos, err := l.Repositories()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range repos {
		names = append(names, r[0]+" "+r[1])
	}
	sort.Strings(names)
	want := []string{"127.0.0.1:5001 team/tool", "docker.io library/alpine", "docker.io org/app", "docker.io org/app/sub"}
	if !slices.Equal(names, want) {
		t.Fatalf("Repositories = %q, want %q", names, want)
	}
}

// A download in progress holds its declared size against the budget until
// it commits or aborts: otherwise every concurrent cold download passes the
// check and together they overrun the budget.
func TestLocalDownloadsReserveTheirSize(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1000})
	a, b := localBlobOf(1, 600), localBlobOf(2, 600)
	wa, err := l.CreateBlob(localKeyOf(a), int64(len(a)))
	if err != nil {
		t.Fatal(err)
	}
	if w, err := l.CreateBlob(localKeyOf(b), int64(len(b))); !errors.Is(err, ErrNoSpace) {
		if w != nil {
			w.Abort()
		}
		t.Fatalf("second 600-byte download into a 1000-byte budget = %v, want ErrNoSpace", err)
	}
	wa.Abort()
	wb, err := l.CreateBlob(localKeyOf(b), int64(len(b)))
	if err != nil {
		t.Fatalf("download after the other one aborted: %v", err)
	}
	// A failed commit gives the reservation back too.
	bad := bytes.Clone(b)
	bad[0] ^= 0xff
	wb.Write(bad)
	if err := wb.Commit(); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Commit of corrupt bytes = %v", err)
	}
	// A committed blob's reservation is gone: it is cached bytes, which
	// eviction can free for the next download.
	kb := commitLocal(t, l, b)
	w, err := l.CreateBlob(localKeyOf(a), int64(len(a)))
	if err != nil {
		t.Fatalf("600-byte download beside a 600-byte cached blob: %v", err)
	}
	defer w.Abort()
	if _, ok := l.HasBlob(kb); ok {
		t.Fatal("the cached blob was not evicted to make room")
	}
}

func TestLocalConcurrentColdDownloadsCannotOverrunBudget(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1000})
	const n = 8
	var wg sync.WaitGroup
	var mu sync.Mutex
	var admitted []*BlobWriter
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			w, err := l.CreateBlob(localKeyOf(localBlobOf(i, 600)), 600)
			if err == nil {
				mu.Lock()
				admitted = append(admitted, w)
				mu.Unlock()
			} else if !errors.Is(err, ErrNoSpace) {
				t.Errorf("CreateBlob: %v", err)
			}
		})
	}
	close(start)
	wg.Wait()
	for _, w := range admitted {
		w.Abort()
	}
	if len(admitted) != 1 {
		t.Fatalf("%d concurrent 600-byte downloads admitted into a 1000-byte budget, want 1", len(admitted))
	}
}

// Eviction makes room for the downloads in progress as well as for cached
// blobs.
func TestLocalEvictionCountsDownloadsInProgress(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1000, HighWatermark: 0.9, LowWatermark: 0.5})
	big := localBlobOf(100, 400)
	w, err := l.CreateBlob(localKeyOf(big), int64(len(big)))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Abort()
	var keys []Key
	for i := range 5 {
		keys = append(keys, commitLocal(t, l, localBlobOf(i, 100)))
	}
	// 500 cached + 400 reserved is the high watermark: nothing goes yet.
	if got := cachedLocal(l, keys); len(got) != 5 {
		t.Fatalf("evicted at the high watermark; cached %v", got)
	}
	keys = append(keys, commitLocal(t, l, localBlobOf(5, 100)))
	// 1000 > 900: down to 500 with 400 of it promised to the download.
	if got, want := cachedLocal(l, keys), []int{5}; !slices.Equal(got, want) {
		t.Fatalf("cached after eviction %v, want %v", got, want)
	}
}

// The free-disk check counts what downloads in progress are still to
// write, so two downloads that each fit on the disk alone are not both
// admitted.
func TestLocalDownloadsReserveFreeDisk(t *testing.T) {
	const margin = 64 << 20 // kept free for everything else
	var writing *BlobWriter
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1 << 40, FreeSpace: func(string) (int64, error) {
		free := int64(margin + 1000)
		if writing != nil {
			free -= writing.Written()
		}
		return free, nil
	}})
	a := localBlobOf(1, 600)
	w, err := l.CreateBlob(localKeyOf(a), int64(len(a)))
	if err != nil {
		t.Fatal(err)
	}
	writing = w
	defer w.Abort()
	if w2, err := l.CreateBlob(localKeyOf(localBlobOf(2, 600)), 600); !errors.Is(err, ErrNoSpace) {
		if w2 != nil {
			w2.Abort()
		}
		t.Fatalf("second 600-byte download onto a disk with 1000 bytes free = %v, want ErrNoSpace", err)
	}
	// Bytes written are gone from the disk's free space: they must not be
	// counted twice.
	if _, err := w.Write(a); err != nil {
		t.Fatal(err)
	}
	w3, err := l.CreateBlob(localKeyOf(localBlobOf(3, 400)), 400)
	if err != nil {
		t.Fatalf("400-byte download with 400 bytes free beside a finished write: %v", err)
	}
	defer w3.Abort()
	if _, err := l.CreateBlob(localKeyOf(localBlobOf(4, 1)), 1); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("1-byte download onto a disk promised in full = %v, want ErrNoSpace", err)
	}
}

// Eviction runs OnEvict and unlinks files without holding the cache lock,
// and a blob downloaded again the moment it is evicted keeps its new file.
func TestLocalEvictedBlobDownloadedAgainSurvives(t *testing.T) {
	first := localBlobOf(0, 100)
	var l *Local
	var once sync.Once
	redownload := make(chan error, 1)
	var waited bool
	l = openTestLocal(t, t.TempDir(), LocalOptions{
		Budget: 1000, HighWatermark: 0.9, LowWatermark: 0.5,
		OnEvict: func(k Key, size int64) {
			if k != localKeyOf(first) {
				return
			}
			once.Do(func() {
				go func() {
					w, err := l.CreateBlob(k, size)
					if err == nil {
						w.Write(first)
						err = w.Commit()
					}
					redownload <- err
				}()
				select {
				case err := <-redownload:
					waited = true
					if err != nil {
						t.Errorf("downloading the evicted blob again: %v", err)
					}
				case <-time.After(5 * time.Second):
					t.Error("a download started from OnEvict could not finish: eviction holds the cache lock")
				}
			})
		},
	})
	for i := range 10 {
		commitLocal(t, l, localBlobOf(i, 100))
	}
	if !waited {
		if err := <-redownload; err != nil {
			t.Fatalf("downloading the evicted blob again: %v", err)
		}
	}
	if _, ok := l.HasBlob(localKeyOf(first)); !ok {
		t.Fatal("the blob downloaded again is not cached")
	}
	if got := readLocalBlob(t, l, localKeyOf(first)); !bytes.Equal(got, first) {
		t.Fatal("the blob downloaded again reads back wrong")
	}
}

// DeleteBlob followed by a fresh download must not lose the new file either.
func TestLocalDeletedBlobDownloadedAgainSurvives(t *testing.T) {
	l := openTestLocal(t, t.TempDir(), LocalOptions{Budget: 1 << 20})
	b := localBlobOf(1, 100)
	k := commitLocal(t, l, b)
	l.DeleteBlob(k)
	commitLocal(t, l, b)
	if got := readLocalBlob(t, l, k); !bytes.Equal(got, b) {
		t.Fatal("blob downloaded again after a delete reads back wrong")
	}
}

// What a cache remembers of when it last bumped a file's time is its own:
// a cache opened afresh on the same directory (as after a restart) bumps
// the times of the blobs it serves, so its LRU order survives the next
// restart too.
func TestLocalTouchMemoryIsPerCache(t *testing.T) {
	root := t.TempDir()
	l := openTestLocal(t, root, LocalOptions{Budget: 1 << 20})
	k := commitLocal(t, l, localBlobOf(1, 100))
	readLocalBlob(t, l, k)

	l2 := openTestLocal(t, root, LocalOptions{Budget: 1 << 20})
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(l2.blobPath(k), old, old); err != nil {
		t.Fatal(err)
	}
	readLocalBlob(t, l2, k)
	info, err := os.Stat(l2.blobPath(k))
	if err != nil {
		t.Fatal(err)
	}
	if info.ModTime().Before(time.Now().Add(-time.Minute)) {
		t.Fatalf("a blob served by a freshly opened cache kept its hour-old time %v", info.ModTime())
	}
}

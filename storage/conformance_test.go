package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/internal/testsupport"
)

// bucketUnderTest is one Bucket implementation, fresh and empty for one test.
type bucketUnderTest struct {
	// host is a host's view of the bucket; its leases carry holder.
	host func(holder string) Bucket
	// wait lets d pass on the clock the bucket judges leases by.
	wait func(d time.Duration)
	// ttl is a short lease TTL. A lease taken for ttl is live for ttl and
	// has surely expired expired later: S3 judges expiry in whole seconds
	// with a second of slack, so it may expire up to two seconds late.
	ttl, expired time.Duration
}

func TestBucketConformance(t *testing.T) {
	t.Run("Memory", func(t *testing.T) {
		testBucket(t, func(t *testing.T) bucketUnderTest {
			clock := newFakeClock()
			m := NewMemory(MemoryOptions{Holder: "unused", Now: clock.now})
			return bucketUnderTest{
				host: func(holder string) Bucket { return m.Host(holder) },
				wait: clock.advance,
				ttl:  2 * time.Second, expired: 2 * time.Second,
			}
		})
	})
	t.Run("MinIO", func(t *testing.T) {
		m := testsupport.StartMinIO(t)
		setTestAWSEnv(t) // here: the parallel subtests cannot set it
		testBucket(t, func(t *testing.T) bucketUnderTest {
			bucket := m.NewBucket(t)
			return bucketUnderTest{
				host: func(holder string) Bucket { return newMinIOS3InEnv(t, m, bucket, holder, nil) },
				wait: time.Sleep,
				ttl:  2 * time.Second, expired: 4 * time.Second,
			}
		})
	})
}

// fakeClock is a bucket clock that moves only when told.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Now()} }

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// randomBlob is n random bytes and their key.
func randomBlob(t *testing.T, n int) ([]byte, Key) {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b, Key{Upstream: "docker.io", Digest: digest.FromBytes(b)}
}

// onlyReaderAt hides everything but ReadAt, so PutBlob cannot depend on a
// reader's position.
type onlyReaderAt struct{ r io.ReaderAt }

func (o onlyReaderAt) ReadAt(p []byte, off int64) (int, error) { return o.r.ReadAt(p, off) }

func getAll(t *testing.T, ctx context.Context, b Bucket, k Key, offset int64) ([]byte, int64) {
	t.Helper()
	rc, size, err := b.GetBlob(ctx, k, offset)
	if err != nil {
		t.Fatalf("GetBlob(%s, %d): %v", k, offset, err)
	}
	defer rc.Close()
	got, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading blob %s from %d: %v", k, offset, err)
	}
	return got, size
}

// testBucket holds a Bucket implementation to the behaviour the engine
// relies on. Each subtest gets a fresh bucket from newBucket.
func testBucket(t *testing.T, newBucket func(t *testing.T) bucketUnderTest) {
	run := func(name string, fn func(t *testing.T, f bucketUnderTest, ctx context.Context)) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			fn(t, newBucket(t), testCtx(t, 2*time.Minute))
		})
	}

	run("Blob", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		a, b := f.host("host-a"), f.host("host-b")
		want, k := randomBlob(t, 100<<10)
		if _, _, err := a.GetBlob(ctx, k, 0); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetBlob before put = %v, want ErrNotFound", err)
		}
		if _, _, err := a.GetBlob(ctx, k, 10); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetBlob from an offset before put = %v, want ErrNotFound", err)
		}
		if _, err := a.StatBlob(ctx, k); !errors.Is(err, ErrNotFound) {
			t.Fatalf("StatBlob before put = %v, want ErrNotFound", err)
		}
		if err := a.PutBlob(ctx, k, onlyReaderAt{bytes.NewReader(want)}, int64(len(want))); err != nil {
			t.Fatal(err)
		}
		if got, size := getAll(t, ctx, b, k, 0); size != int64(len(want)) || !bytes.Equal(got, want) {
			t.Fatalf("GetBlob returned %d bytes (size %d), want the %d put", len(got), size, len(want))
		}
		if n, err := b.StatBlob(ctx, k); err != nil || n != int64(len(want)) {
			t.Errorf("StatBlob = %d, %v; want %d", n, err, len(want))
		}
		// Another host's put of a blob the bucket holds is a no-op.
		if err := b.PutBlob(ctx, k, bytes.NewReader(want), int64(len(want))); err != nil {
			t.Errorf("second PutBlob: %v", err)
		}
		if got, _ := getAll(t, ctx, a, k, 0); !bytes.Equal(got, want) {
			t.Error("blob changed by a second put")
		}

		if err := b.DeleteBlob(ctx, k); err != nil {
			t.Fatal(err)
		}
		if _, err := a.StatBlob(ctx, k); !errors.Is(err, ErrNotFound) {
			t.Errorf("StatBlob after delete = %v, want ErrNotFound", err)
		}
		if _, _, err := a.GetBlob(ctx, k, 0); !errors.Is(err, ErrNotFound) {
			t.Errorf("GetBlob after delete = %v, want ErrNotFound", err)
		}
		if err := a.DeleteBlob(ctx, k); err != nil {
			t.Errorf("deleting a missing blob: %v", err)
		}
	})

	run("BlobFromOffset", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		a := f.host("host-a")
		want, k := randomBlob(t, 64<<10)
		if err := a.PutBlob(ctx, k, bytes.NewReader(want), int64(len(want))); err != nil {
			t.Fatal(err)
		}
		for _, off := range []int64{1, 4096, int64(len(want)) / 2, int64(len(want)) - 1} {
			got, size := getAll(t, ctx, a, k, off)
			if size != int64(len(want)) {
				t.Errorf("GetBlob from %d: size %d, want the blob's total %d", off, size, len(want))
			}
			if !bytes.Equal(got, want[off:]) {
				t.Errorf("GetBlob from %d returned %d bytes, not the blob's last %d", off, len(got), int64(len(want))-off)
			}
		}
		for _, off := range []int64{int64(len(want)), int64(len(want)) + 1, 1 << 40} {
			rc, _, err := a.GetBlob(ctx, k, off)
			if err == nil {
				rc.Close()
				t.Errorf("GetBlob from %d of a %d-byte blob succeeded", off, len(want))
				continue
			}
			if !errors.Is(err, ErrOffsetPastEnd) || errors.Is(err, ErrNotFound) {
				t.Errorf("GetBlob from %d of a %d-byte blob = %v, want ErrOffsetPastEnd (not a miss)", off, len(want), err)
			}
		}
		if _, _, err := a.GetBlob(ctx, k, -1); err == nil || errors.Is(err, ErrNotFound) {
			t.Errorf("GetBlob from -1 = %v, want an error other than ErrNotFound", err)
		}
	})

	run("EmptyBlob", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		a := f.host("host-a")
		k := Key{Upstream: "docker.io", Digest: digest.FromBytes(nil)}
		if err := a.PutBlob(ctx, k, bytes.NewReader(nil), 0); err != nil {
			t.Fatal(err)
		}
		if got, size := getAll(t, ctx, a, k, 0); size != 0 || len(got) != 0 {
			t.Errorf("empty blob read back as %d bytes, size %d", len(got), size)
		}
		if _, _, err := a.GetBlob(ctx, k, 1); !errors.Is(err, ErrOffsetPastEnd) {
			t.Errorf("GetBlob from 1 of an empty blob = %v, want ErrOffsetPastEnd", err)
		}
	})

	run("PutBlobStream", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		a, b := f.host("host-a"), f.host("host-b")
		want, k := randomBlob(t, 100<<10)
		if err := a.PutBlobStream(ctx, k, iotest.HalfReader(bytes.NewReader(want))); err != nil {
			t.Fatal(err)
		}
		if got, size := getAll(t, ctx, b, k, 0); size != int64(len(want)) || !bytes.Equal(got, want) {
			t.Fatalf("streamed blob read back as %d bytes (size %d), want %d", len(got), size, len(want))
		}
		if err := b.PutBlobStream(ctx, k, bytes.NewReader(want)); err != nil {
			t.Errorf("second PutBlobStream of a present blob: %v", err)
		}
		// A body that fails at its very end (as a relay's does on a digest
		// mismatch) leaves no object behind.
		other, ok := randomBlob(t, 100<<10)
		failing := io.MultiReader(bytes.NewReader(other[:len(other)-1]), iotest.ErrReader(errors.New("digest mismatch")))
		if err := a.PutBlobStream(ctx, ok, failing); err == nil {
			t.Fatal("an upload whose body failed succeeded")
		}
		if _, err := b.StatBlob(ctx, ok); !errors.Is(err, ErrNotFound) {
			t.Fatalf("after a failed streamed upload StatBlob = %v, want ErrNotFound", err)
		}
		if err := a.PutBlobStream(ctx, ok, bytes.NewReader(other)); err != nil {
			t.Fatalf("streaming the blob again after a failed upload: %v", err)
		}
		if got, _ := getAll(t, ctx, b, ok, 0); !bytes.Equal(got, other) {
			t.Fatal("blob streamed after a failed upload reads back wrong")
		}
	})

	run("Manifest", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		a, b := f.host("host-a"), f.host("host-b")
		content := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`)
		k := Key{Upstream: "docker.io", Digest: digest.FromBytes(content)}
		if _, err := b.GetManifest(ctx, k); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetManifest before put = %v, want ErrNotFound", err)
		}
		if err := a.PutManifest(ctx, k, Manifest{MediaType: "x", Content: []byte(`{"other":1}`)}); err == nil {
			t.Fatal("PutManifest accepted content that does not match the digest")
		}
		if _, err := b.GetManifest(ctx, k); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetManifest after a refused put = %v, want ErrNotFound", err)
		}
		mt := "application/vnd.oci.image.index.v1+json"
		put := bytes.Clone(content)
		if err := a.PutManifest(ctx, k, Manifest{MediaType: mt, Content: put}); err != nil {
			t.Fatal(err)
		}
		put[0] = 'X' // the caller's buffer is the caller's
		if err := b.PutManifest(ctx, k, Manifest{MediaType: mt, Content: content}); err != nil {
			t.Errorf("second host's PutManifest: %v", err)
		}
		got, err := b.GetManifest(ctx, k)
		if err != nil || got.MediaType != mt || !bytes.Equal(got.Content, content) {
			t.Fatalf("GetManifest = %q %q, %v; want %q with its media type", got.MediaType, got.Content, err, content)
		}
		got.Content[0] = 'X'
		if again, err := a.GetManifest(ctx, k); err != nil || !bytes.Equal(again.Content, content) {
			t.Fatalf("GetManifest after the caller changed a returned copy = %q, %v", again.Content, err)
		}
	})

	run("Tag", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		a, b := f.host("host-a"), f.host("host-b")
		if _, err := b.GetTag(ctx, "docker.io", "library/alpine", "3.19"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetTag before put = %v, want ErrNotFound", err)
		}
		rec := TagRecord{Digest: digest.FromString("one"), MediaType: "application/vnd.oci.image.index.v1+json", Size: 9218, Checked: time.Now().UTC().Truncate(time.Millisecond)}
		if err := a.PutTag(ctx, "docker.io", "library/alpine", "3.19", rec); err != nil {
			t.Fatal(err)
		}
		got, err := b.GetTag(ctx, "docker.io", "library/alpine", "3.19")
		if err != nil || got.Digest != rec.Digest || got.MediaType != rec.MediaType || got.Size != rec.Size || !got.Checked.Equal(rec.Checked) {
			t.Fatalf("GetTag = %+v, %v; want %+v", got, err, rec)
		}
		// Tags are the mutable part: a revalidation overwrites the record.
		rec2 := rec
		rec2.Digest = digest.FromString("two")
		rec2.Checked = rec.Checked.Add(time.Minute)
		if err := b.PutTag(ctx, "docker.io", "library/alpine", "3.19", rec2); err != nil {
			t.Fatal(err)
		}
		if got, err := a.GetTag(ctx, "docker.io", "library/alpine", "3.19"); err != nil || got.Digest != rec2.Digest || !got.Checked.Equal(rec2.Checked) {
			t.Fatalf("GetTag after overwrite = %+v, %v; want %+v", got, err, rec2)
		}
		for _, c := range [][3]string{{"docker.io", "library/alpine", "3.20"}, {"ghcr.io", "library/alpine", "3.19"}, {"docker.io", "library/alpine/3.19", "latest"}} {
			if _, err := a.GetTag(ctx, c[0], c[1], c[2]); !errors.Is(err, ErrNotFound) {
				t.Errorf("GetTag%q = %v, want ErrNotFound", c, err)
			}
		}
	})

	run("InvalidNames", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		a := f.host("host-a")
		bad := Key{Upstream: "a/b", Digest: digest.FromString("x")}
		notMiss := func(what string, err error) {
			t.Helper()
			if err == nil || errors.Is(err, ErrNotFound) {
				t.Errorf("%s = %v, want an error other than ErrNotFound", what, err)
			}
		}
		_, _, err := a.GetBlob(ctx, bad, 0)
		notMiss("GetBlob with an invalid upstream", err)
		_, err = a.GetManifest(ctx, Key{Upstream: "docker.io", Digest: "sha256:abc"})
		notMiss("GetManifest with an invalid digest", err)
		_, err = a.GetTag(ctx, "docker.io", "../x", "latest")
		notMiss("GetTag with an invalid repository", err)
		_, err = a.AcquireLease(ctx, "a//b", time.Minute)
		notMiss("AcquireLease with an invalid name", err)
	})

	run("Ping", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		if err := f.host("host-a").Ping(ctx); err != nil {
			t.Fatal(err)
		}
	})

	run("LeaseHeldAndReleased", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		a, b := f.host("host-a:5000"), f.host("host-b:5000")
		name := BlobLeaseName(Key{Upstream: "docker.io", Digest: digest.FromString("layer")})
		la, err := a.AcquireLease(ctx, name, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if la.TookOver() {
			t.Error("a fresh lease reports a takeover")
		}
		_, err = b.AcquireLease(ctx, name, time.Minute)
		var held *LeaseHeldError
		if !errors.As(err, &held) || !errors.Is(err, ErrLeaseHeld) {
			t.Fatalf("second host got %v, want a *LeaseHeldError", err)
		}
		if held.Name != name || held.Holder != "host-a:5000" || held.Expires.Before(time.Now().Add(50*time.Second)) {
			t.Errorf("LeaseHeldError = %+v; want %s held by host-a:5000 about a minute out", held, name)
		}
		// Anyone can read who holds it, without taking it.
		if h, err := b.LeaseHolder(ctx, name); err != nil || h != "host-a:5000" {
			t.Errorf("LeaseHolder of a held lease = %q, %v; want host-a:5000", h, err)
		}
		if _, err := b.LeaseHolder(ctx, BlobLeaseName(Key{Upstream: "docker.io", Digest: digest.FromString("never leased")})); !errors.Is(err, ErrNotFound) {
			t.Errorf("LeaseHolder of a lease never taken = %v, want ErrNotFound", err)
		}
		// The holder itself cannot take it twice either.
		if _, err := a.AcquireLease(ctx, name, time.Minute); !errors.Is(err, ErrLeaseHeld) {
			t.Errorf("re-acquiring a held lease = %v, want ErrLeaseHeld", err)
		}
		// Leases are independent of each other.
		other, err := b.AcquireLease(ctx, TagLeaseName("docker.io", "library/alpine", "latest"), time.Minute)
		if err != nil {
			t.Fatalf("another lease: %v", err)
		}
		if err := other.Release(ctx); err != nil {
			t.Fatal(err)
		}

		if err := la.Release(ctx); err != nil {
			t.Fatal(err)
		}
		if h, err := b.LeaseHolder(ctx, name); !errors.Is(err, ErrNotFound) {
			t.Errorf("LeaseHolder of a released lease = %q, %v; want ErrNotFound", h, err)
		}
		lb, err := b.AcquireLease(ctx, name, time.Minute)
		if err != nil {
			t.Fatalf("acquire after release: %v", err)
		}
		if lb.TookOver() {
			t.Error("a lease taken after a release reports a takeover")
		}
		// A stale Release from the old holder must not drop the new lease.
		if err := la.Release(ctx); err != nil {
			t.Errorf("second release: %v", err)
		}
		if _, err := a.AcquireLease(ctx, name, time.Minute); !errors.As(err, &held) || held.Holder != "host-b:5000" {
			t.Errorf("after a stale release, acquire = %v; want held by host-b:5000", err)
		}
		if err := lb.Release(ctx); err != nil {
			t.Fatal(err)
		}
	})

	run("LeaseTakeOverFromADeadHolder", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		a, b, c := f.host("host-a"), f.host("host-b"), f.host("host-c")
		name := BlobLeaseName(Key{Upstream: "docker.io", Digest: digest.FromString("takeover")})
		la, err := a.AcquireLease(ctx, name, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		_, err = b.AcquireLease(ctx, name, time.Minute)
		var seen *LeaseHeldError
		if !errors.As(err, &seen) {
			t.Fatalf("live lease: %v", err)
		}
		// host-a renews: it is alive, and a takeover on the old sighting fails.
		if err := la.Renew(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := b.TakeOver(ctx, seen, time.Minute); !errors.Is(err, ErrLeaseHeld) {
			t.Fatalf("takeover of a lease renewed since it was seen: %v, want ErrLeaseHeld", err)
		}
		// host-a dies: host-b sees the lease again and takes it over at once.
		_, err = b.AcquireLease(ctx, name, time.Minute)
		if !errors.As(err, &seen) {
			t.Fatalf("live lease: %v", err)
		}
		lb, err := b.TakeOver(ctx, seen, time.Minute)
		if err != nil {
			t.Fatalf("takeover from a dead holder: %v", err)
		}
		if !lb.TookOver() {
			t.Error("takeover not reported")
		}
		if err := la.Renew(ctx); !errors.Is(err, ErrLeaseLost) {
			t.Errorf("old holder's Renew = %v, want ErrLeaseLost", err)
		}
		// Only one of two hosts taking over on the same sighting wins.
		if _, err := c.TakeOver(ctx, seen, time.Minute); !errors.Is(err, ErrLeaseHeld) {
			t.Errorf("second takeover on the same sighting: %v, want ErrLeaseHeld", err)
		}
		if _, err := c.AcquireLease(ctx, name, time.Minute); !errors.As(err, &seen) || seen.Holder != "host-b" {
			t.Errorf("after the takeover the lease is %v, want held by host-b", err)
		}
		if err := lb.Release(ctx); err != nil {
			t.Fatal(err)
		}
	})

	run("LeaseExpiryTakeover", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		a, b, c := f.host("host-a"), f.host("host-b"), f.host("host-c")
		name := TagLeaseName("docker.io", "library/alpine", "latest")
		la, err := a.AcquireLease(ctx, name, f.ttl)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.AcquireLease(ctx, name, time.Minute); !errors.Is(err, ErrLeaseHeld) {
			t.Fatalf("live short lease not held: %v", err)
		}
		f.wait(f.expired) // as if host-a died mid-fetch
		if h, err := c.LeaseHolder(ctx, name); !errors.Is(err, ErrNotFound) {
			t.Errorf("LeaseHolder of an expired lease = %q, %v; want ErrNotFound", h, err)
		}
		lb, err := b.AcquireLease(ctx, name, time.Minute)
		if err != nil {
			t.Fatalf("takeover of an expired lease: %v", err)
		}
		if !lb.TookOver() {
			t.Error("takeover not reported")
		}
		if err := la.Renew(ctx); !errors.Is(err, ErrLeaseLost) {
			t.Errorf("old holder's Renew = %v, want ErrLeaseLost", err)
		}
		if err := la.Release(ctx); err != nil {
			t.Errorf("old holder's Release: %v", err)
		}
		var held *LeaseHeldError
		if _, err := c.AcquireLease(ctx, name, time.Minute); !errors.As(err, &held) || held.Holder != "host-b" {
			t.Errorf("after the old holder's release, a third host got %v; want held by host-b", err)
		}
	})

	run("LeaseRenew", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		a, b := f.host("host-a"), f.host("host-b")
		name := BlobLeaseName(Key{Upstream: "docker.io", Digest: digest.FromString("renew")})
		la, err := a.AcquireLease(ctx, name, f.ttl)
		if err != nil {
			t.Fatal(err)
		}
		// Renewed every half TTL until an unrenewed lease would surely
		// have expired, it is still held.
		for waited := time.Duration(0); waited < f.expired; waited += f.ttl / 2 {
			f.wait(f.ttl / 2)
			if err := la.Renew(ctx); err != nil {
				t.Fatalf("Renew after %v: %v", waited+f.ttl/2, err)
			}
		}
		if _, err := b.AcquireLease(ctx, name, time.Minute); !errors.Is(err, ErrLeaseHeld) {
			t.Fatalf("renewed lease taken: %v", err)
		}
		if err := la.Release(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := b.AcquireLease(ctx, name, time.Minute); err != nil {
			t.Fatalf("acquire after the renewed lease's release: %v", err)
		}
	})

	run("ConcurrentAcquireOneWinner", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		const hosts = 6
		name := BlobLeaseName(Key{Upstream: "docker.io", Digest: digest.FromString("cold")})
		var wins atomic.Int32
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range hosts {
			h := f.host("host-" + string(rune('a'+i)))
			wg.Go(func() {
				<-start
				_, err := h.AcquireLease(ctx, name, time.Minute)
				if err == nil {
					wins.Add(1)
				} else if !errors.Is(err, ErrLeaseHeld) {
					t.Errorf("host %d: %v", i, err)
				}
			})
		}
		close(start)
		wg.Wait()
		if wins.Load() != 1 {
			t.Fatalf("%d hosts took the same new lease; want exactly one", wins.Load())
		}
	})

	run("ConcurrentTakeoverOneWinner", func(t *testing.T, f bucketUnderTest, ctx context.Context) {
		const hosts = 6
		var tiers []Bucket
		for i := range hosts {
			tiers = append(tiers, f.host("host-"+string(rune('a'+i))))
		}
		for round := range 2 {
			name := BlobLeaseName(Key{Upstream: "docker.io", Digest: digest.FromString("contended" + string(rune('0'+round)))})
			if _, err := tiers[0].AcquireLease(ctx, name, f.ttl); err != nil {
				t.Fatal(err)
			}
			f.wait(f.expired) // as if host-a died mid-fetch
			var wins, helds atomic.Int32
			var wg sync.WaitGroup
			start := make(chan struct{})
			for i := 1; i < hosts; i++ {
				wg.Go(func() {
					<-start
					l, err := tiers[i].AcquireLease(ctx, name, time.Minute)
					switch {
					case err == nil:
						if !l.TookOver() {
							t.Errorf("host %d won without a takeover", i)
						}
						wins.Add(1)
					case errors.Is(err, ErrLeaseHeld):
						helds.Add(1)
					default:
						t.Errorf("host %d: %v", i, err)
					}
				})
			}
			close(start)
			wg.Wait()
			if wins.Load() != 1 || helds.Load() != hosts-2 {
				t.Fatalf("round %d: %d hosts took over the expired lease and %d were refused; want exactly one winner", round, wins.Load(), helds.Load())
			}
		}
	})
}

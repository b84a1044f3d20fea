package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/internal/testsupport"
)

// newMinIOS3 is a tier on a fresh bucket of m, as one host with the given
// lease holder name.
func newMinIOS3(t *testing.T, m *testsupport.MinIO, bucket, holder string, mod func(*S3Options)) *S3 {
	t.Helper()
	return newTestS3(t, m.Endpoint, func(o *S3Options) {
		o.Bucket, o.Prefix, o.Region = bucket, "berth/", m.Region
		o.Credentials, o.Holder = m.Credentials(), holder
		if mod != nil {
			mod(o)
		}
	})
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// blobFile writes n random bytes to a file and returns it with its digest.
func blobFile(t *testing.T, n int) (*os.File, []byte, digest.Digest) {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "blob"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	// PutBlob must read from offset 0 whatever the file position.
	return f, b, digest.FromBytes(b)
}

func readBlob(t *testing.T, ctx context.Context, s *S3, k Key) ([]byte, int64) {
	t.Helper()
	rc, size, err := s.GetBlob(ctx, k)
	if err != nil {
		t.Fatalf("GetBlob %s: %v", k, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read blob %s: %v", k, err)
	}
	return b, size
}

// requestCounter counts OnRequest calls by operation.
type requestCounter struct {
	mu       sync.Mutex
	requests map[string]int
	failures map[string]int
}

func (c *requestCounter) hook(op string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.requests == nil {
		c.requests, c.failures = map[string]int{}, map[string]int{}
	}
	c.requests[op]++
	if err != nil {
		c.failures[op]++
	}
}

func (c *requestCounter) get(op string) (requests, failures int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.requests[op], c.failures[op]
}

func TestMinIO(t *testing.T) {
	m := testsupport.StartMinIO(t)

	t.Run("SmallBlob", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		bucket := m.NewBucket(t)
		var rc requestCounter
		s := newMinIOS3(t, m, bucket, "host-a", func(o *S3Options) { o.OnRequest = rc.hook })
		f, want, d := blobFile(t, 100<<10)
		k := Key{Upstream: "docker.io", Digest: d}

		if _, _, err := s.GetBlob(ctx, k); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetBlob before put = %v, want ErrNotFound", err)
		}
		if _, err := s.StatBlob(ctx, k); !errors.Is(err, ErrNotFound) {
			t.Fatalf("StatBlob before put = %v, want ErrNotFound", err)
		}
		if err := s.PutBlob(ctx, k, f, int64(len(want))); err != nil {
			t.Fatal(err)
		}
		if n, _ := rc.get("PutObject"); n != 1 {
			t.Errorf("small blob took %d PutObject requests, want one", n)
		}
		if n, _ := rc.get("CreateMultipartUpload"); n != 0 {
			t.Errorf("small blob went up as multipart")
		}
		got, size := readBlob(t, ctx, s, k)
		if size != int64(len(want)) || !bytes.Equal(got, want) {
			t.Fatalf("GetBlob returned %d bytes (size %d), want the %d put", len(got), size, len(want))
		}
		if n, err := s.StatBlob(ctx, k); err != nil || n != int64(len(want)) {
			t.Errorf("StatBlob = %d, %v", n, err)
		}
		raw, ok := m.GetObject(t, bucket, "berth/blobs/docker.io/sha256/"+d.Encoded())
		if !ok || !bytes.Equal(raw, want) {
			t.Error("blob is not at its documented key")
		}
		// Another host putting the same blob again is not an error.
		if err := s.PutBlob(ctx, k, f, int64(len(want))); err != nil {
			t.Errorf("second PutBlob: %v", err)
		}
		if _, fails := rc.get("PutObject"); fails != 0 {
			t.Errorf("%d PutObject requests counted as failures; a lost conditional write is normal", fails)
		}
	})

	t.Run("SmallBlobChecksumGuardsUpload", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		bucket := m.NewBucket(t)
		s := newMinIOS3(t, m, bucket, "host-a", nil)
		f, want, _ := blobFile(t, 4096)
		k := Key{Upstream: "docker.io", Digest: digest.FromString("something else")}
		if err := s.PutBlob(ctx, k, f, int64(len(want))); err == nil {
			t.Fatal("S3 accepted a body that does not match the blob's sha256")
		}
		if _, _, err := s.GetBlob(ctx, k); !errors.Is(err, ErrNotFound) {
			t.Errorf("after a refused upload GetBlob = %v, want ErrNotFound", err)
		}
	})

	t.Run("MultipartBlob", func(t *testing.T) {
		ctx := testCtx(t, 3*time.Minute)
		bucket := m.NewBucket(t)
		var rc requestCounter
		s := newMinIOS3(t, m, bucket, "host-a", func(o *S3Options) {
			o.PartSize = 5 << 20
			o.MultipartThreshold = 16 << 20
			o.Concurrency = 3
			o.OnRequest = rc.hook
		})
		f, want, d := blobFile(t, 40<<20)
		k := Key{Upstream: "ghcr.io", Digest: d}
		if err := s.PutBlob(ctx, k, f, int64(len(want))); err != nil {
			t.Fatal(err)
		}
		if n, _ := rc.get("UploadPart"); n != 8 {
			t.Errorf("40 MiB in 5 MiB parts took %d UploadPart requests, want 8", n)
		}
		if n, _ := rc.get("CompleteMultipartUpload"); n != 1 {
			t.Errorf("CompleteMultipartUpload requests = %d", n)
		}
		got, size := readBlob(t, ctx, s, k)
		if size != int64(len(want)) || digest.FromBytes(got) != d {
			t.Fatalf("multipart blob read back as %d bytes (size %d) with digest %s", len(got), size, digest.FromBytes(got))
		}
		// The fleet's second upload of a large blob must not resend its parts.
		if err := s.PutBlob(ctx, k, f, int64(len(want))); err != nil {
			t.Fatal(err)
		}
		if n, _ := rc.get("UploadPart"); n != 8 {
			t.Errorf("second PutBlob of a present blob sent parts: %d UploadPart in total", n)
		}
	})

	t.Run("StreamedBlob", func(t *testing.T) {
		ctx := testCtx(t, 3*time.Minute)
		bucket := m.NewBucket(t)
		s := newMinIOS3(t, m, bucket, "host-a", func(o *S3Options) { o.PartSize = 5 << 20 })
		for _, size := range []int{100 << 10, 12 << 20} { // one PUT; three parts
			_, want, d := blobFile(t, size)
			k := Key{Upstream: "docker.io", Digest: d}
			if err := s.PutBlobStream(ctx, k, bytes.NewReader(want)); err != nil {
				t.Fatalf("%d bytes: %v", size, err)
			}
			if got, n := readBlob(t, ctx, s, k); n != int64(size) || digest.FromBytes(got) != d {
				t.Fatalf("streamed blob of %d bytes read back as %d bytes (size %d)", size, len(got), n)
			}
			// A body that fails at its very end (as a relay does on a
			// digest mismatch) leaves no object behind.
			_, other, od := blobFile(t, size)
			ok := Key{Upstream: "docker.io", Digest: od}
			failing := io.MultiReader(bytes.NewReader(other[:size-1]), iotest.ErrReader(errors.New("digest mismatch")))
			if err := s.PutBlobStream(ctx, ok, failing); err == nil {
				t.Fatalf("%d bytes: an upload whose body failed succeeded", size)
			}
			if _, err := s.StatBlob(ctx, ok); !errors.Is(err, ErrNotFound) {
				t.Fatalf("%d bytes: after a failed streamed upload StatBlob = %v, want ErrNotFound", size, err)
			}
		}
	})

	t.Run("MultipartLosesRaceToAnotherHost", func(t *testing.T) {
		ctx := testCtx(t, 3*time.Minute)
		bucket := m.NewBucket(t)
		f, want, d := blobFile(t, 12<<20)
		key := "berth/blobs/docker.io/sha256/" + d.Encoded()
		var once sync.Once
		s := newMinIOS3(t, m, bucket, "host-a", func(o *S3Options) {
			o.PartSize = 5 << 20
			o.MultipartThreshold = 5 << 20
			o.OnRequest = func(op string, err error) {
				// Another host finishes the same blob while this one is
				// uploading parts.
				if op == "CreateMultipartUpload" {
					once.Do(func() { m.PutObject(t, bucket, key, []byte("other host's copy")) })
				}
			}
		})
		if err := s.PutBlob(ctx, Key{Upstream: "docker.io", Digest: d}, f, int64(len(want))); err != nil {
			t.Fatalf("PutBlob that lost the race: %v", err)
		}
		if raw, _ := m.GetObject(t, bucket, key); string(raw) != "other host's copy" {
			t.Fatal("multipart upload overwrote an object written during the upload")
		}
	})

	t.Run("ImmutableAndCorruptObjects", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		bucket := m.NewBucket(t)
		s := newMinIOS3(t, m, bucket, "host-a", nil)

		// A blob: corrupt bytes already at the key are not overwritten by
		// PutBlob; the reader detects them and deletes the blob.
		f, want, d := blobFile(t, 8192)
		k := Key{Upstream: "docker.io", Digest: d}
		blobKey := "berth/blobs/docker.io/sha256/" + d.Encoded()
		m.PutObject(t, bucket, blobKey, []byte("garbage"))
		if err := s.PutBlob(ctx, k, f, int64(len(want))); err != nil {
			t.Fatal(err)
		}
		if raw, _ := m.GetObject(t, bucket, blobKey); string(raw) != "garbage" {
			t.Fatal("PutBlob overwrote an existing object")
		}
		if err := s.DeleteBlob(ctx, k); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteBlob(ctx, k); err != nil {
			t.Errorf("deleting a missing blob: %v", err)
		}
		if err := s.PutBlob(ctx, k, f, int64(len(want))); err != nil {
			t.Fatal(err)
		}
		if got, _ := readBlob(t, ctx, s, k); !bytes.Equal(got, want) {
			t.Fatal("blob not replaced after delete")
		}

		// A manifest: verified on read, deleted when it does not match.
		content := []byte(`{"schemaVersion":2}`)
		mk := Key{Upstream: "docker.io", Digest: digest.FromBytes(content)}
		manKey := "berth/manifests/docker.io/sha256/" + mk.Digest.Encoded()
		m.PutObject(t, bucket, manKey, []byte(`{"schemaVersion":1}`))
		man := Manifest{MediaType: "application/vnd.oci.image.manifest.v1+json", Content: content}
		if err := s.PutManifest(ctx, mk, man); err != nil {
			t.Fatal(err)
		}
		_, err := s.GetManifest(ctx, mk)
		if !errors.Is(err, ErrCorrupt) || !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetManifest of corrupt object = %v, want ErrCorrupt and ErrNotFound", err)
		}
		if _, ok := m.GetObject(t, bucket, manKey); ok {
			t.Fatal("corrupt manifest left in the bucket")
		}
		if err := s.PutManifest(ctx, mk, man); err != nil {
			t.Fatal(err)
		}
		if got, err := s.GetManifest(ctx, mk); err != nil || !bytes.Equal(got.Content, content) {
			t.Fatalf("GetManifest after refetch = %q, %v", got.Content, err)
		}
	})

	t.Run("ManifestAndTag", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		bucket := m.NewBucket(t)
		a := newMinIOS3(t, m, bucket, "host-a", nil)
		b := newMinIOS3(t, m, bucket, "host-b", nil)

		content := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`)
		k := Key{Upstream: "docker.io", Digest: digest.FromBytes(content)}
		if _, err := b.GetManifest(ctx, k); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetManifest before put = %v", err)
		}
		man := Manifest{MediaType: "application/vnd.oci.image.index.v1+json", Content: content}
		if err := a.PutManifest(ctx, k, man); err != nil {
			t.Fatal(err)
		}
		if err := b.PutManifest(ctx, k, man); err != nil {
			t.Errorf("second host's PutManifest: %v", err)
		}
		got, err := b.GetManifest(ctx, k)
		if err != nil || got.MediaType != man.MediaType || !bytes.Equal(got.Content, content) {
			t.Fatalf("GetManifest = %+v, %v", got, err)
		}

		if _, err := b.GetTag(ctx, "docker.io", "library/alpine", "3.19"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetTag before put = %v", err)
		}
		rec := TagRecord{Digest: k.Digest, MediaType: man.MediaType, Size: int64(len(content)), Checked: time.Now().UTC().Truncate(time.Millisecond)}
		if err := a.PutTag(ctx, "docker.io", "library/alpine", "3.19", rec); err != nil {
			t.Fatal(err)
		}
		gotRec, err := b.GetTag(ctx, "docker.io", "library/alpine", "3.19")
		if err != nil || gotRec.Digest != rec.Digest || gotRec.MediaType != rec.MediaType || gotRec.Size != rec.Size || !gotRec.Checked.Equal(rec.Checked) {
			t.Fatalf("GetTag = %+v, %v; want %+v", gotRec, err, rec)
		}
		// Tags are the mutable part: a revalidation overwrites the record.
		rec2 := rec
		rec2.Digest = digest.FromString("new")
		rec2.Checked = rec.Checked.Add(time.Minute)
		if err := b.PutTag(ctx, "docker.io", "library/alpine", "3.19", rec2); err != nil {
			t.Fatal(err)
		}
		if got, err := a.GetTag(ctx, "docker.io", "library/alpine", "3.19"); err != nil || got.Digest != rec2.Digest || !got.Checked.Equal(rec2.Checked) {
			t.Fatalf("GetTag after overwrite = %+v, %v", got, err)
		}
		if _, err := a.GetTag(ctx, "docker.io", "library/alpine", "3.20"); !errors.Is(err, ErrNotFound) {
			t.Errorf("GetTag of another tag = %v", err)
		}

		m.PutObject(t, bucket, "berth/tags/docker.io/library/broken/latest", []byte("{not json"))
		if _, err := a.GetTag(ctx, "docker.io", "library/broken", "latest"); !errors.Is(err, ErrCorrupt) || !errors.Is(err, ErrNotFound) {
			t.Errorf("GetTag of an unreadable record = %v, want ErrCorrupt", err)
		}
	})

	t.Run("LeaseHeldAndReleased", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		bucket := m.NewBucket(t)
		a := newMinIOS3(t, m, bucket, "host-a:5000", nil)
		b := newMinIOS3(t, m, bucket, "host-b:5000", nil)
		name := BlobLeaseName(Key{Upstream: "docker.io", Digest: digest.FromString("layer")})

		la, err := a.AcquireS3Lease(ctx, name, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if la.TookOver() {
			t.Error("a fresh lease reports a takeover")
		}
		_, err = b.AcquireLease(ctx, name, time.Minute)
		var held *LeaseHeldError
		if !errors.As(err, &held) || !errors.Is(err, ErrLeaseHeld) {
			t.Fatalf("second acquirer got %v, want ErrLeaseHeld", err)
		}
		if held.Holder != "host-a:5000" || held.Expires.Before(time.Now().Add(50*time.Second)) {
			t.Errorf("LeaseHeldError = %+v; want holder host-a:5000 about a minute out", held)
		}
		// The holder itself cannot take it twice either.
		if _, err := a.AcquireLease(ctx, name, time.Minute); !errors.Is(err, ErrLeaseHeld) {
			t.Errorf("re-acquiring a held lease = %v", err)
		}
		if err := la.Release(ctx); err != nil {
			t.Fatal(err)
		}
		if _, ok := m.GetObject(t, bucket, "berth/leases/"+name); ok {
			t.Fatal("released lease still in the bucket")
		}
		lb, err := b.AcquireS3Lease(ctx, name, time.Minute)
		if err != nil {
			t.Fatalf("acquire after release: %v", err)
		}
		// A stale Release from the old holder must not drop the new lease.
		if err := la.Release(ctx); err != nil {
			t.Errorf("second release: %v", err)
		}
		if _, err := a.AcquireLease(ctx, name, time.Minute); !errors.Is(err, ErrLeaseHeld) {
			t.Errorf("after a stale release the lease is free: %v", err)
		}
		if err := lb.Release(ctx); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("LeaseExpiryTakeover", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		bucket := m.NewBucket(t)
		a := newMinIOS3(t, m, bucket, "host-a", nil)
		b := newMinIOS3(t, m, bucket, "host-b", nil)
		c := newMinIOS3(t, m, bucket, "host-c", nil)
		name := TagLeaseName("docker.io", "library/alpine", "latest")

		la, err := a.AcquireS3Lease(ctx, name, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.AcquireLease(ctx, name, time.Minute); !errors.Is(err, ErrLeaseHeld) {
			t.Fatalf("live short lease not held: %v", err)
		}
		// Expiry is judged in whole seconds with one second of slack.
		time.Sleep(4 * time.Second)
		lb, err := b.AcquireS3Lease(ctx, name, time.Minute)
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
			t.Errorf("after the old holder's release, third host got %v; want held by host-b", err)
		}
	})

	t.Run("LeaseRenew", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		bucket := m.NewBucket(t)
		a := newMinIOS3(t, m, bucket, "host-a", nil)
		b := newMinIOS3(t, m, bucket, "host-b", nil)
		name := "blobs/docker.io/sha256/" + digest.FromString("renew").Encoded()
		la, err := a.AcquireS3Lease(ctx, name, 3*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		first := la.Expires()
		for range 3 {
			time.Sleep(2 * time.Second)
			if err := la.Renew(ctx); err != nil {
				t.Fatalf("Renew: %v", err)
			}
		}
		if !la.Expires().After(first.Add(5 * time.Second)) {
			t.Errorf("Expires %v not moved on from %v", la.Expires(), first)
		}
		// Six seconds after a 3s lease was taken, renewals keep it live.
		if _, err := b.AcquireLease(ctx, name, time.Minute); !errors.Is(err, ErrLeaseHeld) {
			t.Errorf("renewed lease taken: %v", err)
		}
	})

	t.Run("ConcurrentTakeoverOneWinner", func(t *testing.T) {
		ctx := testCtx(t, 2*time.Minute)
		bucket := m.NewBucket(t)
		const hosts = 6
		tiers := make([]*S3, hosts)
		for i := range tiers {
			tiers[i] = newMinIOS3(t, m, bucket, "host-"+string(rune('a'+i)), nil)
		}
		for round := range 3 {
			name := "blobs/docker.io/sha256/" + digest.FromString("contended"+string(rune('0'+round))).Encoded()
			if _, err := tiers[0].AcquireLease(ctx, name, time.Second); err != nil {
				t.Fatal(err)
			}
			time.Sleep(3 * time.Second) // expired, as if host-a died mid-fetch
			var wins, helds atomic.Int32
			var wg sync.WaitGroup
			start := make(chan struct{})
			for i := 1; i < hosts; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					l, err := tiers[i].AcquireS3Lease(ctx, name, time.Minute)
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
				}()
			}
			close(start)
			wg.Wait()
			if wins.Load() != 1 || helds.Load() != hosts-2 {
				t.Fatalf("round %d: %d hosts took over the expired lease and %d were refused; want exactly one winner", round, wins.Load(), helds.Load())
			}
		}
	})

	t.Run("ConcurrentAcquireOneWinner", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		bucket := m.NewBucket(t)
		const hosts = 6
		var wins atomic.Int32
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range hosts {
			s := newMinIOS3(t, m, bucket, "host-"+string(rune('a'+i)), nil)
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				_, err := s.AcquireLease(ctx, "blobs/docker.io/sha256/"+digest.FromString("cold").Encoded(), time.Minute)
				if err == nil {
					wins.Add(1)
				} else if !errors.Is(err, ErrLeaseHeld) {
					t.Errorf("host %d: %v", i, err)
				}
			}()
		}
		close(start)
		wg.Wait()
		if wins.Load() != 1 {
			t.Fatalf("%d hosts created the same lease; want exactly one", wins.Load())
		}
	})

	t.Run("MissingBucketIsNotAMiss", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		s := newMinIOS3(t, m, "berth-no-such-bucket", "host-a", nil)
		_, _, err := s.GetBlob(ctx, Key{Upstream: "docker.io", Digest: digest.FromString("x")})
		if err == nil || errors.Is(err, ErrNotFound) {
			t.Errorf("GetBlob in a missing bucket = %v, want an error other than ErrNotFound", err)
		}
		if err := s.Ping(ctx); err == nil {
			t.Error("Ping of a missing bucket succeeded")
		}
	})
}

// S3 going away must cost berth quick errors, not stalls, and the same
// client must work again once S3 is back.
func TestMinIOOutage(t *testing.T) {
	m := testsupport.StartMinIO(t)
	bucket := m.NewBucket(t)
	var rc requestCounter
	s := newMinIOS3(t, m, bucket, "host-a", func(o *S3Options) {
		o.OpTimeout = 2 * time.Second
		o.OnRequest = rc.hook
	})
	ctx := testCtx(t, 3*time.Minute)
	f, want, d := blobFile(t, 64<<10)
	k := Key{Upstream: "docker.io", Digest: d}
	if err := s.PutBlob(ctx, k, f, int64(len(want))); err != nil {
		t.Fatal(err)
	}
	if err := s.Ping(ctx); err != nil {
		t.Fatal(err)
	}

	m.Stop(t)
	_, failuresBefore := rc.get("GetObject")
	ops := []struct {
		name string
		fn   func() error
	}{
		{"GetBlob", func() error { _, _, err := s.GetBlob(ctx, k); return err }},
		{"StatBlob", func() error { _, err := s.StatBlob(ctx, k); return err }},
		{"PutBlob", func() error {
			return s.PutBlob(ctx, Key{Upstream: "docker.io", Digest: digest.FromString("other")}, f, int64(len(want)))
		}},
		{"GetManifest", func() error { _, err := s.GetManifest(ctx, k); return err }},
		{"GetTag", func() error { _, err := s.GetTag(ctx, "docker.io", "library/a", "latest"); return err }},
		{"PutTag", func() error { return s.PutTag(ctx, "docker.io", "library/a", "latest", TagRecord{Digest: d}) }},
		{"AcquireLease", func() error { _, err := s.AcquireLease(ctx, BlobLeaseName(k), time.Minute); return err }},
		{"Ping", func() error { return s.Ping(ctx) }},
	}
	for _, op := range ops {
		start := time.Now()
		err := op.fn()
		took := time.Since(start)
		if err == nil {
			t.Errorf("%s succeeded with S3 down", op.name)
		} else if errors.Is(err, ErrNotFound) {
			t.Errorf("%s: S3 down reported as a miss: %v", op.name, err)
		}
		if took > 5*time.Second {
			t.Errorf("%s took %v to fail with S3 down", op.name, took)
		}
	}
	if _, failures := rc.get("GetObject"); failures <= failuresBefore {
		t.Error("failed requests were not reported to OnRequest")
	}

	m.Start(t)
	// Same client, no restart of berth: S3 is used again at once.
	if err := s.Ping(ctx); err != nil {
		t.Fatalf("Ping after S3 came back: %v", err)
	}
	if got, _ := readBlob(t, ctx, s, k); !bytes.Equal(got, want) {
		t.Fatal("blob written before the outage not served after it")
	}
	if err := s.PutTag(ctx, "docker.io", "library/a", "latest", TagRecord{Digest: d}); err != nil {
		t.Fatalf("PutTag after S3 came back: %v", err)
	}
	if r, err := s.GetTag(ctx, "docker.io", "library/a", "latest"); err != nil || r.Digest != d {
		t.Fatalf("GetTag after S3 came back = %+v, %v", r, err)
	}
	l, err := s.AcquireLease(ctx, BlobLeaseName(k), time.Minute)
	if err != nil {
		t.Fatalf("AcquireLease after S3 came back: %v", err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
}

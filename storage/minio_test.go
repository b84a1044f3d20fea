package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
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
	setTestAWSEnv(t)
	return newMinIOS3InEnv(t, m, bucket, holder, mod)
}

// newMinIOS3InEnv is newMinIOS3 for a test whose parent called setTestAWSEnv.
func newMinIOS3InEnv(t *testing.T, m *testsupport.MinIO, bucket, holder string, mod func(*S3Options)) *S3 {
	t.Helper()
	return newTestS3InEnv(t, m.Endpoint, func(o *S3Options) {
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
	rc, size, err := s.GetBlob(ctx, k, 0)
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

	// The generic behaviour is in TestBucketConformance; these are about
	// what goes over the wire and where objects land.
	t.Run("SmallBlob", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		bucket := m.NewBucket(t)
		var rc requestCounter
		s := newMinIOS3(t, m, bucket, "host-a", func(o *S3Options) { o.OnRequest = rc.hook })
		f, want, d := blobFile(t, 100<<10)
		k := Key{Upstream: "docker.io", Digest: d}
		if err := s.PutBlob(ctx, k, f, int64(len(want))); err != nil {
			t.Fatal(err)
		}
		if n, _ := rc.get("PutObject"); n != 1 {
			t.Errorf("small blob took %d PutObject requests, want one", n)
		}
		if n, _ := rc.get("CreateMultipartUpload"); n != 0 {
			t.Errorf("small blob went up as multipart")
		}
		raw, ok := m.GetObject(t, bucket, "berth/blobs/docker.io/sha256/"+d.Encoded())
		if !ok || !bytes.Equal(raw, want) {
			t.Error("blob is not at its documented key")
		}
		// Another host putting the same blob again is not an error, nor
		// is a read past the end an S3 failure.
		if err := s.PutBlob(ctx, k, f, int64(len(want))); err != nil {
			t.Errorf("second PutBlob: %v", err)
		}
		if _, fails := rc.get("PutObject"); fails != 0 {
			t.Errorf("%d PutObject requests counted as failures; a lost conditional write is normal", fails)
		}
		if _, _, err := s.GetBlob(ctx, k, int64(len(want))); !errors.Is(err, ErrOffsetPastEnd) {
			t.Errorf("GetBlob from the end = %v, want ErrOffsetPastEnd", err)
		}
		if n, fails := rc.get("GetObject"); n != 1 || fails != 0 {
			t.Errorf("GetBlob from the end: %d GetObject requests, %d counted as failures; want one, not a failure", n, fails)
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
		if _, _, err := s.GetBlob(ctx, k, 0); !errors.Is(err, ErrNotFound) {
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
		// A resumed read starts inside one part and crosses the others.
		off := int64(7<<20 + 123)
		tail, size := getAll(t, ctx, s, k, off)
		if size != int64(len(want)) || !bytes.Equal(tail, want[off:]) {
			t.Fatalf("multipart blob read from %d: %d bytes (size %d), want its last %d", off, len(tail), size, int64(len(want))-off)
		}
		// The fleet's second upload of a large blob must not resend its parts.
		if err := s.PutBlob(ctx, k, f, int64(len(want))); err != nil {
			t.Fatal(err)
		}
		if n, _ := rc.get("UploadPart"); n != 8 {
			t.Errorf("second PutBlob of a present blob sent parts: %d UploadPart in total", n)
		}
	})

	t.Run("StreamedMultipartBlob", func(t *testing.T) {
		ctx := testCtx(t, 3*time.Minute)
		bucket := m.NewBucket(t)
		var rc requestCounter
		s := newMinIOS3(t, m, bucket, "host-a", func(o *S3Options) {
			o.PartSize = 5 << 20
			o.OnRequest = rc.hook
		})
		const size = 12 << 20 // three parts
		_, want, d := blobFile(t, size)
		k := Key{Upstream: "docker.io", Digest: d}
		if err := s.PutBlobStream(ctx, k, bytes.NewReader(want)); err != nil {
			t.Fatal(err)
		}
		if n, _ := rc.get("UploadPart"); n != 3 {
			t.Errorf("12 MiB streamed in 5 MiB parts took %d UploadPart requests, want 3", n)
		}
		if got, n := readBlob(t, ctx, s, k); n != int64(size) || digest.FromBytes(got) != d {
			t.Fatalf("streamed blob read back as %d bytes (size %d)", len(got), n)
		}
		// A body that fails at its very end, after parts went up, leaves no
		// object behind: the multipart upload is aborted.
		_, other, od := blobFile(t, size)
		ok := Key{Upstream: "docker.io", Digest: od}
		failing := io.MultiReader(bytes.NewReader(other[:size-1]), iotest.ErrReader(errors.New("digest mismatch")))
		if err := s.PutBlobStream(ctx, ok, failing); err == nil {
			t.Fatal("an upload whose body failed succeeded")
		}
		if _, err := s.StatBlob(ctx, ok); !errors.Is(err, ErrNotFound) {
			t.Fatalf("after a failed streamed upload StatBlob = %v, want ErrNotFound", err)
		}
		if n, _ := rc.get("AbortMultipartUpload"); n == 0 {
			t.Error("the failed upload's parts were not aborted")
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

	t.Run("UnreadableTagRecord", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		bucket := m.NewBucket(t)
		s := newMinIOS3(t, m, bucket, "host-a", nil)
		key := "berth/tags/docker.io/library/broken/latest"
		m.PutObject(t, bucket, key, []byte("{not json"))
		if _, err := s.GetTag(ctx, "docker.io", "library/broken", "latest"); !errors.Is(err, ErrCorrupt) || !errors.Is(err, ErrNotFound) {
			t.Errorf("GetTag of an unreadable record = %v, want ErrCorrupt", err)
		}
		if _, ok := m.GetObject(t, bucket, key); ok {
			t.Error("unreadable tag record left in the bucket")
		}
	})

	t.Run("LeaseObject", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		bucket := m.NewBucket(t)
		s := newMinIOS3(t, m, bucket, "host-a:5000", nil)
		name := BlobLeaseName(Key{Upstream: "docker.io", Digest: digest.FromString("layer")})
		l, err := s.AcquireLease(ctx, name, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		raw, ok := m.GetObject(t, bucket, "berth/leases/"+name)
		var rec leaseRecord
		if !ok || json.Unmarshal(raw, &rec) != nil || rec.Holder != "host-a:5000" || rec.Expires.Sub(rec.Acquired) != time.Minute {
			t.Fatalf("lease object at its documented key = %q (found %v)", raw, ok)
		}
		if sl, ok := l.(*S3Lease); !ok || sl.Name() != name || !sl.Expires().Equal(rec.Expires) {
			t.Errorf("lease %#v does not describe the object %+v", l, rec)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
		if _, ok := m.GetObject(t, bucket, "berth/leases/"+name); ok {
			t.Fatal("released lease still in the bucket")
		}
	})

	t.Run("MissingBucketIsNotAMiss", func(t *testing.T) {
		ctx := testCtx(t, time.Minute)
		s := newMinIOS3(t, m, "berth-no-such-bucket", "host-a", nil)
		_, _, err := s.GetBlob(ctx, Key{Upstream: "docker.io", Digest: digest.FromString("x")}, 0)
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
		{"GetBlob", func() error { _, _, err := s.GetBlob(ctx, k, 0); return err }},
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

package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/berth-dev/berth/internal/testsupport"
)

// FleetBucket is one fresh bucket on a real MinIO that several berth hosts
// share as their fleet tier. The test reads and writes it directly to check
// what berth left there, or to damage it.
type FleetBucket struct {
	MinIO  *testsupport.MinIO
	Bucket string
	Prefix string // ends in "/"
}

// StartFleetBucket starts MinIO with a new bucket. berth gets the
// credentials the way a host would, from AWS_* variables, which this sets
// for the test's lifetime (so the test must not be parallel); AWS config and
// credentials files are pointed at nothing so a developer's ~/.aws cannot
// change what berth does.
func StartFleetBucket(t testing.TB) *FleetBucket {
	t.Helper()
	m := testsupport.StartMinIO(t)
	f := &FleetBucket{MinIO: m, Bucket: m.NewBucket(t), Prefix: "fleet/"}
	none := filepath.Join(t.TempDir(), "no-aws-config")
	t.Setenv("AWS_ACCESS_KEY_ID", m.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", m.SecretKey)
	t.Setenv("AWS_SESSION_TOKEN", "")
	t.Setenv("AWS_REGION", m.Region)
	t.Setenv("AWS_PROFILE", "")
	t.Setenv("AWS_CONFIG_FILE", none)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", none)
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	return f
}

// Args are the berth serve flags that put a host on this bucket.
func (f *FleetBucket) Args() []string {
	return []string{
		"--s3-bucket", f.Bucket,
		"--s3-prefix", f.Prefix,
		"--s3-endpoint", f.MinIO.Endpoint,
		"--s3-path-style=true",
	}
}

// BlobKey is where berth keeps a blob of an upstream (docs/s3.md).
func (f *FleetBucket) BlobKey(upstream, dgst string) string {
	alg, hexDigest, _ := strings.Cut(dgst, ":")
	return f.Prefix + "blobs/" + upstream + "/" + alg + "/" + hexDigest
}

// BlobLeaseKey is the lease a host holds while it fetches a blob.
func (f *FleetBucket) BlobLeaseKey(upstream, dgst string) string {
	alg, hexDigest, _ := strings.Cut(dgst, ":")
	return f.Prefix + "leases/blobs/" + upstream + "/" + alg + "/" + hexDigest
}

func opContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

// List returns the keys under Prefix+sub and their sizes.
func (f *FleetBucket) List(t testing.TB, sub string) map[string]int64 {
	t.Helper()
	ctx, cancel := opContext()
	defer cancel()
	out := map[string]int64{}
	p := s3.NewListObjectsV2Paginator(f.MinIO.Client(), &s3.ListObjectsV2Input{
		Bucket: aws.String(f.Bucket), Prefix: aws.String(f.Prefix + sub),
	})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			t.Fatalf("listing s3://%s/%s%s: %v", f.Bucket, f.Prefix, sub, err)
		}
		for _, o := range page.Contents {
			out[aws.ToString(o.Key)] = aws.ToInt64(o.Size)
		}
	}
	return out
}

// Exists reports whether key is in the bucket.
func (f *FleetBucket) Exists(t testing.TB, key string) bool {
	t.Helper()
	ctx, cancel := opContext()
	defer cancel()
	_, err := f.MinIO.Client().HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(f.Bucket), Key: aws.String(key)})
	if err == nil {
		return true
	}
	var nf *types.NotFound
	var nk *types.NoSuchKey
	if errors.As(err, &nf) || errors.As(err, &nk) {
		return false
	}
	t.Fatalf("head s3://%s/%s: %v", f.Bucket, key, err)
	return false
}

// Get reads an object.
func (f *FleetBucket) Get(t testing.TB, key string) []byte {
	t.Helper()
	b, ok := f.MinIO.GetObject(t, f.Bucket, key)
	if !ok {
		t.Fatalf("get s3://%s/%s: no such key", f.Bucket, key)
	}
	return b
}

// Put overwrites an object unconditionally, as an operator or a faulty tool
// might.
func (f *FleetBucket) Put(t testing.TB, key string, body []byte) {
	t.Helper()
	f.MinIO.PutObject(t, f.Bucket, key, body)
}

// WaitBlobs waits until the bucket holds every blob (hosts upload after
// serving their client, so an object may trail the pull by a moment).
func (f *FleetBucket) WaitBlobs(t testing.TB, upstream string, blobs []Blob, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var missing []string
		for _, b := range blobs {
			if !f.Exists(t, f.BlobKey(upstream, b.Digest)) {
				missing = append(missing, b.Digest)
			}
		}
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v the bucket still lacks blobs %v", timeout, missing)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// VerifyBlobs reads every object under blobs/ and fails the test for each
// one whose content does not hash to the digest its key names: a host must
// never leave a partial or wrong blob where the fleet would find it. It
// returns the number of blobs checked.
func (f *FleetBucket) VerifyBlobs(t testing.TB) int {
	t.Helper()
	objs := f.List(t, "blobs/")
	for key, size := range objs {
		parts := strings.Split(key, "/")
		if len(parts) < 3 || parts[len(parts)-2] != "sha256" {
			t.Errorf("unexpected key in the bucket's blobs/: %s", key)
			continue
		}
		body := f.Get(t, key)
		sum := sha256.Sum256(body)
		if got := hex.EncodeToString(sum[:]); got != parts[len(parts)-1] {
			t.Errorf("s3 object %s (%d bytes) holds content hashing to sha256:%s", key, size, got)
		}
	}
	return len(objs)
}

// String names the bucket for logs.
func (f *FleetBucket) String() string {
	return fmt.Sprintf("s3://%s/%s on %s", f.Bucket, f.Prefix, f.MinIO.Endpoint)
}

package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/internal/testsupport"
)

// newTestS3 points the tier at endpoint with fixed credentials and no AWS
// configuration from the environment.
func newTestS3(t *testing.T, endpoint string, mod func(*S3Options)) *S3 {
	t.Helper()
	setTestAWSEnv(t)
	return newTestS3InEnv(t, endpoint, mod)
}

// setTestAWSEnv keeps the machine's AWS configuration out of the tests.
// Parallel tests cannot set the environment: their parent does.
func setTestAWSEnv(t *testing.T) {
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
}

// newTestS3InEnv is newTestS3 for a test whose parent called setTestAWSEnv.
func newTestS3InEnv(t *testing.T, endpoint string, mod func(*S3Options)) *S3 {
	t.Helper()
	o := S3Options{
		Bucket:      "b",
		Prefix:      "berth",
		Region:      "us-east-1",
		Endpoint:    endpoint,
		PathStyle:   true,
		Credentials: credentials.NewStaticCredentialsProvider("k", "s", ""),
	}
	if mod != nil {
		mod(&o)
	}
	s, err := NewS3(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestS3KeyLayout(t *testing.T) {
	s := &S3{opts: S3Options{Prefix: "fleet/"}}
	d := digest.FromString("x")
	k := Key{Upstream: "docker.io", Digest: d}

	got, err := s.blobKey(k)
	if err != nil || got != "fleet/blobs/docker.io/sha256/"+d.Encoded() {
		t.Errorf("blobKey = %q, %v", got, err)
	}
	got, err = s.manifestKey(Key{Upstream: "127.0.0.1:5001", Digest: d})
	if err != nil || got != "fleet/manifests/127.0.0.1:5001/sha256/"+d.Encoded() {
		t.Errorf("manifestKey = %q, %v", got, err)
	}
	got, err = s.tagKey("ghcr.io", "org/app", "v1.2")
	if err != nil || got != "fleet/tags/ghcr.io/org/app/v1.2" {
		t.Errorf("tagKey = %q, %v", got, err)
	}
	got, err = s.leaseKey(BlobLeaseName(k))
	if err != nil || got != "fleet/leases/blobs/docker.io/sha256/"+d.Encoded() {
		t.Errorf("leaseKey(blob) = %q, %v", got, err)
	}
	got, err = s.leaseKey(TagLeaseName("docker.io", "library/alpine", "3.19"))
	if err != nil || got != "fleet/leases/tags/docker.io/library/alpine/3.19" {
		t.Errorf("leaseKey(tag) = %q, %v", got, err)
	}
}

func TestS3PrefixNormalised(t *testing.T) {
	for in, want := range map[string]string{"": "", "berth": "berth/", "/a/b/": "a/b/", "a/b": "a/b/", "/": ""} {
		o := S3Options{Prefix: in}
		o.setDefaults()
		if o.Prefix != want {
			t.Errorf("prefix %q -> %q, want %q", in, o.Prefix, want)
		}
	}
}

func TestS3RejectsKeysThatEscapeTheLayout(t *testing.T) {
	s := &S3{}
	good := digest.FromString("x")
	bad := []Key{
		{Upstream: "", Digest: good},
		{Upstream: "..", Digest: good},
		{Upstream: "a/b", Digest: good},
		{Upstream: "docker.io", Digest: "sha256:../../x"},
		{Upstream: "docker.io", Digest: "sha256:abc"},
		{Upstream: "docker.io", Digest: ""},
	}
	for _, k := range bad {
		if key, err := s.blobKey(k); err == nil {
			t.Errorf("blobKey(%v) = %q, want error", k, key)
		}
	}
	for _, c := range [][3]string{
		{"docker.io", "../x", "latest"},
		{"docker.io", "library//alpine", "latest"},
		{"docker.io", "Library/alpine", "latest"},
		{"docker.io", "library/alpine", "a/b"},
		{"docker.io", "library/alpine", ".hidden"},
		{"docker.io", "library/alpine", ""},
		{"docker.io", "library/alpine-", "latest"},
		{"docker.io", "", "latest"},
	} {
		if key, err := s.tagKey(c[0], c[1], c[2]); err == nil {
			t.Errorf("tagKey%q = %q, want error", c, key)
		}
	}
	for _, n := range []string{"", "/a", "a/", "a//b", "a/../b", "a b", "a\nb"} {
		if key, err := s.leaseKey(n); err == nil {
			t.Errorf("leaseKey(%q) = %q, want error", n, key)
		}
	}
	for _, c := range [][2]string{{"library/alpine", "latest"}, {"a.b_c-d/e__f", "V1.2-rc_3"}, {"x", "_"}} {
		if _, err := s.tagKey("docker.io", c[0], c[1]); err != nil {
			t.Errorf("tagKey(%q, %q): %v", c[0], c[1], err)
		}
	}
}

func TestLeaseRecordJSON(t *testing.T) {
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	r := newLeaseRecord("host-a:5000", 2*time.Minute, now)
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	if m["holder"] != "host-a:5000" || m["acquired"] != "2025-03-01T12:00:00Z" || m["expires"] != "2025-03-01T12:02:00Z" {
		t.Errorf("lease body = %s", b)
	}
	if tok, _ := m["token"].(string); len(tok) != 16 {
		t.Errorf("token %q: want 16 hex digits", tok)
	}
	if r2 := newLeaseRecord("host-a:5000", 2*time.Minute, now); r2.Token == r.Token {
		t.Error("two acquisitions got the same token; their ETags could collide")
	}
}

func TestLeaseExpiryUsesS3Clock(t *testing.T) {
	acquired := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	r := newLeaseRecord("h", time.Minute, acquired)
	written := time.Date(2025, 3, 1, 13, 0, 0, 0, time.UTC) // S3's clock is an hour ahead of the holder's
	cases := []struct {
		name                   string
		lastMod, server, local time.Time
		want                   bool
	}{
		{"live by S3 clock, though the reader's clock is far past Expires", written, written.Add(59 * time.Second), acquired.Add(time.Hour), false},
		{"live within the slack for whole-second HTTP times", written, written.Add(time.Minute), acquired, false},
		{"expired by S3 clock", written, written.Add(time.Minute + time.Second), acquired, true},
		{"no server time: holder's Expires against local clock, live", written, time.Time{}, acquired.Add(30 * time.Second), false},
		{"no server time: holder's Expires against local clock, expired", written, time.Time{}, acquired.Add(time.Minute), true},
	}
	for _, c := range cases {
		if got := r.expired(c.lastMod, c.server, c.local); got != c.want {
			t.Errorf("%s: expired = %v, want %v", c.name, got, c.want)
		}
	}
	var zero leaseRecord
	if !zero.expired(written, written, written) {
		t.Error("a lease body without a TTL must count as expired so it cannot block forever")
	}
}

func TestS3ErrorMapping(t *testing.T) {
	notFound := []error{
		&types.NoSuchKey{},
		&types.NotFound{},
		fmt.Errorf("wrapped: %w", &smithy.GenericAPIError{Code: "NoSuchKey"}),
	}
	for _, e := range notFound {
		if !isNotFound(e) {
			t.Errorf("isNotFound(%v) = false", e)
		}
		if isPrecondition(e) {
			t.Errorf("isPrecondition(%v) = true", e)
		}
	}
	if isNotFound(&smithy.GenericAPIError{Code: "NoSuchBucket"}) {
		t.Error("a missing bucket must not read as a cache miss")
	}
	for _, e := range []error{
		&smithy.GenericAPIError{Code: "PreconditionFailed"},
		&smithy.GenericAPIError{Code: "ConditionalRequestConflict"},
	} {
		if !isPrecondition(e) || isNotFound(e) {
			t.Errorf("%v: precondition=%v notfound=%v", e, isPrecondition(e), isNotFound(e))
		}
	}
	if isNotFound(errors.New("connection refused")) || isPrecondition(errors.New("connection refused")) || isNotFound(nil) || isPrecondition(nil) {
		t.Error("plain errors and nil must map to neither")
	}

	s := &S3{}
	if err := s.opErr("get", "k", &types.NoSuchKey{}, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("opErr(NoSuchKey) = %v, want ErrNotFound", err)
	}
	if err := s.opErr("get", "k", fmt.Errorf("op: %w", context.Canceled), errOpTimeout); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("opErr with timeout cause = %v, want DeadlineExceeded", err)
	}
	held := error(&LeaseHeldError{Name: "n", Holder: "h"})
	if !errors.Is(held, ErrLeaseHeld) || !strings.Contains(held.Error(), "h") {
		t.Errorf("LeaseHeldError = %v", held)
	}
}

func TestRequestFailureIgnoresOrdinaryAnswers(t *testing.T) {
	bg := context.Background()
	for _, e := range []error{nil, &types.NoSuchKey{}, &smithy.GenericAPIError{Code: "PreconditionFailed"}} {
		if requestFailure(bg, e) != nil {
			t.Errorf("requestFailure(%v) != nil", e)
		}
	}
	cancelled, cancel := context.WithCancel(bg)
	cancel()
	if requestFailure(cancelled, fmt.Errorf("x: %w", context.Canceled)) != nil {
		t.Error("the caller's own cancellation must not count as an S3 error")
	}
	timedOut, cancelCause := context.WithCancelCause(bg)
	cancelCause(errOpTimeout)
	if requestFailure(timedOut, fmt.Errorf("x: %w", context.Canceled)) == nil {
		t.Error("berth's own timeout must count as an S3 error")
	}
	if requestFailure(bg, errors.New("dial tcp: connection refused")) == nil {
		t.Error("transport errors must count")
	}
}

// An unreachable S3 must not stop NewS3, and each operation must fail within
// a bounded time, reporting every attempt.
func TestS3UnreachableFailsFast(t *testing.T) {
	endpoint := "http://" + testsupport.FreeAddr(t) // connections are refused

	var mu sync.Mutex
	failures := map[string]int{}
	s := newTestS3(t, endpoint, func(o *S3Options) {
		o.OnRequest = func(op string, err error) {
			if err != nil {
				mu.Lock()
				failures[op]++
				mu.Unlock()
			}
		}
	})
	k := Key{Upstream: "docker.io", Digest: digest.FromString("x")}
	ctx := context.Background()
	ops := map[string]func() error{
		"GetBlob":     func() error { _, _, err := s.GetBlob(ctx, k, 0); return err },
		"GetManifest": func() error { _, err := s.GetManifest(ctx, k); return err },
		"GetTag":      func() error { _, err := s.GetTag(ctx, "docker.io", "library/a", "latest"); return err },
		"PutTag":      func() error { return s.PutTag(ctx, "docker.io", "library/a", "latest", TagRecord{Digest: k.Digest}) },
		"Lease":       func() error { _, err := s.AcquireLease(ctx, BlobLeaseName(k), time.Minute); return err },
		"Ping":        func() error { return s.Ping(ctx) },
	}
	for name, op := range ops {
		start := time.Now()
		err := op()
		if err == nil {
			t.Errorf("%s: no error from an unreachable S3", name)
		}
		if errors.Is(err, ErrNotFound) {
			t.Errorf("%s: unreachable S3 reported as a miss: %v", name, err)
		}
		if d := time.Since(start); d > 4*time.Second {
			t.Errorf("%s took %v against a refused connection", name, d)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if failures["GetObject"] < 3*3 || failures["PutObject"] < 2*3 || failures["HeadBucket"] < 3 {
		t.Errorf("failed attempts by operation = %v; want every attempt (3 per call) counted", failures)
	}
}

// stallingS3 answers GetObject after headerDelay, then sends part of the
// body and stalls; other requests fail.
func stallingS3(t *testing.T, headerDelay time.Duration) string {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(headerDelay):
		case <-r.Context().Done():
			return
		case <-release:
			return
		}
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte("0123456789"))
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	t.Cleanup(func() { close(release); srv.Close() })
	return srv.URL
}

func TestS3GetBlobHeaderTimeout(t *testing.T) {
	s := newTestS3(t, stallingS3(t, time.Hour), func(o *S3Options) { o.OpTimeout = 300 * time.Millisecond })
	start := time.Now()
	_, _, err := s.GetBlob(context.Background(), Key{Upstream: "docker.io", Digest: digest.FromString("x")}, 0)
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("GetBlob on a silent S3 = %v, want a timeout", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("GetBlob took %v with a 300ms timeout", d)
	}
}

func TestS3GetBlobStallMidBody(t *testing.T) {
	s := newTestS3(t, stallingS3(t, 0), func(o *S3Options) {
		o.OpTimeout = 2 * time.Second
		o.ReadIdleTimeout = 300 * time.Millisecond
	})
	rc, size, err := s.GetBlob(context.Background(), Key{Upstream: "docker.io", Digest: digest.FromString("x")}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if size != 1000 {
		t.Errorf("size = %d, want 1000", size)
	}
	// A slow consumer must not trip the idle timer: only waits on S3 count.
	buf := make([]byte, 10)
	if _, err := io.ReadFull(rc, buf); err != nil {
		t.Fatalf("first bytes: %v", err)
	}
	time.Sleep(500 * time.Millisecond)
	start := time.Now()
	_, err = io.ReadAll(rc)
	if !errors.Is(err, errReadIdle) {
		t.Errorf("read of a stalled body = %v, want %v", err, errReadIdle)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("stalled read failed after %v, want about 300ms", d)
	}
}

func TestNewS3RequiresBucket(t *testing.T) {
	if _, err := NewS3(context.Background(), S3Options{}); err == nil {
		t.Error("NewS3 without a bucket succeeded")
	}
}

func TestPutManifestRefusesMismatchedContent(t *testing.T) {
	s := newTestS3(t, "http://127.0.0.1:1", nil)
	k := Key{Upstream: "docker.io", Digest: digest.FromString("a")}
	err := s.PutManifest(context.Background(), k, Manifest{MediaType: "x", Content: []byte("b")})
	if err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("PutManifest with wrong content = %v", err)
	}
}

// rangeS3 serves one blob for every GetObject, honouring Range as S3 does.
func rangeS3(t *testing.T, blob []byte) (endpoint string, ranges *[]string) {
	var mu sync.Mutex
	var seen []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Range"))
		mu.Unlock()
		rng := r.Header.Get("Range")
		if rng == "" {
			w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
			w.Write(blob)
			return
		}
		off, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(rng, "bytes="), "-"))
		if err != nil || off >= len(blob) {
			w.Header().Set("Content-Type", "application/xml")
			w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidRange</Code><Message>The requested range is not satisfiable</Message></Error>`)
			return
		}
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, len(blob)-1, len(blob)))
		w.Header().Set("Content-Length", strconv.Itoa(len(blob)-off))
		w.WriteHeader(http.StatusPartialContent)
		w.Write(blob[off:])
	}))
	t.Cleanup(srv.Close)
	return srv.URL, &seen
}

func TestS3GetBlobFromOffset(t *testing.T) {
	blob := []byte("0123456789abcdef")
	endpoint, ranges := rangeS3(t, blob)
	var failures int
	s := newTestS3(t, endpoint, func(o *S3Options) {
		o.OnRequest = func(op string, err error) {
			if err != nil {
				failures++
			}
		}
	})
	k := Key{Upstream: "docker.io", Digest: digest.FromBytes(blob)}
	ctx := context.Background()
	for _, off := range []int64{0, 1, 15} {
		rc, size, err := s.GetBlob(ctx, k, off)
		if err != nil {
			t.Fatalf("GetBlob from %d: %v", off, err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || size != int64(len(blob)) || string(got) != string(blob[off:]) {
			t.Errorf("GetBlob from %d = %q (size %d), %v; want %q, size %d", off, got, size, err, blob[off:], len(blob))
		}
	}
	if want := []string{"", "bytes=1-", "bytes=15-"}; strings.Join(*ranges, ",") != strings.Join(want, ",") {
		t.Errorf("Range headers sent = %q, want %q", *ranges, want)
	}
	for _, off := range []int64{16, 17} {
		_, _, err := s.GetBlob(ctx, k, off)
		if !errors.Is(err, ErrOffsetPastEnd) || errors.Is(err, ErrNotFound) {
			t.Errorf("GetBlob from %d of 16 bytes = %v, want ErrOffsetPastEnd", off, err)
		}
	}
	if failures != 0 {
		t.Errorf("%d requests reported as S3 failures; a range past the end is an answer", failures)
	}
	if _, _, err := s.GetBlob(ctx, k, -1); err == nil {
		t.Error("GetBlob from -1 succeeded")
	}
}

func TestParseContentRange(t *testing.T) {
	for in, want := range map[string][2]int64{
		"bytes 0-15/16":                   {0, 16},
		"bytes 7340155-41943039/41943040": {7340155, 41943040},
	} {
		start, total, ok := parseContentRange(in)
		if !ok || start != want[0] || total != want[1] {
			t.Errorf("parseContentRange(%q) = %d, %d, %v", in, start, total, ok)
		}
	}
	for _, in := range []string{"", "bytes */16", "bytes 0-15/*", "bytes 5-4/16", "bytes 0-16/16", "items 0-1/2", "bytes 0-1"} {
		if _, _, ok := parseContentRange(in); ok {
			t.Errorf("parseContentRange(%q) accepted", in)
		}
	}
}

// A transient AccessDenied (MinIO answered one to a conditional PutObject
// on a bucket made moments before) is retried, not taken as a failing
// bucket; one that persists still fails.
func TestS3RetriesAccessDenied(t *testing.T) {
	var puts atomic.Int32
	denyFirst := int32(1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPut {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		if n := puts.Add(1); n <= atomic.LoadInt32(&denyFirst) {
			w.Header().Set("Content-Type", "application/xml")
			w.WriteHeader(http.StatusForbidden)
			io.WriteString(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied.</Message></Error>`)
			return
		}
		w.Header().Set("ETag", `"e1"`)
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	s := newTestS3(t, srv.URL, func(o *S3Options) { o.MaxBackoff = 10 * time.Millisecond })
	if _, err := s.AcquireLease(context.Background(), "blobs/x", time.Minute); err != nil {
		t.Fatalf("a lease after one AccessDenied: %v", err)
	}
	if n := puts.Load(); n != 2 {
		t.Fatalf("PUTs %d, want 2 (denied, then retried)", n)
	}
	puts.Store(0)
	atomic.StoreInt32(&denyFirst, 100)
	if _, err := s.AcquireLease(context.Background(), "blobs/y", time.Minute); err == nil {
		t.Fatal("a lease although every PUT was denied")
	}
}

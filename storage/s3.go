package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	_ "crypto/sha256" // digest algorithms need their hash linked in
	_ "crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsmiddleware "github.com/aws/aws-sdk-go-v2/aws/middleware"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/feature/s3/manager"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/middleware"
	smithyhttp "github.com/aws/smithy-go/transport/http"
	"github.com/opencontainers/go-digest"
)

// ErrCorrupt marks an S3 object whose content does not match its key. Errors
// carrying it also match ErrNotFound: the object was deleted and the caller
// refetches it as it would any miss.
var ErrCorrupt = errors.New("corrupt object in S3")

// S3Options configures the shared tier. Zero values take the defaults noted.
type S3Options struct {
	Bucket    string
	Prefix    string // key prefix; a trailing "/" is added when missing
	Region    string // default: the AWS chain's region, else us-east-1
	Endpoint  string // e.g. http://127.0.0.1:9000 for MinIO; default AWS
	PathStyle bool   // bucket in the path, as MinIO and Ceph usually need

	// Credentials overrides the standard AWS chain (environment, shared
	// config and credentials files, web identity, ECS and EC2 roles).
	Credentials aws.CredentialsProvider

	// OpTimeout bounds every metadata operation (manifests, tags, leases,
	// HEAD, DELETE) and the wait for a blob's response headers, retries
	// included. Default 5s.
	OpTimeout time.Duration
	// ReadIdleTimeout fails a blob download when S3 sends nothing for this
	// long. Default 15s.
	ReadIdleTimeout time.Duration
	// MaxAttempts per request, the first included. Default 3.
	MaxAttempts int
	// MaxBackoff between attempts. Default 500ms.
	MaxBackoff time.Duration
	// DialTimeout for new connections. Default 3s.
	DialTimeout time.Duration

	// Blobs of at least MultipartThreshold bytes go up as multipart uploads
	// of PartSize parts, Concurrency at a time. Defaults 16 MiB, 8 MiB, 4.
	MultipartThreshold int64
	PartSize           int64
	Concurrency        int

	// Holder identifies this host in the leases it takes. Default
	// hostname/pid.
	Holder string

	// OnRequest, if set, is called after every HTTP request to S3 (each
	// retry attempt counts) with the SDK operation name, e.g. "GetObject",
	// "PutObject", "UploadPart". err is nil on success and for the answers
	// that are part of normal work: not found (404), precondition failed
	// (412), conditional conflict (409), a range past the end (416), and
	// the caller giving up on a request. Anything else (refused
	// connections, timeouts, 5xx, 403) is passed on. It runs on the
	// request's goroutine and must be quick.
	OnRequest func(op string, err error)
}

func (o *S3Options) setDefaults() {
	if o.Prefix != "" {
		o.Prefix = strings.TrimLeft(o.Prefix, "/")
		if o.Prefix != "" && !strings.HasSuffix(o.Prefix, "/") {
			o.Prefix += "/"
		}
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.OpTimeout, 5*time.Second)
	def(&o.ReadIdleTimeout, 15*time.Second)
	def(&o.MaxBackoff, 500*time.Millisecond)
	def(&o.DialTimeout, 3*time.Second)
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 3
	}
	if o.PartSize < manager.MinUploadPartSize {
		if o.PartSize <= 0 {
			o.PartSize = 8 << 20
		} else {
			o.PartSize = manager.MinUploadPartSize
		}
	}
	if o.MultipartThreshold <= 0 {
		o.MultipartThreshold = 16 << 20
	}
	if o.MultipartThreshold < o.PartSize {
		// One part is all the multipart path could send; a single PUT is cheaper.
		o.MultipartThreshold = o.PartSize
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 4
	}
	if o.Holder == "" {
		h, _ := os.Hostname()
		o.Holder = h + "/" + strconv.Itoa(os.Getpid())
	}
}

// S3 is the fleet's shared tier in one S3 bucket. See docs/s3.md for the
// layout. It is safe for concurrent use.
type S3 struct {
	opts     S3Options
	client   *s3.Client
	uploader *manager.Uploader
}

var _ Bucket = (*S3)(nil)

// NewS3 builds the client without contacting S3, so berth starts while S3 is
// unreachable; operations fail fast until it answers again.
func NewS3(ctx context.Context, opts S3Options) (*S3, error) {
	if opts.Bucket == "" {
		return nil, errors.New("s3: bucket is required")
	}
	opts.setDefaults()

	httpClient := awshttp.NewBuildableClient().
		WithDialerOptions(func(d *net.Dialer) { d.Timeout = opts.DialTimeout }).
		WithTransportOptions(func(tr *http.Transport) {
			tr.MaxIdleConnsPerHost = 64
		}).
		// A connection-level read timeout also runs while a part is being
		// written, so it would cut slow uploads; blob reads get their own
		// idle timeout instead.
		WithReadTimeout(0)
	loadOpts := []func(*config.LoadOptions) error{
		config.WithHTTPClient(httpClient),
		config.WithRetryer(func() aws.Retryer {
			// AccessDenied is retried too: MinIO has been seen to answer it,
			// once, to a conditional PutObject on a bucket made moments
			// before. A real denial fails again within the op timeout, and
			// berth then leaves the bucket alone for a while.
			return retry.AddWithErrorCodes(retry.NewStandard(func(so *retry.StandardOptions) {
				so.MaxAttempts = opts.MaxAttempts
				so.MaxBackoff = opts.MaxBackoff
			}), "AccessDenied")
		}),
	}
	if opts.Region != "" {
		loadOpts = append(loadOpts, config.WithRegion(opts.Region))
	}
	if opts.Credentials != nil {
		loadOpts = append(loadOpts, config.WithCredentialsProvider(opts.Credentials))
	}
	cfg, err := config.LoadDefaultConfig(ctx, loadOpts...)
	if err != nil {
		return nil, fmt.Errorf("s3: aws config: %w", err)
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	client := s3.NewFromConfig(cfg, func(o *s3.Options) {
		if opts.Endpoint != "" {
			o.BaseEndpoint = aws.String(opts.Endpoint)
		}
		o.UsePathStyle = opts.PathStyle
		// berth checks every object against its digest itself; S3's
		// per-object checksums would only add a pass over the body (and
		// warnings for multipart objects, whose checksums are composite).
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
		if opts.OnRequest != nil {
			o.APIOptions = append(o.APIOptions, requestHook(opts.OnRequest))
		}
	})
	uploader := manager.NewUploader(client, func(u *manager.Uploader) {
		u.PartSize = opts.PartSize
		u.Concurrency = opts.Concurrency
	})
	return &S3{opts: opts, client: client, uploader: uploader}, nil
}

// Bucket and Prefix say where the tier lives, for logs and /status.
func (s *S3) Bucket() string { return s.opts.Bucket }

// Prefix is the normalised key prefix ("" or ending in "/").
func (s *S3) Prefix() string { return s.opts.Prefix }

// Ping checks that the bucket answers and the credentials are accepted.
func (s *S3) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.opts.OpTimeout)
	defer cancel()
	_, err := s.client.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: &s.opts.Bucket})
	if err != nil {
		return fmt.Errorf("s3: bucket %s: %w", s.opts.Bucket, err)
	}
	return nil
}

// GetBlob streams a blob from offset, with its total size; the caller
// verifies its digest. A download stalled for ReadIdleTimeout fails.
func (s *S3) GetBlob(ctx context.Context, k Key, offset int64) (io.ReadCloser, int64, error) {
	key, err := s.blobKey(k)
	if err != nil {
		return nil, 0, err
	}
	if offset < 0 {
		return nil, 0, fmt.Errorf("s3: get blob %s: negative offset %d", key, offset)
	}
	in := &s3.GetObjectInput{Bucket: &s.opts.Bucket, Key: &key}
	if offset > 0 {
		in.Range = aws.String("bytes=" + strconv.FormatInt(offset, 10) + "-")
	}
	// The body must outlive the header timeout, so the timeout cancels only
	// if the response has not started by then.
	ctx, cancel := context.WithCancelCause(ctx)
	headers := time.AfterFunc(s.opts.OpTimeout, func() { cancel(errOpTimeout) })
	out, err := s.client.GetObject(ctx, in)
	headers.Stop()
	if err != nil {
		cause := context.Cause(ctx)
		cancel(nil)
		if isInvalidRange(err) {
			return nil, 0, fmt.Errorf("s3: get blob %s from %d: %w", key, offset, ErrOffsetPastEnd)
		}
		return nil, 0, s.opErr("get blob", key, err, cause)
	}
	size := aws.ToInt64(out.ContentLength)
	if offset > 0 {
		start, total, ok := parseContentRange(aws.ToString(out.ContentRange))
		if !ok || start != offset {
			out.Body.Close()
			cancel(nil)
			return nil, 0, fmt.Errorf("s3: get blob %s from %d: unexpected Content-Range %q", key, offset, aws.ToString(out.ContentRange))
		}
		size = total
	}
	return newIdleReader(out.Body, s.opts.ReadIdleTimeout, cancel), size, nil
}

// parseContentRange reads "bytes START-END/TOTAL".
func parseContentRange(v string) (start, total int64, ok bool) {
	rest, found := strings.CutPrefix(v, "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, tot, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	first, last, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	var err1, err2, err3 error
	start, err1 = strconv.ParseInt(first, 10, 64)
	end, err2 := strconv.ParseInt(last, 10, 64)
	total, err3 = strconv.ParseInt(tot, 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || start < 0 || end < start || total <= end {
		return 0, 0, false
	}
	return start, total, true
}

// StatBlob returns a blob's size without reading it, or ErrNotFound; hosts
// waiting on another's lease poll it.
func (s *S3) StatBlob(ctx context.Context, k Key) (int64, error) {
	key, err := s.blobKey(k)
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.OpTimeout)
	defer cancel()
	out, err := s.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &s.opts.Bucket, Key: &key})
	if err != nil {
		return 0, s.opErr("stat blob", key, err, nil)
	}
	return aws.ToInt64(out.ContentLength), nil
}

// PutBlob uploads a blob unless the bucket already has it. Blobs are never
// overwritten: the write is conditional on the key being absent, and a host
// that loses that race has nothing left to do.
func (s *S3) PutBlob(ctx context.Context, k Key, r io.ReaderAt, size int64) error {
	key, err := s.blobKey(k)
	if err != nil {
		return err
	}
	// A section reader is seekable and reads at offsets, so the uploader
	// reads each part straight from r instead of buffering it.
	body := io.NewSectionReader(r, 0, size)
	in := &s3.PutObjectInput{
		Bucket:        &s.opts.Bucket,
		Key:           &key,
		Body:          body,
		ContentType:   aws.String("application/octet-stream"),
		IfNoneMatch:   aws.String("*"),
		ContentLength: aws.Int64(size),
	}
	if size < s.opts.MultipartThreshold {
		if k.Digest.Algorithm() == digest.SHA256 {
			// S3 then rejects a body that differs from what berth verified.
			if raw, err := hex.DecodeString(k.Digest.Encoded()); err == nil {
				in.ChecksumSHA256 = aws.String(base64.StdEncoding.EncodeToString(raw))
			}
		}
		_, err = s.client.PutObject(ctx, in)
		if err != nil && !isPrecondition(err) {
			return s.opErr("put blob", key, err, nil)
		}
		return nil
	}
	// A multipart upload of a blob the bucket already holds would send every
	// part before the final conditional write refused it.
	if _, err := s.StatBlob(ctx, k); err == nil {
		return nil
	}
	in.ContentLength = nil // the uploader sizes each part itself
	_, err = s.uploader.Upload(ctx, in)
	if err != nil && !isPrecondition(err) {
		return s.opErr("put blob", key, err, nil)
	}
	return nil
}

// PutBlobStream uploads a blob read once, front to back, from r: for a host
// that relays a blob it has no room to keep. The uploader holds at most
// Concurrency+1 parts of PartSize in memory. r must fail rather than end
// when its content does not match k's digest: an upload whose body fails
// is aborted and leaves no object.
func (s *S3) PutBlobStream(ctx context.Context, k Key, r io.Reader) error {
	key, err := s.blobKey(k)
	if err != nil {
		return err
	}
	_, err = s.uploader.Upload(ctx, &s3.PutObjectInput{
		Bucket:      &s.opts.Bucket,
		Key:         &key,
		Body:        struct{ io.Reader }{r}, // read once; never seeked
		ContentType: aws.String("application/octet-stream"),
		IfNoneMatch: aws.String("*"),
	})
	if err != nil && !isPrecondition(err) {
		return s.opErr("put blob", key, err, nil)
	}
	return nil
}

// DeleteBlob removes a blob found to be corrupt.
func (s *S3) DeleteBlob(ctx context.Context, k Key) error {
	key, err := s.blobKey(k)
	if err != nil {
		return err
	}
	return s.delete(ctx, key)
}

func (s *S3) delete(ctx context.Context, key string) error {
	ctx, cancel := context.WithTimeout(ctx, s.opts.OpTimeout)
	defer cancel()
	_, err := s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &s.opts.Bucket, Key: &key})
	if err != nil && !isNotFound(err) {
		return s.opErr("delete", key, err, nil)
	}
	return nil
}

// GetManifest returns a manifest whose bytes match its digest. A mismatching
// object is deleted and reported as ErrCorrupt (which also matches
// ErrNotFound).
func (s *S3) GetManifest(ctx context.Context, k Key) (Manifest, error) {
	key, err := s.manifestKey(k)
	if err != nil {
		return Manifest{}, err
	}
	o, err := s.getSmall(ctx, key)
	if err != nil {
		return Manifest{}, s.opErr("get manifest", key, err, nil)
	}
	if k.Digest.Algorithm().FromBytes(o.body) != k.Digest {
		return Manifest{}, s.corrupt(ctx, key, "content does not match digest")
	}
	return Manifest{MediaType: o.contentType, Content: o.body}, nil
}

// PutManifest stores a manifest's exact bytes with its media type as the
// object's Content-Type, unless the bucket already has it.
func (s *S3) PutManifest(ctx context.Context, k Key, m Manifest) error {
	key, err := s.manifestKey(k)
	if err != nil {
		return err
	}
	if k.Digest.Algorithm().FromBytes(m.Content) != k.Digest {
		return fmt.Errorf("s3: put manifest %s: content does not match digest", k)
	}
	ct := m.MediaType
	if ct == "" {
		ct = "application/octet-stream"
	}
	_, err = s.putSmall(ctx, key, m.Content, ct, func(in *s3.PutObjectInput) { in.IfNoneMatch = aws.String("*") })
	if err != nil && !isPrecondition(err) {
		return s.opErr("put manifest", key, err, nil)
	}
	return nil
}

// GetTag returns the fleet's last record of a tag.
func (s *S3) GetTag(ctx context.Context, upstream, repo, tag string) (TagRecord, error) {
	key, err := s.tagKey(upstream, repo, tag)
	if err != nil {
		return TagRecord{}, err
	}
	o, err := s.getSmall(ctx, key)
	if err != nil {
		return TagRecord{}, s.opErr("get tag", key, err, nil)
	}
	var r TagRecord
	if err := json.Unmarshal(o.body, &r); err != nil || r.Digest.Validate() != nil {
		return TagRecord{}, s.corrupt(ctx, key, "unreadable tag record")
	}
	return r, nil
}

// PutTag overwrites a tag record: tags are the bucket's only mutable objects.
func (s *S3) PutTag(ctx context.Context, upstream, repo, tag string, r TagRecord) error {
	key, err := s.tagKey(upstream, repo, tag)
	if err != nil {
		return err
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if _, err := s.putSmall(ctx, key, b, "application/json", nil); err != nil {
		return s.opErr("put tag", key, err, nil)
	}
	return nil
}

func (s *S3) corrupt(ctx context.Context, key, why string) error {
	if err := s.delete(ctx, key); err != nil {
		return fmt.Errorf("s3: %s: %s, and deleting it failed: %v: %w", key, why, err, ErrCorrupt)
	}
	return fmt.Errorf("s3: %s: %s, deleted: %w: %w", key, why, ErrCorrupt, ErrNotFound)
}

// small objects stay far below this; it only guards against a wrong key
// holding something huge.
const maxSmallObject = 8 << 20

type smallObject struct {
	body         []byte
	contentType  string
	etag         string
	lastModified time.Time
	serverTime   time.Time // the response's Date header; zero if absent
}

func (s *S3) getSmall(ctx context.Context, key string) (smallObject, error) {
	ctx, cancel := context.WithTimeout(ctx, s.opts.OpTimeout)
	defer cancel()
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &s.opts.Bucket, Key: &key})
	if err != nil {
		return smallObject{}, err
	}
	defer out.Body.Close()
	b, err := io.ReadAll(io.LimitReader(out.Body, maxSmallObject+1))
	if err != nil {
		return smallObject{}, err
	}
	if len(b) > maxSmallObject {
		return smallObject{}, fmt.Errorf("object larger than %d bytes", maxSmallObject)
	}
	o := smallObject{
		body:         b,
		contentType:  aws.ToString(out.ContentType),
		etag:         aws.ToString(out.ETag),
		lastModified: aws.ToTime(out.LastModified),
	}
	if raw, ok := awsmiddleware.GetRawResponse(out.ResultMetadata).(*smithyhttp.Response); ok {
		if t, err := http.ParseTime(raw.Header.Get("Date")); err == nil {
			o.serverTime = t
		}
	}
	return o, nil
}

func (s *S3) putSmall(ctx context.Context, key string, b []byte, contentType string, cond func(*s3.PutObjectInput)) (etag string, err error) {
	ctx, cancel := context.WithTimeout(ctx, s.opts.OpTimeout)
	defer cancel()
	in := &s3.PutObjectInput{
		Bucket:        &s.opts.Bucket,
		Key:           &key,
		Body:          bytes.NewReader(b),
		ContentLength: aws.Int64(int64(len(b))),
		ContentType:   aws.String(contentType),
	}
	if cond != nil {
		cond(in)
	}
	out, err := s.client.PutObject(ctx, in)
	if err != nil {
		return "", err
	}
	return aws.ToString(out.ETag), nil
}

// Leases.

// leaseRecord is a lease object's body. Expiry is judged by S3's clock
// (LastModified + TTL against the response's Date) so hosts with skewed
// clocks agree; Expires is the holder's own view, kept for people reading
// the bucket and as a fallback when S3 sends no Date.
type leaseRecord struct {
	Holder   string    `json:"holder"`
	Token    string    `json:"token"` // makes every write's ETag unique
	Acquired time.Time `json:"acquired"`
	Expires  time.Time `json:"expires"`
}

func newLeaseRecord(holder string, ttl time.Duration, now time.Time) leaseRecord {
	tok := make([]byte, 8)
	_, _ = rand.Read(tok)
	now = now.UTC()
	return leaseRecord{Holder: holder, Token: hex.EncodeToString(tok), Acquired: now, Expires: now.Add(ttl)}
}

// expired reports whether a lease seen in an object written at lastModified
// (by S3's clock) is past its TTL at serverNow (S3's clock), falling back to
// localNow against the holder's Expires when S3 gave no time.
func (r leaseRecord) expired(lastModified, serverNow, localNow time.Time) bool {
	ttl := r.Expires.Sub(r.Acquired)
	if ttl <= 0 {
		return true
	}
	if !lastModified.IsZero() && !serverNow.IsZero() {
		// Both times come in whole seconds, truncated; the slack keeps a
		// lease from ever expiring early, at the price of up to 2s late.
		return !serverNow.Before(lastModified.Add(ttl + httpTimeGranularity))
	}
	return !localNow.Before(r.Expires)
}

const httpTimeGranularity = time.Second

// S3Lease is a lease held in the bucket.
type S3Lease struct {
	s        *S3
	name     string
	key      string
	ttl      time.Duration
	tookOver bool

	mu      sync.Mutex
	etag    string
	expires time.Time
}

var _ Lease = (*S3Lease)(nil)

// Name is the lease's name as passed to AcquireLease.
func (l *S3Lease) Name() string { return l.name }

// TookOver reports whether the lease was taken from a holder that let it expire.
func (l *S3Lease) TookOver() bool { return l.tookOver }

// Expires is when the lease runs out by this host's clock unless renewed.
func (l *S3Lease) Expires() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.expires
}

// AcquireLease takes the named lease for ttl: created if absent, taken over
// if its holder let it expire. While another host's lease is live it returns
// a *LeaseHeldError (errors.Is ErrLeaseHeld). The Lease is an *S3Lease.
func (s *S3) AcquireLease(ctx context.Context, name string, ttl time.Duration) (Lease, error) {
	key, err := s.leaseKey(name)
	if err != nil {
		return nil, err
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("s3: lease %s: ttl must be positive", name)
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.OpTimeout)
	defer cancel()
	// The object may vanish between our steps (released, or expired by a
	// lifecycle rule); each such vanishing earns one more round.
	for range 3 {
		rec := newLeaseRecord(s.opts.Holder, ttl, time.Now())
		body, _ := json.Marshal(rec)
		etag, err := s.putSmall(ctx, key, body, "application/json", func(in *s3.PutObjectInput) { in.IfNoneMatch = aws.String("*") })
		if err == nil {
			return &S3Lease{s: s, name: name, key: key, ttl: ttl, etag: etag, expires: rec.Expires}, nil
		}
		if !isPrecondition(err) {
			return nil, s.opErr("acquire lease", key, err, nil)
		}

		cur, err := s.getSmall(ctx, key)
		if isNotFound(err) {
			continue
		}
		if err != nil {
			return nil, s.opErr("acquire lease", key, err, nil)
		}
		var held leaseRecord
		if json.Unmarshal(cur.body, &held) == nil && !held.expired(cur.lastModified, cur.serverTime, time.Now()) {
			return nil, &LeaseHeldError{Name: name, Holder: held.Holder, Expires: held.Expires, version: cur.etag}
		}
		// Expired or unreadable: take it over, but only if nobody else has
		// rewritten it since we read it.
		rec = newLeaseRecord(s.opts.Holder, ttl, time.Now())
		body, _ = json.Marshal(rec)
		etag, err = s.putSmall(ctx, key, body, "application/json", func(in *s3.PutObjectInput) { in.IfMatch = aws.String(cur.etag) })
		if err == nil {
			return &S3Lease{s: s, name: name, key: key, ttl: ttl, tookOver: true, etag: etag, expires: rec.Expires}, nil
		}
		if isPrecondition(err) {
			return nil, &LeaseHeldError{Name: name}
		}
		if isNotFound(err) {
			continue
		}
		return nil, s.opErr("take over lease", key, err, nil)
	}
	return nil, &LeaseHeldError{Name: name}
}

// LeaseHolder reads the named lease without taking it.
func (s *S3) LeaseHolder(ctx context.Context, name string) (string, error) {
	key, err := s.leaseKey(name)
	if err != nil {
		return "", err
	}
	cur, err := s.getSmall(ctx, key)
	if isNotFound(err) {
		return "", fmt.Errorf("s3: lease %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return "", s.opErr("read lease", key, err, nil)
	}
	var held leaseRecord
	if json.Unmarshal(cur.body, &held) != nil || held.expired(cur.lastModified, cur.serverTime, time.Now()) {
		return "", fmt.Errorf("s3: lease %s: %w", name, ErrNotFound)
	}
	return held.Holder, nil
}

// TakeOver replaces the lease held seen in, if its object is unchanged
// since (If-Match on the ETag seen).
func (s *S3) TakeOver(ctx context.Context, held *LeaseHeldError, ttl time.Duration) (Lease, error) {
	if held == nil || held.version == "" {
		return nil, errors.New("s3: take over lease: no lease seen to take over")
	}
	key, err := s.leaseKey(held.Name)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.OpTimeout)
	defer cancel()
	rec := newLeaseRecord(s.opts.Holder, ttl, time.Now())
	body, _ := json.Marshal(rec)
	etag, err := s.putSmall(ctx, key, body, "application/json", func(in *s3.PutObjectInput) { in.IfMatch = aws.String(held.version) })
	if isPrecondition(err) || isNotFound(err) {
		return nil, &LeaseHeldError{Name: held.Name}
	}
	if err != nil {
		return nil, s.opErr("take over lease", key, err, nil)
	}
	return &S3Lease{s: s, name: held.Name, key: key, ttl: ttl, tookOver: true, etag: etag, expires: rec.Expires}, nil
}

// Renew extends the lease by its TTL from now, for a holder whose fetch runs
// longer than expected. ErrLeaseLost means another host took it over.
func (l *S3Lease) Renew(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, l.s.opts.OpTimeout)
	defer cancel()
	rec := newLeaseRecord(l.s.opts.Holder, l.ttl, time.Now())
	body, _ := json.Marshal(rec)
	etag, err := l.s.putSmall(ctx, l.key, body, "application/json", func(in *s3.PutObjectInput) { in.IfMatch = aws.String(l.etag) })
	if isPrecondition(err) || isNotFound(err) {
		return fmt.Errorf("s3: lease %s: %w", l.name, ErrLeaseLost)
	}
	if err != nil {
		return l.s.opErr("renew lease", l.key, err, nil)
	}
	l.etag, l.expires = etag, rec.Expires
	return nil
}

// Release deletes the lease if it is still ours. The delete carries
// If-Match with our ETag, which S3 honours; a store that ignores it (MinIO
// does) leaves a window between our check and the delete in which a host
// taking over our expired lease could lose its new lease. That only happens
// after this host overran its TTL, and costs at most one more upstream fetch.
func (l *S3Lease) Release(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.s
	ctx, cancel := context.WithTimeout(ctx, s.opts.OpTimeout)
	defer cancel()
	head, err := s.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &s.opts.Bucket, Key: &l.key})
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return s.opErr("release lease", l.key, err, nil)
	}
	if aws.ToString(head.ETag) != l.etag {
		return nil // taken over after it expired; the new holder owns it
	}
	_, err = s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &s.opts.Bucket, Key: &l.key, IfMatch: aws.String(l.etag)})
	if err != nil && !isNotFound(err) && !isPrecondition(err) {
		return s.opErr("release lease", l.key, err, nil)
	}
	return nil
}

// Key layout (docs/s3.md).

func (s *S3) blobKey(k Key) (string, error) {
	if err := checkKey(k); err != nil {
		return "", err
	}
	return s.opts.Prefix + "blobs/" + k.Upstream + "/" + k.Digest.Algorithm().String() + "/" + k.Digest.Encoded(), nil
}

func (s *S3) manifestKey(k Key) (string, error) {
	if err := checkKey(k); err != nil {
		return "", err
	}
	return s.opts.Prefix + "manifests/" + k.Upstream + "/" + k.Digest.Algorithm().String() + "/" + k.Digest.Encoded(), nil
}

func (s *S3) tagKey(upstream, repo, tag string) (string, error) {
	if err := checkTag(upstream, repo, tag); err != nil {
		return "", err
	}
	return s.opts.Prefix + "tags/" + upstream + "/" + repo + "/" + tag, nil
}

func checkTag(upstream, repo, tag string) error {
	if err := checkUpstream(upstream); err != nil {
		return err
	}
	if !validRepo(repo) {
		return fmt.Errorf("storage: invalid repository name %q", repo)
	}
	if !validTag(tag) {
		return fmt.Errorf("storage: invalid tag %q", tag)
	}
	return nil
}

func (s *S3) leaseKey(name string) (string, error) {
	if err := checkLeaseName(name); err != nil {
		return "", err
	}
	return s.opts.Prefix + "leases/" + name, nil
}

func checkLeaseName(name string) error {
	if name == "" || strings.HasPrefix(name, "/") || strings.HasSuffix(name, "/") {
		return fmt.Errorf("storage: invalid lease name %q", name)
	}
	for _, part := range strings.Split(name, "/") {
		if part == "" || part == "." || part == ".." || !printable(part) {
			return fmt.Errorf("storage: invalid lease name %q", name)
		}
	}
	return nil
}

func checkKey(k Key) error {
	if err := checkUpstream(k.Upstream); err != nil {
		return err
	}
	if err := k.Digest.Validate(); err != nil {
		return fmt.Errorf("storage: %s: %w", k, err)
	}
	return nil
}

func checkUpstream(u string) error {
	if u == "" || u == "." || u == ".." || strings.Contains(u, "/") || !printable(u) {
		return fmt.Errorf("storage: invalid upstream name %q", u)
	}
	return nil
}

func printable(s string) bool {
	for _, r := range s {
		if r <= ' ' || r == 0x7f {
			return false
		}
	}
	return true
}

// validRepo follows the distribution spec's path components.
func validRepo(repo string) bool {
	if repo == "" || len(repo) > 255 {
		return false
	}
	for _, c := range strings.Split(repo, "/") {
		if c == "" {
			return false
		}
		for i := 0; i < len(c); i++ {
			ch := c[i]
			alnum := ch >= 'a' && ch <= 'z' || ch >= '0' && ch <= '9'
			sep := ch == '.' || ch == '_' || ch == '-'
			if !alnum && !sep {
				return false
			}
			if sep && (i == 0 || i == len(c)-1) {
				return false
			}
		}
	}
	return true
}

func validTag(tag string) bool {
	if tag == "" || len(tag) > 128 {
		return false
	}
	for i := 0; i < len(tag); i++ {
		ch := tag[i]
		word := ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '_'
		if !word && (i == 0 || ch != '.' && ch != '-') {
			return false
		}
	}
	return true
}

// Errors.

var errOpTimeout = fmt.Errorf("s3 did not answer in time: %w", context.DeadlineExceeded)

// opErr maps S3's answers onto the tier's errors; cause explains a cancelled
// context the SDK reports only as "canceled".
func (s *S3) opErr(op, key string, err, cause error) error {
	if isNotFound(err) {
		return fmt.Errorf("s3: %s %s: %w", op, key, ErrNotFound)
	}
	if cause != nil && cause != context.Canceled && errors.Is(err, context.Canceled) {
		return fmt.Errorf("s3: %s %s: %w", op, key, cause)
	}
	return fmt.Errorf("s3: %s %s: %w", op, key, err)
}

func errorCode(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

func httpStatus(err error) int {
	var re *awshttp.ResponseError
	if errors.As(err, &re) {
		return re.HTTPStatusCode()
	}
	return 0
}

func isNotFound(err error) bool {
	if err == nil {
		return false
	}
	var nsk *types.NoSuchKey
	var nf *types.NotFound
	if errors.As(err, &nsk) || errors.As(err, &nf) {
		return true
	}
	switch errorCode(err) {
	case "NoSuchKey", "NotFound":
		return true
	case "NoSuchBucket":
		// A missing bucket is a configuration fault, not a cache miss.
		return false
	}
	return httpStatus(err) == http.StatusNotFound
}

// isInvalidRange is S3's 416 for a Range starting at or past the end.
func isInvalidRange(err error) bool {
	return err != nil && (errorCode(err) == "InvalidRange" || httpStatus(err) == http.StatusRequestedRangeNotSatisfiable)
}

// isPrecondition covers a failed If-Match/If-None-Match (412) and S3's 409
// for a conditional write racing another one on the same key: either way
// another writer got there first.
func isPrecondition(err error) bool {
	if err == nil {
		return false
	}
	switch errorCode(err) {
	case "PreconditionFailed", "ConditionalRequestConflict":
		return true
	}
	st := httpStatus(err)
	return st == http.StatusPreconditionFailed || st == http.StatusConflict
}

// requestHook reports each attempt to OnRequest. It sits first in the
// deserialize step, which runs once per attempt, inside the retry loop, and
// sees the errors the operation's deserializer made of S3's answers.
func requestHook(fn func(op string, err error)) func(*middleware.Stack) error {
	return func(stack *middleware.Stack) error {
		return stack.Deserialize.Add(middleware.DeserializeMiddlewareFunc("BerthRequestHook",
			func(ctx context.Context, in middleware.DeserializeInput, next middleware.DeserializeHandler) (middleware.DeserializeOutput, middleware.Metadata, error) {
				out, md, err := next.HandleDeserialize(ctx, in)
				fn(awsmiddleware.GetOperationName(ctx), requestFailure(ctx, err))
				return out, md, err
			}), middleware.Before)
	}
}

// requestFailure is err unless it is an ordinary answer or the caller's own
// cancellation.
func requestFailure(ctx context.Context, err error) error {
	if err == nil || isNotFound(err) || isPrecondition(err) || isInvalidRange(err) {
		return nil
	}
	if errors.Is(err, context.Canceled) && context.Cause(ctx) == context.Canceled {
		return nil
	}
	return err
}

// idleReader fails a download that stalls: the timer runs only while a Read
// waits on S3, so a slow consumer never trips it.
type idleReader struct {
	body    io.ReadCloser
	timeout time.Duration
	cancel  context.CancelCauseFunc
	timer   *time.Timer
	once    sync.Once
	fired   chan struct{}
}

var errReadIdle = errors.New("s3 stopped sending the blob")

func newIdleReader(body io.ReadCloser, timeout time.Duration, cancel context.CancelCauseFunc) *idleReader {
	r := &idleReader{body: body, timeout: timeout, cancel: cancel, fired: make(chan struct{})}
	r.timer = time.AfterFunc(time.Hour, func() {
		r.once.Do(func() { close(r.fired) })
		cancel(errReadIdle)
	})
	r.timer.Stop()
	return r
}

func (r *idleReader) Read(p []byte) (int, error) {
	r.timer.Reset(r.timeout)
	n, err := r.body.Read(p)
	r.timer.Stop()
	select {
	case <-r.fired:
		if err != nil && err != io.EOF {
			return n, fmt.Errorf("s3: read blob: %w (%v)", errReadIdle, err)
		}
	default:
	}
	return n, err
}

func (r *idleReader) Close() error {
	r.timer.Stop()
	err := r.body.Close()
	r.cancel(nil)
	return err
}

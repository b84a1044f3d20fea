// Package storage holds berth's cache tiers: the local disk every host has
// and the S3 bucket the fleet shares. Both are content-addressed and keyed by
// upstream registry and digest, never by URL.
package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/opencontainers/go-digest"
)

// ErrNotFound means the tier does not hold the object.
var ErrNotFound = errors.New("not found")

// ErrNoSpace means the local tier cannot make room for a blob; callers stream
// it through without caching.
var ErrNoSpace = errors.New("no space left in local cache")

// ErrOffsetPastEnd means a blob read was asked to start at or past the
// blob's end.
var ErrOffsetPastEnd = errors.New("offset at or past the end of the blob")

// ErrLeaseHeld means another live host holds the lease.
var ErrLeaseHeld = errors.New("lease held by another host")

// Key names a cached blob or manifest.
type Key struct {
	Upstream string // registry name as clients use it, e.g. docker.io
	Digest   digest.Digest
}

func (k Key) String() string { return k.Upstream + "@" + k.Digest.String() }

// Manifest is a manifest's exact bytes and the media type to serve them with.
type Manifest struct {
	MediaType string `json:"mediaType"`
	Content   []byte `json:"content"`
}

// TagRecord is what berth last learnt about a tag from its upstream.
type TagRecord struct {
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType"`
	Size      int64         `json:"size"`
	Checked   time.Time     `json:"checked"` // when the upstream last confirmed it
}

// The fleet-wide tier under each host's local disk is a bucket seen through
// three small interfaces: blob objects, small records (manifests and tag
// records) and leases. Any object may vanish at any time (the bucket is a
// cache); readers verify digests themselves. S3 and Memory implement all
// three; conformance_test.go holds both to the same behaviour.

// Blobs are the bucket's blob objects: immutable, written once, verified.
type Blobs interface {
	// GetBlob opens a blob for reading from offset (0 for the whole blob)
	// and returns its total size, or ErrNotFound. An offset at or past the
	// end is an error.
	GetBlob(ctx context.Context, k Key, offset int64) (io.ReadCloser, int64, error)
	// StatBlob returns a blob's size without reading it, or ErrNotFound.
	StatBlob(ctx context.Context, k Key) (int64, error)
	// PutBlob uploads a verified blob of size bytes read from r at offsets
	// 0..size, in bounded memory, unless the bucket has it already.
	PutBlob(ctx context.Context, k Key, r io.ReaderAt, size int64) error
	// PutBlobStream uploads a blob read once, front to back, from r, in
	// bounded memory. r must fail rather than end when its content does not
	// match k's digest: an upload whose body fails leaves no object.
	PutBlobStream(ctx context.Context, k Key, r io.Reader) error
	// DeleteBlob removes a blob found to be corrupt.
	DeleteBlob(ctx context.Context, k Key) error
}

// Records are the bucket's small objects: manifests, immutable and checked
// against their digest, and tag records, the only mutable ones.
type Records interface {
	GetManifest(ctx context.Context, k Key) (Manifest, error)
	PutManifest(ctx context.Context, k Key, m Manifest) error
	GetTag(ctx context.Context, upstream, repo, tag string) (TagRecord, error)
	PutTag(ctx context.Context, upstream, repo, tag string, r TagRecord) error
}

// Leases grant one host at a time the right to do a piece of work for the
// fleet (fetch a blob, revalidate a tag).
type Leases interface {
	// AcquireLease takes the named lease for ttl, taking over an expired
	// one. While another host's lease is live it returns a
	// *LeaseHeldError, which matches ErrLeaseHeld.
	AcquireLease(ctx context.Context, name string, ttl time.Duration) (Lease, error)
	// TakeOver takes a live lease from a holder known to be dead (its
	// berth refuses connections), on the evidence of held as AcquireLease
	// returned it. It succeeds only while the lease is exactly as it was
	// seen then: a holder that renewed it since keeps it (ErrLeaseHeld).
	TakeOver(ctx context.Context, held *LeaseHeldError, ttl time.Duration) (Lease, error)
	// LeaseHolder names the holder of the named lease while it is live,
	// with one read and without taking it: a host that expects another to
	// be fetching a blob finds where to stream it from. ErrNotFound when
	// the lease is free (absent or expired).
	LeaseHolder(ctx context.Context, name string) (string, error)
}

// Lease is one host's hold on a named lease.
type Lease interface {
	// Renew extends the lease by its TTL from now; ErrLeaseLost means
	// another host took it over after it expired.
	Renew(ctx context.Context) error
	// Release gives the lease up if it is still this host's.
	Release(ctx context.Context) error
	// TookOver reports whether the lease was taken from a holder that let
	// it expire.
	TookOver() bool
}

// Bucket is the whole fleet tier, as the engine uses it.
type Bucket interface {
	Blobs
	Records
	Leases
	// Ping checks that the bucket answers.
	Ping(ctx context.Context) error
}

// ErrLeaseLost means a lease expired and another host took it over before its
// holder renewed it.
var ErrLeaseLost = errors.New("lease lost to another host")

// LeaseHeldError says who holds a live lease and until when; it matches
// ErrLeaseHeld with errors.Is. Holder is whatever that host set as its
// holder name, so a fleet can put an address there to stream from.
type LeaseHeldError struct {
	Name    string
	Holder  string    // empty when another host won a race seen only as a failed write
	Expires time.Time // by the holder's clock; zero when unknown

	version string // the lease as seen (an ETag, a token), for TakeOver
}

func (e *LeaseHeldError) Error() string {
	if e.Holder == "" {
		return fmt.Sprintf("lease %s: %v", e.Name, ErrLeaseHeld)
	}
	return fmt.Sprintf("lease %s: %v (%s, until %s)", e.Name, ErrLeaseHeld, e.Holder, e.Expires.Format(time.RFC3339))
}

// Is makes errors.Is(err, ErrLeaseHeld) true.
func (e *LeaseHeldError) Is(target error) bool { return target == ErrLeaseHeld }

// BlobLeaseName is the lease name for fetching a blob from its upstream.
func BlobLeaseName(k Key) string {
	return "blobs/" + k.Upstream + "/" + k.Digest.Algorithm().String() + "/" + k.Digest.Encoded()
}

// TagLeaseName is the lease name for revalidating a tag with its upstream.
func TagLeaseName(upstream, repo, tag string) string {
	return "tags/" + upstream + "/" + repo + "/" + tag
}

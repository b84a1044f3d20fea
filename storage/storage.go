// Package storage holds berth's cache tiers: the local disk every host has
// and the S3 bucket the fleet shares. Both are content-addressed and keyed by
// upstream registry and digest, never by URL.
package storage

import (
	"context"
	"errors"
	"io"
	"os"
	"time"

	"github.com/opencontainers/go-digest"
)

// ErrNotFound means the tier does not hold the object.
var ErrNotFound = errors.New("not found")

// ErrNoSpace means the local tier cannot make room for a blob; callers stream
// it through without caching.
var ErrNoSpace = errors.New("no space left in local cache")

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

// Shared is the fleet-wide tier under each host's local disk. Any object may
// vanish at any time (S3 is a cache); readers verify digests themselves.
type Shared interface {
	// GetBlob opens a blob for reading with its size, or ErrNotFound.
	GetBlob(ctx context.Context, k Key) (io.ReadCloser, int64, error)
	// PutBlob uploads a verified blob read from f (size bytes from offset 0).
	PutBlob(ctx context.Context, k Key, f *os.File, size int64) error
	// DeleteBlob removes a blob found to be corrupt.
	DeleteBlob(ctx context.Context, k Key) error

	GetManifest(ctx context.Context, k Key) (Manifest, error)
	PutManifest(ctx context.Context, k Key, m Manifest) error

	GetTag(ctx context.Context, upstream, repo, tag string) (TagRecord, error)
	PutTag(ctx context.Context, upstream, repo, tag string, r TagRecord) error

	// AcquireLease takes the named lease for ttl, taking over an expired one.
	// It returns ErrLeaseHeld while another host's lease is live.
	AcquireLease(ctx context.Context, name string, ttl time.Duration) (Lease, error)
}

// Lease is the right to fetch one object from the upstream for the fleet.
type Lease interface {
	Release(ctx context.Context) error
}

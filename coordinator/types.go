package coordinator

import (
	"slices"
	"time"

	"github.com/opencontainers/go-digest"
)

// APIPrefix is where the node API lives on a berth's listeners.
const APIPrefix = "/berth/v1/"

// Image names one image by digest: what a node is asked to warm. A tag is
// resolved once, up front, by whoever submits the job, so a tag that moves
// in the middle of a deploy cannot mix two versions across nodes.
type Image struct {
	// Repository is the registry host and repository path as clients pull
	// it, e.g. docker.io/library/alpine or ghcr.io/org/app.
	Repository string        `json:"repository"`
	Digest     digest.Digest `json:"digest"`
	// Ref is the reference the user gave (a tag, usually), for reports.
	Ref string `json:"ref,omitempty"`
}

func (i Image) String() string {
	if i.Ref != "" {
		return i.Ref + "@" + i.Digest.String()
	}
	return i.Repository + "@" + i.Digest.String()
}

// PrefetchRequest is the body of POST /berth/v1/prefetch.
type PrefetchRequest struct {
	Images []Image `json:"images"`
	// Platforms are os/arch[/variant] strings an index is expanded to;
	// empty: the node's own platform.
	Platforms []string `json:"platforms,omitempty"`
	// PinUntil keeps the blobs from eviction until then; zero: no pin.
	PinUntil time.Time `json:"pin_until,omitzero"`
	// FromHolder are blobs another node is fetching into the bucket now
	// (a pre-warm's node phase): each is streamed from the node whose
	// fleet lease says it fetches it, found with one bucket read, before
	// the bucket itself is asked.
	FromHolder []digest.Digest `json:"from_holder,omitempty"`
}

// PrefetchAccepted is the answer to a prefetch request.
type PrefetchAccepted struct {
	ID string `json:"id"`
}

// ErrorInfo is a typed error: Kind is one of engine.Kind's values
// (not_found, unauthorized, rate_limited, upstream_unavailable,
// digest_mismatch, no_space, invalid_reference, unknown_registry,
// unsupported, internal) or, seen from a client, node_unreachable,
// bad_answer, canceled, timeout.
type ErrorInfo struct {
	Kind    string `json:"kind"`
	Message string `json:"message"`
}

func (e *ErrorInfo) Error() string { return e.Kind + ": " + e.Message }

// States of jobs, images and blobs.
const (
	StatePending   = "pending"
	StateRunning   = "running"
	StateDone      = "done"
	StateFailed    = "failed"
	StateCanceled  = "canceled"
	StateSucceeded = "succeeded"
)

// BlobStatus is one blob of a job.
type BlobStatus struct {
	Digest digest.Digest `json:"digest"`
	Size   int64         `json:"size"`
	State  string        `json:"state"` // pending, running, done, failed
	Error  *ErrorInfo    `json:"error,omitempty"`
}

// ImageStatus is one image of a job: its manifests resolved to the blobs
// of the platforms asked for.
type ImageStatus struct {
	Image
	Platforms  []string     `json:"platforms,omitempty"` // the platforms the index was expanded to
	State      string       `json:"state"`               // pending, running, done, failed
	Error      *ErrorInfo   `json:"error,omitempty"`
	BytesDone  int64        `json:"bytes_done"`
	BytesTotal int64        `json:"bytes_total"`
	Blobs      []BlobStatus `json:"blobs"`
}

// JobSnapshot is a job's state at one moment. Seq grows with every change,
// and BytesDone never decreases: a blob counts once it is on disk.
type JobSnapshot struct {
	ID         string        `json:"id"`
	Seq        int64         `json:"seq"`
	State      string        `json:"state"` // running, succeeded, failed, canceled
	Created    time.Time     `json:"created"`
	Finished   time.Time     `json:"finished,omitzero"`
	PinUntil   time.Time     `json:"pin_until,omitzero"`
	BytesDone  int64         `json:"bytes_done"`
	BytesTotal int64         `json:"bytes_total"`
	BlobsDone  int           `json:"blobs_done"`
	BlobsTotal int           `json:"blobs_total"`
	Images     []ImageStatus `json:"images"`
	Error      *ErrorInfo    `json:"error,omitempty"`
}

// Terminal reports whether the job has ended.
func (s *JobSnapshot) Terminal() bool {
	return s.State == StateSucceeded || s.State == StateFailed || s.State == StateCanceled
}

// Pin is one blob a node keeps from eviction until a time.
type Pin struct {
	Repository string        `json:"repository"` // upstream/name, as the engine resolved it
	Digest     digest.Digest `json:"digest"`
	Size       int64         `json:"size"`
	Until      time.Time     `json:"until"`
	OnDisk     bool          `json:"on_disk"`
}

// WarmStatus is the body of GET /berth/v1/warm.
type WarmStatus struct {
	Warm    bool  `json:"warm"`
	Pins    int   `json:"pins"`
	Missing []Pin `json:"missing,omitempty"`
	// Images answers ?image=: how much of each image the node lacks.
	Images []ImageWarmth `json:"images,omitempty"`
}

// ImageWarmth is how much of one image a node holds: the config and layer
// blobs of the platforms asked for (default the node's own).
type ImageWarmth struct {
	Image        Image    `json:"image"`
	Platforms    []string `json:"platforms,omitempty"` // the platforms an index was expanded to
	Blobs        int      `json:"blobs"`
	Bytes        int64    `json:"bytes"`
	MissingBlobs int      `json:"missing_blobs"`
	MissingBytes int64    `json:"missing_bytes"` // what the node's disk lacks
	// Warm: every blob is on the node's disk and pinned there.
	Warm bool `json:"warm"`
	// PinnedUntil is when the image's pins on the node end (the earliest
	// of its blobs'); zero when some blob is not pinned there.
	PinnedUntil time.Time  `json:"pinned_until,omitzero"`
	Error       *ErrorInfo `json:"error,omitempty"`
}

// NodeFacts is GET /berth/v1/node: what a coordinator needs to plan.
type NodeFacts struct {
	// ID names the node: made once and kept in its data directory, so
	// it outlives restarts and address changes. Nodes older than the ID
	// send none, and are told apart by the URL they are reached at.
	ID          string   `json:"id,omitempty"`
	Hostname    string   `json:"hostname,omitempty"`
	OS          string   `json:"os"`
	Arch        string   `json:"arch"`
	Variant     string   `json:"variant,omitempty"`
	Version     string   `json:"version"`
	CacheBudget int64    `json:"cache_budget"`
	CacheUsed   int64    `json:"cache_used"`
	CacheBlobs  int      `json:"cache_blobs"`
	DiskFree    int64    `json:"disk_free"`
	PinnedBytes int64    `json:"pinned_bytes"`
	Pins        int      `json:"pins"`
	Upstreams   []string `json:"upstreams,omitempty"`
	// Features are the prefetch request fields this node knows beyond the
	// first version's, so a newer coordinator sends them only to nodes
	// that will not refuse them as unknown.
	Features []string `json:"features,omitempty"`
}

// FeatureFromHolder is a node that takes PrefetchRequest.FromHolder.
const FeatureFromHolder = "from_holder"

func (f *NodeFacts) has(feature string) bool {
	return f != nil && slices.Contains(f.Features, feature)
}

// Platform is the os/arch[/variant] string of the node.
func (f NodeFacts) Platform() string {
	p := f.OS + "/" + f.Arch
	if f.Variant != "" {
		p += "/" + f.Variant
	}
	return p
}

// Resolved is GET /berth/v1/resolve?ref=...: a tag resolved to a digest by
// a node, through its upstream credentials, which never leave the node.
type Resolved struct {
	Ref        string        `json:"ref"`
	Repository string        `json:"repository"`
	Digest     digest.Digest `json:"digest"`
	MediaType  string        `json:"media_type"`
}

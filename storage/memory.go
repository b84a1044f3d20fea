package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"sync"
	"time"
)

// Memory is a Bucket held in memory, for tests of the fleet logic built on
// the bucket. It keeps S3's semantics (conformance_test.go runs the same
// suite against both) and adds what tests of failures need: injected errors,
// bodies that break or stall, request counts and corrupt objects.
//
// Several hosts share one bucket through Host views. Each view has its own
// lease holder name, and its own faults and request counts, because those
// belong to a host's path to S3: to take the whole bucket down, fail every
// view.
type Memory struct {
	b      *memBucket
	holder string

	mu       sync.Mutex
	fail     map[string]error // by operation; "" fails them all
	body     *bodyFault
	changed  chan struct{} // closed when body changes, to wake stalled reads
	requests map[string]int
}

// MemoryOptions configures NewMemory.
type MemoryOptions struct {
	// Holder is the first view's lease holder name. Default "memory".
	Holder string
	// Now is the bucket's clock, by which every view judges lease expiry,
	// as S3's clock does for real hosts. Default time.Now.
	Now func() time.Time
}

// memoryOps are the operation names Fail and Requests take: the Bucket's
// methods, and a lease's Renew and Release as RenewLease and ReleaseLease.
var memoryOps = []string{
	"GetBlob", "StatBlob", "PutBlob", "PutBlobStream", "DeleteBlob",
	"GetManifest", "PutManifest", "GetTag", "PutTag",
	"AcquireLease", "RenewLease", "ReleaseLease", "LeaseHolder", "Ping",
}

var _ Bucket = (*Memory)(nil)

type memBucket struct {
	now func() time.Time

	mu        sync.Mutex
	blobs     map[Key][]byte // never mutated in place, so readers may share them
	manifests map[Key]Manifest
	tags      map[string]TagRecord
	leases    map[string]*memLeaseRecord
	tokens    uint64
}

type memLeaseRecord struct {
	holder  string
	token   uint64 // tells this holder's lease from a later one of the same name
	version uint64 // changes with every write, as an S3 object's ETag does
	expires time.Time
}

type bodyFault struct {
	after int64
	err   error // nil stalls
}

// NewMemory returns the first host's view of a new, empty bucket.
func NewMemory(opts MemoryOptions) *Memory {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Holder == "" {
		opts.Holder = "memory"
	}
	b := &memBucket{
		now:       opts.Now,
		blobs:     map[Key][]byte{},
		manifests: map[Key]Manifest{},
		tags:      map[string]TagRecord{},
		leases:    map[string]*memLeaseRecord{},
	}
	return b.host(opts.Holder)
}

// Host returns another host's view of the same bucket, whose leases carry
// holder. It starts with no faults and no requests counted.
func (m *Memory) Host(holder string) *Memory { return m.b.host(holder) }

func (b *memBucket) host(holder string) *Memory {
	return &Memory{b: b, holder: holder, fail: map[string]error{}, changed: make(chan struct{}), requests: map[string]int{}}
}

// Fail makes op fail with err from now on; a nil err ends that failure.
// op is a Bucket method's name ("GetBlob", "AcquireLease", ...),
// "RenewLease" or "ReleaseLease" for a lease's methods, or "" for all of
// them. Failures count as requests.
func (m *Memory) Fail(op string, err error) {
	mustBeOp(op)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err == nil {
		delete(m.fail, op)
	} else {
		m.fail[op] = err
	}
}

// BreakBodies makes GetBlob bodies, those already open included, fail with
// err once they have returned after bytes (counted from the offset they
// were opened at). A nil err stalls them there instead, until the fault
// changes, the body is closed or GetBlob's context ends.
func (m *Memory) BreakBodies(after int64, err error) {
	m.setBody(&bodyFault{after: after, err: err})
}

// ClearFaults ends every failure set with Fail and BreakBodies; stalled
// bodies resume.
func (m *Memory) ClearFaults() {
	m.mu.Lock()
	clear(m.fail)
	m.mu.Unlock()
	m.setBody(nil)
}

func (m *Memory) setBody(f *bodyFault) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.body = f
	close(m.changed)
	m.changed = make(chan struct{})
}

// Requests is how many times op (or, for "", any operation) was asked of
// this view, failed ones included; a call whose context had already ended
// is not a request.
func (m *Memory) Requests(op string) int {
	mustBeOp(op)
	m.mu.Lock()
	defer m.mu.Unlock()
	if op != "" {
		return m.requests[op]
	}
	n := 0
	for _, c := range m.requests {
		n += c
	}
	return n
}

// CorruptBlob stores b as k's content, unchecked, over whatever is there:
// what a faulty tool or a damaged upload would leave.
func (m *Memory) CorruptBlob(k Key, b []byte) {
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	m.b.blobs[k] = bytes.Clone(b)
}

// CorruptManifest stores man as k's manifest, unchecked.
func (m *Memory) CorruptManifest(k Key, man Manifest) {
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	m.b.manifests[k] = Manifest{MediaType: man.MediaType, Content: bytes.Clone(man.Content)}
}

func mustBeOp(op string) {
	if op != "" && !slices.Contains(memoryOps, op) {
		// A misspelt name would otherwise inject nothing, silently.
		panic(fmt.Sprintf("storage.Memory: unknown operation %q", op))
	}
}

// begin counts a request and returns the failure injected for it, if any.
func (m *Memory) begin(ctx context.Context, op string) error {
	if err := ctx.Err(); err != nil {
		return context.Cause(ctx)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.requests[op]++
	if err, ok := m.fail[op]; ok {
		return fmt.Errorf("memory: %s: %w", op, err)
	}
	if err, ok := m.fail[""]; ok {
		return fmt.Errorf("memory: %s: %w", op, err)
	}
	return nil
}

// Ping answers unless a failure is injected.
func (m *Memory) Ping(ctx context.Context) error { return m.begin(ctx, "Ping") }

// Blobs.

// GetBlob opens a blob from offset, with its total size.
func (m *Memory) GetBlob(ctx context.Context, k Key, offset int64) (io.ReadCloser, int64, error) {
	if err := checkKey(k); err != nil {
		return nil, 0, err
	}
	if offset < 0 {
		return nil, 0, fmt.Errorf("memory: get blob %s: negative offset %d", k, offset)
	}
	if err := m.begin(ctx, "GetBlob"); err != nil {
		return nil, 0, err
	}
	m.b.mu.Lock()
	data, ok := m.b.blobs[k]
	m.b.mu.Unlock()
	if !ok {
		return nil, 0, fmt.Errorf("memory: get blob %s: %w", k, ErrNotFound)
	}
	size := int64(len(data))
	if offset > 0 && offset >= size {
		return nil, 0, fmt.Errorf("memory: get blob %s from %d: %w", k, offset, ErrOffsetPastEnd)
	}
	return &memBody{m: m, ctx: ctx, data: data[offset:], closed: make(chan struct{})}, size, nil
}

// StatBlob returns a blob's size.
func (m *Memory) StatBlob(ctx context.Context, k Key) (int64, error) {
	if err := checkKey(k); err != nil {
		return 0, err
	}
	if err := m.begin(ctx, "StatBlob"); err != nil {
		return 0, err
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	data, ok := m.b.blobs[k]
	if !ok {
		return 0, fmt.Errorf("memory: stat blob %s: %w", k, ErrNotFound)
	}
	return int64(len(data)), nil
}

// PutBlob stores size bytes of r unless the bucket has the blob. Unlike S3,
// which checks only small blobs, it refuses any content that does not
// match k's digest: a test then learns of the bug that sent it.
func (m *Memory) PutBlob(ctx context.Context, k Key, r io.ReaderAt, size int64) error {
	if err := checkKey(k); err != nil {
		return err
	}
	if size < 0 {
		return fmt.Errorf("memory: put blob %s: negative size", k)
	}
	if err := m.begin(ctx, "PutBlob"); err != nil {
		return err
	}
	if m.hasBlob(k) {
		return nil
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(io.NewSectionReader(r, 0, size), b); err != nil {
		return fmt.Errorf("memory: put blob %s: %w", k, err)
	}
	return m.storeBlob(k, b)
}

// PutBlobStream stores the blob read from r unless the bucket has it. It
// reads r to its end even then, as S3's uploader does, so a writer feeding
// r never blocks on a reader that went away.
func (m *Memory) PutBlobStream(ctx context.Context, k Key, r io.Reader) error {
	if err := checkKey(k); err != nil {
		return err
	}
	if err := m.begin(ctx, "PutBlobStream"); err != nil {
		return err
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return fmt.Errorf("memory: put blob %s: %w", k, err)
	}
	if m.hasBlob(k) {
		return nil
	}
	return m.storeBlob(k, b)
}

func (m *Memory) hasBlob(k Key) bool {
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	_, ok := m.b.blobs[k]
	return ok
}

func (m *Memory) storeBlob(k Key, b []byte) error {
	if got := k.Digest.Algorithm().FromBytes(b); got != k.Digest {
		return fmt.Errorf("memory: put blob %s: %w: got %s", k, ErrDigestMismatch, got)
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	if _, ok := m.b.blobs[k]; !ok { // another host's put may have won meanwhile
		m.b.blobs[k] = b
	}
	return nil
}

// DeleteBlob removes a blob; a missing one is no error.
func (m *Memory) DeleteBlob(ctx context.Context, k Key) error {
	if err := checkKey(k); err != nil {
		return err
	}
	if err := m.begin(ctx, "DeleteBlob"); err != nil {
		return err
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	delete(m.b.blobs, k)
	return nil
}

// memBody reads a blob's bytes, subject to its view's BreakBodies.
type memBody struct {
	m      *Memory
	ctx    context.Context
	data   []byte // what is left to read
	served int64
	closed chan struct{}
	once   sync.Once
}

var errBodyClosed = errors.New("memory: read on a closed blob body")

func (r *memBody) Read(p []byte) (int, error) {
	for {
		select {
		case <-r.closed:
			return 0, errBodyClosed
		default:
		}
		if r.ctx.Err() != nil {
			return 0, context.Cause(r.ctx)
		}
		r.m.mu.Lock()
		f, changed := r.m.body, r.m.changed
		r.m.mu.Unlock()
		if len(r.data) == 0 {
			return 0, io.EOF
		}
		want := len(p)
		if f != nil {
			left := f.after - r.served
			if left <= 0 {
				if f.err != nil {
					return 0, f.err
				}
				select {
				case <-changed:
					continue
				case <-r.closed:
					return 0, errBodyClosed
				case <-r.ctx.Done():
					return 0, context.Cause(r.ctx)
				}
			}
			want = int(min(int64(want), left))
		}
		n := copy(p[:want], r.data)
		r.data = r.data[n:]
		r.served += int64(n)
		return n, nil
	}
}

// Close ends the body; a Read stalled in it returns.
func (r *memBody) Close() error {
	r.once.Do(func() { close(r.closed) })
	return nil
}

// Records.

// GetManifest returns a copy of a manifest after checking it against its
// digest; a mismatching one is deleted and reported as S3 reports it.
func (m *Memory) GetManifest(ctx context.Context, k Key) (Manifest, error) {
	if err := checkKey(k); err != nil {
		return Manifest{}, err
	}
	if err := m.begin(ctx, "GetManifest"); err != nil {
		return Manifest{}, err
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	man, ok := m.b.manifests[k]
	if !ok {
		return Manifest{}, fmt.Errorf("memory: get manifest %s: %w", k, ErrNotFound)
	}
	if k.Digest.Algorithm().FromBytes(man.Content) != k.Digest {
		delete(m.b.manifests, k)
		return Manifest{}, fmt.Errorf("memory: manifest %s: content does not match digest, deleted: %w: %w", k, ErrCorrupt, ErrNotFound)
	}
	return Manifest{MediaType: man.MediaType, Content: bytes.Clone(man.Content)}, nil
}

// PutManifest stores a copy of a manifest unless the bucket has it.
func (m *Memory) PutManifest(ctx context.Context, k Key, man Manifest) error {
	if err := checkKey(k); err != nil {
		return err
	}
	if k.Digest.Algorithm().FromBytes(man.Content) != k.Digest {
		return fmt.Errorf("memory: put manifest %s: content does not match digest", k)
	}
	if err := m.begin(ctx, "PutManifest"); err != nil {
		return err
	}
	if man.MediaType == "" {
		man.MediaType = "application/octet-stream" // what S3 gives an object with no Content-Type
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	if _, ok := m.b.manifests[k]; !ok {
		m.b.manifests[k] = Manifest{MediaType: man.MediaType, Content: bytes.Clone(man.Content)}
	}
	return nil
}

// GetTag returns the last record put for a tag.
func (m *Memory) GetTag(ctx context.Context, upstream, repo, tag string) (TagRecord, error) {
	if err := checkTag(upstream, repo, tag); err != nil {
		return TagRecord{}, err
	}
	if err := m.begin(ctx, "GetTag"); err != nil {
		return TagRecord{}, err
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	r, ok := m.b.tags[upstream+"/"+repo+"/"+tag]
	if !ok {
		return TagRecord{}, fmt.Errorf("memory: get tag %s/%s:%s: %w", upstream, repo, tag, ErrNotFound)
	}
	return r, nil
}

// PutTag overwrites a tag record.
func (m *Memory) PutTag(ctx context.Context, upstream, repo, tag string, r TagRecord) error {
	if err := checkTag(upstream, repo, tag); err != nil {
		return err
	}
	if err := m.begin(ctx, "PutTag"); err != nil {
		return err
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	m.b.tags[upstream+"/"+repo+"/"+tag] = r
	return nil
}

// Leases.

// AcquireLease takes the named lease for this view's holder, as S3 does,
// with expiry judged exactly by the bucket's clock.
func (m *Memory) AcquireLease(ctx context.Context, name string, ttl time.Duration) (Lease, error) {
	if err := checkLeaseName(name); err != nil {
		return nil, err
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("memory: lease %s: ttl must be positive", name)
	}
	if err := m.begin(ctx, "AcquireLease"); err != nil {
		return nil, err
	}
	now := m.b.now()
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	cur := m.b.leases[name]
	if cur != nil && now.Before(cur.expires) {
		return nil, &LeaseHeldError{Name: name, Holder: cur.holder, Expires: cur.expires, version: strconv.FormatUint(cur.version, 10)}
	}
	m.b.tokens++
	m.b.leases[name] = &memLeaseRecord{holder: m.holder, token: m.b.tokens, version: m.b.tokens, expires: now.Add(ttl)}
	return &memLease{m: m, name: name, ttl: ttl, token: m.b.tokens, tookOver: cur != nil}, nil
}

// LeaseHolder reads the named lease without taking it.
func (m *Memory) LeaseHolder(ctx context.Context, name string) (string, error) {
	if err := checkLeaseName(name); err != nil {
		return "", err
	}
	if err := m.begin(ctx, "LeaseHolder"); err != nil {
		return "", err
	}
	now := m.b.now()
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	cur := m.b.leases[name]
	if cur == nil || !now.Before(cur.expires) {
		return "", fmt.Errorf("memory: lease %s: %w", name, ErrNotFound)
	}
	return cur.holder, nil
}

// TakeOver replaces the lease seen in held if it is still the same one.
func (m *Memory) TakeOver(ctx context.Context, held *LeaseHeldError, ttl time.Duration) (Lease, error) {
	if held == nil || held.version == "" {
		return nil, errors.New("memory: take over lease: no lease seen to take over")
	}
	if err := m.begin(ctx, "AcquireLease"); err != nil {
		return nil, err
	}
	now := m.b.now()
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	cur := m.b.leases[held.Name]
	if cur == nil || strconv.FormatUint(cur.version, 10) != held.version {
		return nil, &LeaseHeldError{Name: held.Name}
	}
	m.b.tokens++
	m.b.leases[held.Name] = &memLeaseRecord{holder: m.holder, token: m.b.tokens, version: m.b.tokens, expires: now.Add(ttl)}
	return &memLease{m: m, name: held.Name, ttl: ttl, token: m.b.tokens, tookOver: true}, nil
}

type memLease struct {
	m        *Memory
	name     string
	ttl      time.Duration
	token    uint64
	tookOver bool
}

func (l *memLease) TookOver() bool { return l.tookOver }

// Renew extends the lease unless another holder took it over; like S3's, it
// revives a lease that expired if nobody took it.
func (l *memLease) Renew(ctx context.Context) error {
	if err := l.m.begin(ctx, "RenewLease"); err != nil {
		return err
	}
	now := l.m.b.now()
	b := l.m.b
	b.mu.Lock()
	defer b.mu.Unlock()
	cur := b.leases[l.name]
	if cur == nil || cur.token != l.token {
		return fmt.Errorf("memory: lease %s: %w", l.name, ErrLeaseLost)
	}
	b.tokens++
	cur.expires, cur.version = now.Add(l.ttl), b.tokens
	return nil
}

func (l *memLease) Release(ctx context.Context) error {
	if err := l.m.begin(ctx, "ReleaseLease"); err != nil {
		return err
	}
	b := l.m.b
	b.mu.Lock()
	defer b.mu.Unlock()
	if cur := b.leases[l.name]; cur != nil && cur.token == l.token {
		delete(b.leases, l.name)
	}
	return nil
}

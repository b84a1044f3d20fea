package storage

import (
	"bytes"
	"context"
	"fmt"
	"sync"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// Objects are the bucket's small named objects beyond manifests and tags:
// what other parts of berth share with the fleet (the inspector's results,
// its record of tag-change events). Names are slash-separated paths of
// printable parts, like lease names; bodies are at most 8 MiB. S3 and
// Memory implement it; it is kept apart from Bucket so that a bucket
// without it still serves the engine.
type Objects interface {
	// GetObject returns an object's body, or ErrNotFound.
	GetObject(ctx context.Context, name string) ([]byte, error)
	// PutObject writes an object, replacing any.
	PutObject(ctx context.Context, name string, body []byte) error
	// CreateObject writes an object only if none has that name (a
	// conditional write): created is false, with no error, when another
	// writer got there first. One of any number of hosts racing wins.
	CreateObject(ctx context.Context, name string, body []byte) (created bool, err error)
}

var (
	_ Objects = (*S3)(nil)
	_ Objects = (*Memory)(nil)
)

// Memory's Fail and Requests take these operations' names too.
func init() { memoryOps = append(memoryOps, "GetObject", "PutObject", "CreateObject") }

func (s *S3) objectKey(name string) (string, error) {
	if err := checkLeaseName(name); err != nil {
		return "", fmt.Errorf("storage: invalid object name %q", name)
	}
	return s.opts.Prefix + "objects/" + name, nil
}

// GetObject reads a small object under <prefix>objects/.
func (s *S3) GetObject(ctx context.Context, name string) ([]byte, error) {
	key, err := s.objectKey(name)
	if err != nil {
		return nil, err
	}
	o, err := s.getSmall(ctx, key)
	if err != nil {
		return nil, s.opErr("get object", key, err, nil)
	}
	return o.body, nil
}

// PutObject writes a small object under <prefix>objects/.
func (s *S3) PutObject(ctx context.Context, name string, body []byte) error {
	key, err := s.objectKey(name)
	if err != nil {
		return err
	}
	if len(body) > maxSmallObject {
		return fmt.Errorf("s3: put object %s: larger than %d bytes", key, maxSmallObject)
	}
	if _, err := s.putSmall(ctx, key, body, "application/json", nil); err != nil {
		return s.opErr("put object", key, err, nil)
	}
	return nil
}

// CreateObject writes a small object with If-None-Match: *, so exactly one
// of the hosts racing to create it succeeds.
func (s *S3) CreateObject(ctx context.Context, name string, body []byte) (bool, error) {
	key, err := s.objectKey(name)
	if err != nil {
		return false, err
	}
	if len(body) > maxSmallObject {
		return false, fmt.Errorf("s3: create object %s: larger than %d bytes", key, maxSmallObject)
	}
	_, err = s.putSmall(ctx, key, body, "application/json", func(in *s3.PutObjectInput) { in.IfNoneMatch = aws.String("*") })
	if isPrecondition(err) {
		return false, nil
	}
	if err != nil {
		return false, s.opErr("create object", key, err, nil)
	}
	return true, nil
}

// Memory's objects live beside its bucket, keyed by the bucket, so every
// Host view of one bucket sees the same objects.
var memObjects = struct {
	sync.Mutex
	m map[*memBucket]map[string][]byte
}{m: map[*memBucket]map[string][]byte{}}

func (m *Memory) objects() map[string][]byte {
	objs := memObjects.m[m.b]
	if objs == nil {
		objs = map[string][]byte{}
		memObjects.m[m.b] = objs
	}
	return objs
}

// GetObject returns a copy of an object's body, or ErrNotFound.
func (m *Memory) GetObject(ctx context.Context, name string) ([]byte, error) {
	if err := checkLeaseName(name); err != nil {
		return nil, fmt.Errorf("storage: invalid object name %q", name)
	}
	if err := m.begin(ctx, "GetObject"); err != nil {
		return nil, err
	}
	memObjects.Lock()
	defer memObjects.Unlock()
	b, ok := m.objects()[name]
	if !ok {
		return nil, fmt.Errorf("memory: get object %s: %w", name, ErrNotFound)
	}
	return bytes.Clone(b), nil
}

// PutObject stores a copy of body under name, replacing any.
func (m *Memory) PutObject(ctx context.Context, name string, body []byte) error {
	if err := checkLeaseName(name); err != nil {
		return fmt.Errorf("storage: invalid object name %q", name)
	}
	if err := m.begin(ctx, "PutObject"); err != nil {
		return err
	}
	memObjects.Lock()
	defer memObjects.Unlock()
	m.objects()[name] = bytes.Clone(body)
	return nil
}

// CreateObject stores body under name unless an object has that name.
func (m *Memory) CreateObject(ctx context.Context, name string, body []byte) (bool, error) {
	if err := checkLeaseName(name); err != nil {
		return false, fmt.Errorf("storage: invalid object name %q", name)
	}
	if err := m.begin(ctx, "CreateObject"); err != nil {
		return false, err
	}
	memObjects.Lock()
	defer memObjects.Unlock()
	objs := m.objects()
	if _, ok := objs[name]; ok {
		return false, nil
	}
	objs[name] = bytes.Clone(body)
	return true, nil
}

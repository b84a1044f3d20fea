package storage

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// ObjectLister lists the small named objects of Objects (objects.go) under
// a prefix; pre-warm's coordinator finds its jobs with it. S3 and Memory
// implement it.
type ObjectLister interface {
	// ListObjects returns the names (as given to PutObject) that start
	// with prefix, sorted.
	ListObjects(ctx context.Context, prefix string) ([]string, error)
}

var (
	_ ObjectLister = (*S3)(nil)
	_ ObjectLister = (*Memory)(nil)
)

// ListObjects lists the objects under <prefix>objects/<prefix>.
func (s *S3) ListObjects(ctx context.Context, prefix string) ([]string, error) {
	base := s.opts.Prefix + "objects/"
	full := base + prefix
	var out []string
	p := s3.NewListObjectsV2Paginator(s.client, &s3.ListObjectsV2Input{Bucket: &s.opts.Bucket, Prefix: &full})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, s.opErr("list objects", full, err, nil)
		}
		for _, o := range page.Contents {
			if o.Key != nil {
				out = append(out, strings.TrimPrefix(*o.Key, base))
			}
		}
	}
	sort.Strings(out)
	return out, nil
}

// ListObjects lists the objects whose names start with prefix.
func (m *Memory) ListObjects(ctx context.Context, prefix string) ([]string, error) {
	if err := m.begin(ctx, "ListObjects"); err != nil {
		return nil, fmt.Errorf("memory: list objects: %w", err)
	}
	memObjects.Lock()
	defer memObjects.Unlock()
	var out []string
	for name := range m.objects() {
		if strings.HasPrefix(name, prefix) {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out, nil
}

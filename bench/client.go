package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sync/errgroup"
)

// newTransport is shared by all clients of one run, as a node's container
// runtime shares its connections.
func newTransport() *http.Transport {
	return &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 1024,
		IdleConnTimeout:     30 * time.Second,
		DisableCompression:  true,
	}
}

// layerConcurrency is how many blobs one pull fetches at once (Docker's default).
const layerConcurrency = 3

// pullImage pulls the test image by tag as a container runtime does:
// manifest, then config and layers, every blob checked against its digest
// (go-containerregistry verifies blob bodies as they are read). It returns
// the bytes received.
func pullImage(ctx context.Context, tr http.RoundTripper, host string, want testImage) (int64, error) {
	ref, err := name.ParseReference(host+"/"+imageRepo+":"+imageTag, name.Insecure)
	if err != nil {
		return 0, err
	}
	desc, err := remote.Get(ref, remote.WithTransport(tr), remote.WithContext(ctx))
	if err != nil {
		return 0, fmt.Errorf("manifest: %w", err)
	}
	// The digest is computed from the bytes received, so this checks the
	// manifest's content, not a header.
	if desc.Digest != want.digest {
		return 0, fmt.Errorf("manifest digest %s, want %s", desc.Digest, want.digest)
	}
	img, err := desc.Image()
	if err != nil {
		return 0, err
	}
	m, err := img.Manifest()
	if err != nil {
		return 0, err
	}
	blobs := append([]v1.Descriptor{m.Config}, m.Layers...)
	sizes := make([]int64, len(blobs))
	var g errgroup.Group
	g.SetLimit(layerConcurrency)
	for i, d := range blobs {
		g.Go(func() error {
			l, err := img.LayerByDigest(d.Digest)
			if err != nil {
				return err
			}
			rc, err := l.Compressed()
			if err != nil {
				return fmt.Errorf("blob %s: %w", d.Digest, err)
			}
			n, err := drain(rc)
			if cerr := rc.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("blob %s: %w", d.Digest, err)
			}
			if n != d.Size {
				return fmt.Errorf("blob %s: got %d bytes, want %d", d.Digest, n, d.Size)
			}
			sizes[i] = n
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return 0, err
	}
	total := int64(len(desc.Manifest))
	for _, n := range sizes {
		total += n
	}
	return total, nil
}

// getBlob reads url to the end and checks its length.
func getBlob(ctx context.Context, client *http.Client, url string, size int64) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	n, err := drain(resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s: %w after %d bytes", url, err, n)
	}
	if n != size {
		return fmt.Errorf("GET %s: %d bytes, want %d", url, n, size)
	}
	return nil
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// drain reads r to the end with a large buffer, so the clients' own cost
// per byte stays small beside the servers'.
func drain(r io.Reader) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var n int64
	for {
		m, err := r.Read(buf)
		n += int64(m)
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// concurrently runs fn n times at once and returns the wall time until the
// last one finished, or the first error.
func concurrently(ctx context.Context, n int, fn func(ctx context.Context, i int) error) (time.Duration, error) {
	g, ctx := errgroup.WithContext(ctx)
	start := time.Now()
	for i := range n {
		g.Go(func() error { return fn(ctx, i) })
	}
	err := g.Wait()
	return time.Since(start), err
}

package coordinator

import (
	"context"
	"fmt"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/engine"
)

// Resolver turns a reference into an image by digest.
type Resolver func(ctx context.Context, ref string) (Image, error)

// NodeResolver resolves through a node's API: the node asks its upstream
// with its own credentials, which never leave it.
func NodeResolver(c *Client) Resolver {
	return func(ctx context.Context, ref string) (Image, error) {
		repo, _, d, err := ParseReference(ref)
		if err != nil {
			return Image{}, err
		}
		if d != "" {
			return Image{Repository: repo, Digest: d, Ref: ref}, nil
		}
		r, err := c.Resolve(ctx, ref)
		if err != nil {
			return Image{}, err
		}
		return Image{Repository: r.Repository, Digest: r.Digest, Ref: ref}, nil
	}
}

// DirectResolver resolves with a HEAD to the registry itself, with the
// Docker config's credentials and credential helpers (as docker pull
// would); they are used here and sent nowhere else.
func DirectResolver() Resolver {
	return func(ctx context.Context, ref string) (Image, error) {
		repo, _, d, err := ParseReference(ref)
		if err != nil {
			return Image{}, err
		}
		if d != "" {
			return Image{Repository: repo, Digest: d, Ref: ref}, nil
		}
		r, err := name.ParseReference(ref)
		if err != nil {
			return Image{}, &engine.Error{Kind: engine.KindInvalidReference, Msg: err.Error()}
		}
		desc, err := remote.Head(r, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain))
		if err != nil {
			return Image{}, classifyRemote(ref, err)
		}
		return Image{Repository: repo, Digest: digest.Digest(desc.Digest.String()), Ref: ref}, nil
	}
}

func classifyRemote(ref string, err error) error {
	var kind engine.Kind = engine.KindUnavailable
	if s := remoteStatus(err); s != 0 {
		switch {
		case s == 404:
			kind = engine.KindNotFound
		case s == 401 || s == 403:
			kind = engine.KindDenied
		case s == 429:
			kind = engine.KindRateLimited
		}
	}
	return &engine.Error{Kind: kind, Msg: fmt.Sprintf("%s: %v", ref, err)}
}

// ResolveAll resolves every reference once, a few at a time. Failures
// come back per reference, in order; the images that resolved, deduplicated.
func ResolveAll(ctx context.Context, refs []string, resolve Resolver) ([]Image, map[string]*ErrorInfo) {
	imgs := make([]Image, len(refs))
	errs := make([]error, len(refs))
	forEach(len(refs), 8, func(i int) { imgs[i], errs[i] = resolve(ctx, refs[i]) })
	var out []Image
	failed := map[string]*ErrorInfo{}
	seen := map[string]bool{}
	for i, r := range refs {
		if errs[i] != nil {
			failed[r] = infoOf(errs[i])
			continue
		}
		k := imgs[i].Repository + "@" + imgs[i].Digest.String()
		if !seen[k] {
			seen[k] = true
			out = append(out, imgs[i])
		}
	}
	return out, failed
}

// forEach calls fn(i) for every i below n, at most limit at a time, and
// returns once every call has.
func forEach(n, limit int, fn func(i int)) {
	sem := make(chan struct{}, limit)
	var wg sync.WaitGroup
	for i := range n {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			fn(i)
		}()
	}
	wg.Wait()
}

package engine

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/berth-dev/berth/storage"
)

// A prefetch told that another host is fetching the blob reads the blob's
// lease once and streams from its holder mid-download: no bucket miss, no
// failed lease write, and the upstream still sends the blob once. Told the
// holder (BlobHolder) it asks the bucket nothing; without a holder it
// falls back to the usual way.
func TestPrefetchFromHolderStreamsFromTheFetchingHost(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	f := startFetching(t, ctx, 71)
	view := f.bucket.Host("waiter")
	waiter := newTestEngine(t, f.u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = view })
	toldView := f.bucket.Host("told")
	told := newTestEngine(t, f.u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = toldView })
	if h := told.BlobHolder(ctx, told.repo, f.d); h != f.peer {
		t.Fatalf("BlobHolder = %q, want %s", h, f.peer)
	}
	started := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- waiter.PrefetchWith(ctx, waiter.repo, f.d, PrefetchOptions{FromHolder: true, Started: func() { close(started) }})
	}()
	// The waiter's download starts (streams from the holder) while the
	// upstream still holds the rest of the blob back.
	select {
	case <-started:
	case err := <-done:
		t.Fatalf("prefetch ended before the upstream sent the blob: %v", err)
	case <-ctx.Done():
		t.Fatal("the waiter's download did not start from the holder")
	}
	close(f.gate)
	if _, err := io.Copy(io.Discard, f.hb); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got, err := waiter.read(t, f.d); err != nil || !bytes.Equal(got, f.content) {
		t.Fatalf("waiter's copy: %d bytes, %v", len(got), err)
	}
	if n := view.Requests(""); n != 1 || view.Requests("LeaseHolder") != 1 {
		t.Errorf("the waiter asked the bucket %d times (%d lease reads), want one lease read", n, view.Requests("LeaseHolder"))
	}

	// Told the holder, a prefetch asks the bucket nothing more.
	before := toldView.Requests("")
	if err := told.PrefetchWith(ctx, told.repo, f.d, PrefetchOptions{FromHolder: true, Holder: f.peer}); err != nil {
		t.Fatal(err)
	}
	if n := toldView.Requests("") - before; n != 0 {
		t.Errorf("a prefetch told the holder asked the bucket %d times", n)
	}

	// No holder: the usual way, from the bucket the holder filled.
	other := newTestEngine(t, f.u, func(o *Options, _ *storage.LocalOptions) { o.Bucket = f.bucket.Host("other") })
	key := storage.Key{Upstream: "upstream.test", Digest: f.d}
	eventually(t, "the holder's lease released", func() bool {
		_, err := f.bucket.LeaseHolder(ctx, storage.BlobLeaseName(key))
		return err != nil
	})
	if err := other.PrefetchWith(ctx, other.repo, f.d, PrefetchOptions{FromHolder: true}); err != nil {
		t.Fatal(err)
	}
	if n := f.u.count("GET", blobPath("org/app", f.d)); n != 1 {
		t.Errorf("upstream GETs: %d, want 1", n)
	}
}

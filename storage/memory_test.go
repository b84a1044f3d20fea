package storage

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// The Bucket behaviour Memory shares with S3 is in TestBucketConformance;
// these cover what only tests use.

func TestMemoryFail(t *testing.T) {
	ctx := context.Background()
	a := NewMemory(MemoryOptions{Holder: "host-a"})
	b := a.Host("host-b")
	want, k := randomBlob(t, 1000)
	if err := a.PutBlob(ctx, k, bytes.NewReader(want), int64(len(want))); err != nil {
		t.Fatal(err)
	}
	l, err := a.AcquireLease(ctx, BlobLeaseName(k), time.Minute)
	if err != nil {
		t.Fatal(err)
	}

	errGet, errDown := errors.New("get refused"), errors.New("s3 down")
	a.Fail("GetBlob", errGet)
	if _, _, err := a.GetBlob(ctx, k, 0); !errors.Is(err, errGet) {
		t.Fatalf("GetBlob with a failure injected = %v, want %v", err, errGet)
	}
	if _, err := a.StatBlob(ctx, k); err != nil {
		t.Fatalf("StatBlob failed with only GetBlob failing: %v", err)
	}
	if _, size := getAll(t, ctx, b, k, 0); size != int64(len(want)) {
		t.Fatal("another host's view failed with this one's fault")
	}

	a.Fail("", errDown)
	for name, op := range map[string]func() error{
		"StatBlob":     func() error { _, err := a.StatBlob(ctx, k); return err },
		"PutBlob":      func() error { return a.PutBlob(ctx, k, bytes.NewReader(want), int64(len(want))) },
		"PutTag":       func() error { return a.PutTag(ctx, "docker.io", "library/a", "latest", TagRecord{Digest: k.Digest}) },
		"AcquireLease": func() error { _, err := a.AcquireLease(ctx, "x", time.Minute); return err },
		"RenewLease":   func() error { return l.Renew(ctx) },
		"ReleaseLease": func() error { return l.Release(ctx) },
		"Ping":         func() error { return a.Ping(ctx) },
	} {
		if err := op(); !errors.Is(err, errDown) {
			t.Errorf("%s with every operation failing = %v, want %v", name, err, errDown)
		}
	}
	// The named failure outlives the end of the general one.
	a.Fail("", nil)
	if err := a.Ping(ctx); err != nil {
		t.Fatalf("Ping after the general failure ended: %v", err)
	}
	if _, _, err := a.GetBlob(ctx, k, 0); !errors.Is(err, errGet) {
		t.Fatalf("GetBlob after the general failure ended = %v, want %v still", err, errGet)
	}
	a.ClearFaults()
	if _, size := getAll(t, ctx, a, k, 0); size != int64(len(want)) {
		t.Fatal("GetBlob after ClearFaults")
	}
	// The lease survived the failed Release.
	if _, err := b.AcquireLease(ctx, BlobLeaseName(k), time.Minute); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("lease after a failed release: %v, want still held", err)
	}

	defer func() {
		if recover() == nil {
			t.Error("Fail of a misspelt operation did not panic")
		}
	}()
	a.Fail("GetBlobs", errGet)
}

func TestMemoryRequests(t *testing.T) {
	ctx := context.Background()
	a := NewMemory(MemoryOptions{})
	b := a.Host("host-b")
	want, k := randomBlob(t, 100)
	a.PutBlob(ctx, k, bytes.NewReader(want), int64(len(want)))
	a.StatBlob(ctx, k)
	a.Fail("StatBlob", errors.New("down"))
	a.StatBlob(ctx, k)
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := a.StatBlob(cancelled, k); !errors.Is(err, context.Canceled) {
		t.Errorf("StatBlob with a cancelled context = %v", err)
	}
	getAll(t, ctx, b, k, 0)
	l, _ := b.AcquireLease(ctx, "x", time.Minute)
	l.Renew(ctx)
	l.Release(ctx)

	for _, c := range []struct {
		host *Memory
		op   string
		want int
	}{
		{a, "PutBlob", 1}, {a, "StatBlob", 2}, {a, "GetBlob", 0}, {a, "", 3},
		{b, "GetBlob", 1}, {b, "AcquireLease", 1}, {b, "RenewLease", 1}, {b, "ReleaseLease", 1}, {b, "", 4},
	} {
		if got := c.host.Requests(c.op); got != c.want {
			t.Errorf("%s: Requests(%q) = %d, want %d", c.host.holder, c.op, got, c.want)
		}
	}
}

func TestMemoryBreakBodies(t *testing.T) {
	ctx := context.Background()
	m := NewMemory(MemoryOptions{})
	want, k := randomBlob(t, 1000)
	m.PutBlob(ctx, k, bytes.NewReader(want), int64(len(want)))
	open := func(offset int64) io.ReadCloser {
		t.Helper()
		rc, _, err := m.GetBlob(ctx, k, offset)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { rc.Close() })
		return rc
	}

	t.Run("Error", func(t *testing.T) {
		defer m.ClearFaults()
		early := open(0) // opened before the fault, still subject to it
		errCut := errors.New("connection reset")
		m.BreakBodies(300, errCut)
		for _, c := range []struct {
			rc  io.ReadCloser
			off int
		}{{early, 0}, {open(100), 100}} {
			got, err := io.ReadAll(c.rc)
			if !errors.Is(err, errCut) || !bytes.Equal(got, want[c.off:c.off+300]) {
				t.Errorf("body from %d: read %d bytes then %v; want 300 then %v", c.off, len(got), err, errCut)
			}
		}
		// A body shorter than the fault's point ends as usual.
		if got, err := io.ReadAll(open(800)); err != nil || !bytes.Equal(got, want[800:]) {
			t.Errorf("short body: %d bytes, %v", len(got), err)
		}
	})

	// stalled reads a body in the background and reports what it got.
	type result struct {
		got []byte
		err error
	}
	stalled := func(rc io.Reader) <-chan result {
		ch := make(chan result, 1)
		go func() {
			got, err := io.ReadAll(rc)
			ch <- result{got, err}
		}()
		return ch
	}
	stillStalled := func(ch <-chan result) {
		t.Helper()
		select {
		case r := <-ch:
			t.Fatalf("stalled body returned %d bytes, %v", len(r.got), r.err)
		case <-time.After(50 * time.Millisecond):
		}
	}

	t.Run("StallThenResume", func(t *testing.T) {
		m.BreakBodies(200, nil)
		ch := stalled(open(0))
		stillStalled(ch)
		m.ClearFaults()
		if r := <-ch; r.err != nil || !bytes.Equal(r.got, want) {
			t.Fatalf("resumed body: %d bytes, %v", len(r.got), r.err)
		}
	})

	t.Run("StallThenFail", func(t *testing.T) {
		defer m.ClearFaults()
		m.BreakBodies(200, nil)
		ch := stalled(open(0))
		stillStalled(ch)
		errIdle := errors.New("s3 stopped sending")
		m.BreakBodies(200, errIdle)
		if r := <-ch; !errors.Is(r.err, errIdle) || len(r.got) != 200 {
			t.Fatalf("stalled body after the fault became an error: %d bytes, %v", len(r.got), r.err)
		}
	})

	t.Run("StallEndsOnCloseAndContext", func(t *testing.T) {
		defer m.ClearFaults()
		m.BreakBodies(0, nil)
		rc := open(0)
		ch := stalled(rc)
		stillStalled(ch)
		rc.Close()
		if r := <-ch; r.err == nil {
			t.Fatal("closing a stalled body did not end its read")
		}

		cctx, cancel := context.WithCancel(ctx)
		rc2, _, err := m.GetBlob(cctx, k, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer rc2.Close()
		ch = stalled(rc2)
		stillStalled(ch)
		cancel()
		if r := <-ch; !errors.Is(r.err, context.Canceled) {
			t.Fatalf("stalled body after its context ended: %v", r.err)
		}
	})
}

func TestMemoryCorruptObjects(t *testing.T) {
	ctx := context.Background()
	m := NewMemory(MemoryOptions{})
	want, k := randomBlob(t, 1000)
	m.CorruptBlob(k, []byte("garbage"))
	// A blob is never overwritten: the corrupt one stays until deleted.
	if err := m.PutBlob(ctx, k, bytes.NewReader(want), int64(len(want))); err != nil {
		t.Fatal(err)
	}
	if got, size := getAll(t, ctx, m, k, 0); string(got) != "garbage" || size != 7 {
		t.Fatalf("corrupt blob reads %q (size %d)", got, size)
	}
	if err := m.DeleteBlob(ctx, k); err != nil {
		t.Fatal(err)
	}
	if err := m.PutBlob(ctx, k, bytes.NewReader(want), int64(len(want))); err != nil {
		t.Fatal(err)
	}
	if got, _ := getAll(t, ctx, m, k, 0); !bytes.Equal(got, want) {
		t.Fatal("blob not replaced after delete")
	}

	content := []byte(`{"schemaVersion":2}`)
	mk := Key{Upstream: "docker.io", Digest: digest.FromBytes(content)}
	m.CorruptManifest(mk, Manifest{MediaType: "x", Content: []byte(`{"schemaVersion":1}`)})
	if _, err := m.GetManifest(ctx, mk); !errors.Is(err, ErrCorrupt) || !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetManifest of a corrupt manifest = %v, want ErrCorrupt and ErrNotFound", err)
	}
	if err := m.PutManifest(ctx, mk, Manifest{MediaType: "x", Content: content}); err != nil {
		t.Fatal(err)
	}
	if got, err := m.GetManifest(ctx, mk); err != nil || !bytes.Equal(got.Content, content) {
		t.Fatalf("corrupt manifest not deleted when detected: %q, %v", got.Content, err)
	}
}

// Stricter than S3 on purpose: content that does not match its digest is a
// bug in the code under test.
func TestMemoryRefusesMismatchedBlobs(t *testing.T) {
	ctx := context.Background()
	m := NewMemory(MemoryOptions{})
	want, _ := randomBlob(t, 1000)
	k := Key{Upstream: "docker.io", Digest: digest.FromString("something else")}
	if err := m.PutBlob(ctx, k, bytes.NewReader(want), int64(len(want))); !errors.Is(err, ErrDigestMismatch) {
		t.Errorf("PutBlob of mismatched content = %v, want ErrDigestMismatch", err)
	}
	if err := m.PutBlobStream(ctx, k, bytes.NewReader(want)); !errors.Is(err, ErrDigestMismatch) {
		t.Errorf("PutBlobStream of mismatched content = %v, want ErrDigestMismatch", err)
	}
	if _, err := m.StatBlob(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Errorf("mismatched content stored: %v", err)
	}
}

func TestMemoryKeepsItsOwnCopies(t *testing.T) {
	ctx := context.Background()
	m := NewMemory(MemoryOptions{})
	want, k := randomBlob(t, 1000)
	buf := bytes.Clone(want)
	if err := m.PutBlob(ctx, k, bytes.NewReader(buf), int64(len(buf))); err != nil {
		t.Fatal(err)
	}
	buf[0] ^= 0xff
	other, ok := randomBlob(t, 1000)
	buf2 := bytes.Clone(other)
	if err := m.PutBlobStream(ctx, ok, bytes.NewReader(buf2)); err != nil {
		t.Fatal(err)
	}
	buf2[0] ^= 0xff
	if got, _ := getAll(t, ctx, m, k, 0); !bytes.Equal(got, want) {
		t.Error("PutBlob kept the caller's buffer")
	}
	if got, _ := getAll(t, ctx, m, ok, 0); !bytes.Equal(got, other) {
		t.Error("PutBlobStream kept the caller's buffer")
	}
}

// A host relaying a blob feeds PutBlobStream through a pipe; a present blob
// must not leave that writer blocked.
func TestMemoryPutBlobStreamReadsPresentBlobToTheEnd(t *testing.T) {
	ctx := context.Background()
	m := NewMemory(MemoryOptions{})
	want, k := randomBlob(t, 1000)
	m.PutBlob(ctx, k, bytes.NewReader(want), int64(len(want)))
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- m.PutBlobStream(ctx, k, pr) }()
	if _, err := pw.Write(want); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestMemoryLeaseClock(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	a := NewMemory(MemoryOptions{Holder: "host-a", Now: clock.now})
	b := a.Host("host-b")
	if _, err := a.AcquireLease(ctx, "l", time.Minute); err != nil {
		t.Fatal(err)
	}
	clock.advance(time.Minute - time.Nanosecond)
	var held *LeaseHeldError
	if _, err := b.AcquireLease(ctx, "l", time.Minute); !errors.As(err, &held) || held.Holder != "host-a" || !held.Expires.Equal(clock.now().Add(time.Nanosecond)) {
		t.Fatalf("lease a nanosecond before expiry: %v", err)
	}
	clock.advance(time.Nanosecond)
	if l, err := b.AcquireLease(ctx, "l", time.Minute); err != nil || !l.TookOver() {
		t.Fatalf("lease at its expiry: %v", err)
	}

	// The default clock is the real one.
	m := NewMemory(MemoryOptions{})
	if _, err := m.AcquireLease(ctx, "l", 20*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	time.Sleep(30 * time.Millisecond)
	if l, err := m.Host("other").AcquireLease(ctx, "l", time.Minute); err != nil || !l.TookOver() {
		t.Fatalf("lease past its TTL by the real clock: %v", err)
	}
}

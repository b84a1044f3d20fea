package storage

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// TestObjects holds S3 (on MinIO) and Memory to the same small-object
// behaviour: get, put, and a conditional create that exactly one of many
// racing hosts wins.
func TestObjects(t *testing.T) {
	t.Run("Memory", func(t *testing.T) {
		m := NewMemory(MemoryOptions{})
		testObjects(t, func(holder string) Objects { return m.Host(holder) })
	})
	t.Run("MinIO", func(t *testing.T) {
		m := testsupport.StartMinIO(t)
		setTestAWSEnv(t)
		bucket := m.NewBucket(t)
		testObjects(t, func(holder string) Objects { return newMinIOS3InEnv(t, m, bucket, holder, nil) })
	})
}

func testObjects(t *testing.T, host func(holder string) Objects) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a, b := host("a"), host("b")
	if _, err := a.GetObject(ctx, "inspect/x/y"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetObject of nothing = %v, want ErrNotFound", err)
	}
	if err := a.PutObject(ctx, "inspect/x/y", []byte(`{"v":1}`)); err != nil {
		t.Fatal(err)
	}
	if got, err := b.GetObject(ctx, "inspect/x/y"); err != nil || string(got) != `{"v":1}` {
		t.Fatalf("GetObject from another host = %q, %v", got, err)
	}
	if err := b.PutObject(ctx, "inspect/x/y", []byte(`{"v":2}`)); err != nil {
		t.Fatal(err)
	}
	if got, _ := a.GetObject(ctx, "inspect/x/y"); string(got) != `{"v":2}` {
		t.Fatalf("PutObject must replace: %q", got)
	}
	for _, bad := range []string{"", "/abs", "a/../b", "a//b", "trailing/"} {
		if err := a.PutObject(ctx, bad, nil); err == nil {
			t.Errorf("PutObject(%q) accepted a bad name", bad)
		}
	}

	// Ten hosts race to create one event record: exactly one wins.
	var wins atomic.Int32
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := host(string(rune('a' + i)))
			created, err := h.CreateObject(ctx, "events/docker.io/library/alpine/latest/sha256/abc", []byte("{}"))
			if err != nil {
				t.Error(err)
			}
			if created {
				wins.Add(1)
			}
		}()
	}
	wg.Wait()
	if wins.Load() != 1 {
		t.Fatalf("%d hosts created the same object, want exactly 1", wins.Load())
	}
	created, err := a.CreateObject(ctx, "events/docker.io/library/alpine/latest/sha256/abc", []byte("{}"))
	if err != nil || created {
		t.Fatalf("CreateObject of an existing object = %v, %v; want false, nil", created, err)
	}
}

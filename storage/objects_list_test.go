package storage

import (
	"context"
	"reflect"
	"testing"
)

func TestMemoryListObjects(t *testing.T) {
	ctx := context.Background()
	m := NewMemory(MemoryOptions{})
	for _, n := range []string{"prewarm/jobs/b.json", "prewarm/jobs/a.json", "prewarm/other", "inspector/x"} {
		if err := m.PutObject(ctx, n, []byte("{}")); err != nil {
			t.Fatal(err)
		}
	}
	got, err := m.Host("other").ListObjects(ctx, "prewarm/jobs/")
	if want := []string{"prewarm/jobs/a.json", "prewarm/jobs/b.json"}; err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("ListObjects: %q %v, want %q", got, err, want)
	}
	if got, _ := m.ListObjects(ctx, "nothing/"); len(got) != 0 {
		t.Errorf("ListObjects of an empty prefix: %q", got)
	}
}

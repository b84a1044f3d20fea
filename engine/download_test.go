package engine

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/storage"
)

func within[T any](ch <-chan T, d time.Duration) (T, bool) {
	select {
	case v := <-ch:
		return v, true
	case <-time.After(d):
		var zero T
		return zero, false
	}
}

// A reader gets every byte but the last while the download runs; the last
// comes only with a verified commit, so corrupt content is never whole.
func TestDownloadHoldsBackLastByteUntilVerified(t *testing.T) {
	for _, verified := range []bool{true, false} {
		f, err := os.CreateTemp(t.TempDir(), "download")
		if err != nil {
			t.Fatal(err)
		}
		content := []byte(strings.Repeat("berth", 200))
		f.Write(content)
		dl := newDownload(storage.Key{Upstream: "docker.io", Digest: digest.FromBytes(content)}, time.Second)
		dl.begin(int64(len(content)), "upstream", f)
		rd := dl.newReader(context.Background())
		dl.publish(int64(len(content)))
		buf := make([]byte, len(content))
		if _, err := io.ReadFull(rd, buf[:len(content)-1]); err != nil {
			t.Fatalf("reading what has arrived: %v", err)
		}
		last := make(chan error, 1)
		go func() {
			n, err := rd.Read(buf[len(content)-1:])
			if n > 0 {
				err = fmt.Errorf("got the last byte (err %v)", err)
			}
			last <- err
		}()
		// The reader must still be waiting when the verdict comes; a reader
		// that got the last byte early answers at once.
		if err, ok := within(last, 200*time.Millisecond); ok {
			t.Fatalf("last byte released before the download finished: %v", err)
		}
		if verified {
			dl.finish(nil, nil)
			if err, ok := within(last, 10*time.Second); !ok || err == nil || !strings.Contains(err.Error(), "got the last byte") {
				t.Fatalf("after a verified commit the reader did not get the last byte: %v", err)
			}
		} else {
			dl.finish(storage.ErrDigestMismatch, nil)
			if err, ok := within(last, 10*time.Second); !ok || err != errDownloadFailed {
				t.Fatalf("after a failed verification the reader got %v, want errDownloadFailed", err)
			}
		}
		rd.Close()
	}
}

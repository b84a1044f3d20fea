package engine

import (
	"bytes"
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

// A relay reader whose caller leaves between finding bytes in the ring and
// copying them out (a client whose deadline passes mid-Read) still copies
// the bytes it found: the download waits for that copy before it reuses
// that stretch of the ring, though the other reader would let it run on.
// (-race caught the overwrite in TestDiskFillingMidDownloadRelaysTheRest
// on a loaded machine.)
func TestRelayWaitsForTheCopyOfAReaderThatLeft(t *testing.T) {
	const size = 3 * RelayWindow
	d := newDownload(storage.Key{Upstream: "upstream.test", Digest: digest.FromString("x")}, time.Minute)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	gone := d.newReader(ctx)
	defer gone.Close()
	stays := d.newReader(context.Background())
	defer stays.Close()
	d.beginRelay(size, "upstream")
	go func() {
		_, err := d.fill(source{body: io.NopCloser(&patterned{n: size}), size: size}, nil,
			func(source) time.Duration { return time.Minute }, func(int) {}, func() {}, nil)
		d.finish(err, nil) // a digest mismatch: the pattern is not "x"
	}()
	buf := make([]byte, 1<<20)
	if _, err := io.ReadFull(gone, buf); err != nil {
		t.Fatal(err)
	}
	s, err := gone.available()
	if err != nil {
		t.Fatal(err)
	}
	at := gone.off
	cancel()
	staysDone := make(chan struct{})
	go func() {
		defer close(staysDone)
		io.Copy(io.Discard, stays)
	}()
	// Room for a download that does not wait to reuse the ring: the other
	// reader takes all 12 MiB in far less.
	time.Sleep(200 * time.Millisecond)
	m, err := gone.readSpan(buf, s)
	if err != nil || m == 0 {
		t.Fatalf("copy: %d bytes, %v", m, err)
	}
	want := make([]byte, m)
	(&patterned{off: at, n: size}).Read(want)
	if !bytes.Equal(buf[:m], want) {
		t.Fatalf("the %d bytes copied from offset %d were overwritten under the copy", m, at)
	}
	<-staysDone
}

// patterned is n bytes whose value at offset i is i mod 251, which repeats
// at no multiple of the ring's size.
type patterned struct{ off, n int64 }

func (p *patterned) Read(b []byte) (int, error) {
	if p.off >= p.n {
		return 0, io.EOF
	}
	b = b[:min(int64(len(b)), p.n-p.off)]
	for i := range b {
		b[i] = byte((p.off + int64(i)) % 251)
	}
	p.off += int64(len(b))
	return len(b), nil
}

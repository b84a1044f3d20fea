package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// stallIdle is berth's --source-idle-timeout in the stall scenario.
const stallIdle = 5 * time.Second

// staller is an HTTP proxy in front of the upstream that, when armed, lets the
// first GET of every large blob send a third of it and then nothing more,
// holding the connection open, as a registry behind a flaky load balancer
// or CDN does; later and ranged GETs go through.
type staller struct {
	addr  string
	srv   *http.Server
	armed atomic.Bool
	stop  chan struct{}

	mu   sync.Mutex
	seen map[string]bool
}

func newStaller(upstreamAddr string, large int64) (*staller, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &staller{addr: ln.Addr().String(), stop: make(chan struct{}), seen: map[string]bool{}}
	target, _ := url.Parse("http://" + upstreamAddr)
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.FlushInterval = -1
	rp.ErrorLog = log.New(io.Discard, "", 0) // the stalls it reports are the point
	rp.ModifyResponse = func(resp *http.Response) error {
		r := resp.Request
		if !s.armed.Load() || r.Method != http.MethodGet || resp.StatusCode != http.StatusOK ||
			!strings.Contains(r.URL.Path, "/blobs/") || resp.ContentLength < large {
			return nil
		}
		s.mu.Lock()
		first := !s.seen[r.URL.Path]
		s.seen[r.URL.Path] = true
		s.mu.Unlock()
		if first {
			resp.Body = &stallingBody{rc: resp.Body, left: resp.ContentLength / 3, stop: s.stop, ctx: r.Context()}
		}
		return nil
	}
	s.srv = &http.Server{Handler: rp, ReadHeaderTimeout: 30 * time.Second}
	go s.srv.Serve(ln)
	return s, nil
}

// arm makes the next first GET of every blob stall.
func (s *staller) arm(on bool) {
	s.mu.Lock()
	s.seen = map[string]bool{}
	s.mu.Unlock()
	s.armed.Store(on)
}

func (s *staller) close() {
	close(s.stop)
	s.srv.Close()
}

type stallingBody struct {
	rc   io.ReadCloser
	left int64
	stop chan struct{}
	ctx  context.Context
}

func (b *stallingBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		select {
		case <-b.stop:
		case <-b.ctx.Done():
		}
		return 0, io.ErrUnexpectedEOF
	}
	n, err := b.rc.Read(p[:min(int64(len(p)), b.left)])
	b.left -= int64(n)
	return n, err
}

func (b *stallingBody) Close() error { return b.rc.Close() }

// scenarioStall: wall-n concurrent cold pulls through berth with the
// upstream stalling once in the middle of every layer, beside the same
// pulls without the stall, and the distribution proxy under the same stall.
func (b *bench) scenarioStall(ctx context.Context) error {
	if err := b.ensureImage(ctx); err != nil {
		return err
	}
	o := b.opt
	// The stall happens at the upstream, before the link: the link carries
	// (and counts) only what the stalling upstream sends.
	st, err := newStaller(b.up.addr, o.layerSize/2)
	if err != nil {
		return err
	}
	defer st.close()
	link, err := testsupport.NewProxy(st.addr, o.rate)
	if err != nil {
		return err
	}
	defer link.Close()
	n := o.wallN
	plain := b.table.add(fmt.Sprintf("stall: %d cold pulls, upstream not stalling (s)", n), "%.2f").informational()
	stalled := b.table.add(fmt.Sprintf("stall: %d cold pulls, upstream stalling once mid-layer (s)", n), "%.2f").informational()
	over := b.table.add(fmt.Sprintf("stall: stalled − (not stalling + %s idle timeout) (s)", stallIdle), "%.2f").withGoal(2)
	bytesRow := b.table.add("stall: upstream bytes ÷ image bytes", "%.3f").withGoal(1.05)
	failed := b.table.add(fmt.Sprintf("stall: failed pulls of %d", n), "%.0f").withGoal(0)

	// A pull still running at the deadline counts as failed: it is what a
	// runtime sees as a hung pull.
	round := func(m mirror, start func(context.Context) (*server, error), armed bool, deadline time.Duration) (time.Duration, int64, int, error) {
		srv, err := start(ctx)
		if err != nil {
			return 0, 0, 0, err
		}
		defer srv.stop()
		st.arm(armed)
		tr := newTransport()
		defer tr.CloseIdleConnections()
		link.Reset()
		rctx, cancel := context.WithTimeout(ctx, deadline)
		defer cancel()
		var fails atomic.Int32
		wall, _ := concurrently(rctx, n, func(ctx context.Context, i int) error {
			got, err := pullImage(ctx, tr, srv.addr, b.image)
			if err == nil && got != b.image.bytes {
				err = fmt.Errorf("pulled %d bytes, the image has %d", got, b.image.bytes)
			}
			if err != nil {
				fails.Add(1)
				b.logf("%s pull %d: %v", m.name, i, err)
			}
			return nil // count every failure; let the others run on
		})
		time.Sleep(300 * time.Millisecond)
		return wall, link.UpstreamBytes(), int(fails.Load()), nil
	}
	viaStaller := []mirror{
		{"berth", func(ctx context.Context) (*server, error) {
			return b.startBerthVia(ctx, link.Addr, 5*time.Minute, nil, "--source-idle-timeout", stallIdle.String())
		}, func(r *row) *cell { return &r.berth }},
		{"distribution", func(ctx context.Context) (*server, error) {
			return b.startRegistry(ctx, "distribution", "", fmt.Sprintf("proxy:\n  remoteurl: http://%s\n", link.Addr))
		}, func(r *row) *cell { return &r.dist }},
	}
	for rep := range o.reps {
		for _, m := range viaStaller {
			what := fmt.Sprintf("%s, %d cold pulls, stall, repetition %d", m.name, n, rep+1)
			base, _, baseFails, err := round(m, m.start, false, b.pullDeadline(n))
			if err != nil || baseFails > 0 {
				b.fail(m.cell(plain), what+" (no stall)", fmt.Errorf("%v, %d failed", err, baseFails))
				continue
			}
			wall, up, fails, err := round(m, m.start, true, 2*base+stallIdle+20*time.Second)
			if err != nil {
				b.fail(m.cell(stalled), what, err)
				continue
			}
			b.logf("%s: %.2f s (not stalling %.2f s), upstream %s = %.3f × the image, %d failed",
				what, wall.Seconds(), base.Seconds(), sizeString(up), float64(up)/float64(b.image.bytes), fails)
			m.cell(plain).add(base.Seconds())
			m.cell(stalled).add(wall.Seconds())
			m.cell(over).add((wall - base - stallIdle).Seconds())
			m.cell(bytesRow).add(float64(up) / float64(b.image.bytes))
			m.cell(failed).add(float64(fails))
		}
	}
	return nil
}

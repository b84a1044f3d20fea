package main

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// throttle is the link between the mirrors and the upstream registry: a TCP
// proxy that limits what the upstream sends to a fixed rate shared by every
// connection, as a site's internet uplink would, and counts those bytes. It
// can also play a stuck registry: accept connections and answer nothing.
type throttle struct {
	addr   string // 127.0.0.1:PORT, the upstream endpoint the mirrors are given
	target string

	ln       net.Listener
	sent     atomic.Int64 // bytes the upstream sent through the link
	accepted atomic.Int64

	lim limiter

	mu      sync.Mutex
	hung    bool
	resume  chan struct{}
	closing chan struct{}
	open    map[net.Conn]struct{}
	wg      sync.WaitGroup
}

func startThrottle(target string, rate int64) (*throttle, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	t := &throttle{
		addr:    ln.Addr().String(),
		target:  target,
		ln:      ln,
		closing: make(chan struct{}),
		open:    map[net.Conn]struct{}{},
	}
	t.lim.setRate(rate)
	t.wg.Add(1)
	go t.serve()
	return t, nil
}

// upstreamBytes is what the upstream sent since the last reset.
func (t *throttle) upstreamBytes() int64 { return t.sent.Load() }

func (t *throttle) reset() {
	t.sent.Store(0)
	t.accepted.Store(0)
}

// setRate changes the link's rate in bytes per second; 0 lifts the limit.
func (t *throttle) setRate(bps int64) { t.lim.setRate(bps) }

// hang stops all forwarding: new connections are accepted and held, open ones
// stall in both directions. Nothing is closed, so clients see a registry
// that takes their request and never answers.
func (t *throttle) hang() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.hung {
		t.hung = true
		t.resume = make(chan struct{})
	}
}

func (t *throttle) unhang() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.hung {
		t.hung = false
		close(t.resume)
	}
}

func (t *throttle) close() {
	t.mu.Lock()
	select {
	case <-t.closing:
		t.mu.Unlock()
		return
	default:
	}
	close(t.closing)
	t.ln.Close()
	for c := range t.open {
		c.Close()
	}
	t.mu.Unlock()
	t.wg.Wait()
}

// wait blocks while the link hangs; false means it is closing.
func (t *throttle) wait() bool {
	for {
		t.mu.Lock()
		hung, resume := t.hung, t.resume
		t.mu.Unlock()
		if !hung {
			select {
			case <-t.closing:
				return false
			default:
				return true
			}
		}
		select {
		case <-resume:
		case <-t.closing:
			return false
		}
	}
}

func (t *throttle) track(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	select {
	case <-t.closing:
		c.Close()
		return false
	default:
	}
	t.open[c] = struct{}{}
	return true
}

func (t *throttle) untrack(c net.Conn) {
	t.mu.Lock()
	delete(t.open, c)
	t.mu.Unlock()
	c.Close()
}

func (t *throttle) serve() {
	defer t.wg.Done()
	for {
		c, err := t.ln.Accept()
		if err != nil {
			return
		}
		t.accepted.Add(1)
		if !t.track(c) {
			return
		}
		t.wg.Add(1)
		go t.handle(c)
	}
}

func (t *throttle) handle(client net.Conn) {
	defer t.wg.Done()
	defer t.untrack(client)
	if !t.wait() {
		return
	}
	up, err := net.Dial("tcp", t.target)
	if err != nil {
		return
	}
	if !t.track(up) {
		return
	}
	defer t.untrack(up)
	done := make(chan bool, 2)
	go func() { done <- t.pipe(up, client, nil) }()
	go func() { done <- t.pipe(client, up, &t.lim) }()
	// A clean EOF travels on as a half-close; anything else breaks the pair,
	// as it would a real connection.
	if !<-done {
		client.Close()
		up.Close()
	}
	<-done
}

// pipe copies src to dst, pacing by lim when given (the upstream's
// direction). It reports whether src ended with a clean EOF.
func (t *throttle) pipe(dst, src net.Conn, lim *limiter) bool {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if lim != nil {
				lim.wait(n)
			}
			if !t.wait() {
				return false
			}
			w, werr := dst.Write(buf[:n])
			if lim != nil {
				t.sent.Add(int64(w))
			}
			if werr != nil {
				return false
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				if tc, ok := dst.(*net.TCPConn); ok {
					return tc.CloseWrite() == nil
				}
			}
			return false
		}
	}
}

// limiter paces one shared link: each chunk books the next free slot of
// len/rate seconds and its sender sleeps until that slot ends. Booking from
// the link's clock rather than from wall time after each sleep keeps the
// average exact despite coarse sleeps.
type limiter struct {
	mu   sync.Mutex
	rate float64 // bytes per second; 0 means unlimited
	free time.Time
}

// burst is how far behind wall time the link's clock may fall, i.e. how much
// an idle link may send at once.
const burst = 5 * time.Millisecond

func (l *limiter) setRate(bps int64) {
	l.mu.Lock()
	l.rate = float64(bps)
	l.free = time.Time{}
	l.mu.Unlock()
}

func (l *limiter) wait(n int) {
	l.mu.Lock()
	if l.rate <= 0 {
		l.mu.Unlock()
		return
	}
	now := time.Now()
	if l.free.Before(now.Add(-burst)) {
		l.free = now.Add(-burst)
	}
	l.free = l.free.Add(time.Duration(float64(n) / l.rate * float64(time.Second)))
	end := l.free
	l.mu.Unlock()
	if d := time.Until(end); d > 0 {
		time.Sleep(d)
	}
}

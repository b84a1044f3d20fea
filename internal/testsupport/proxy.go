package testsupport

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Proxy is a TCP proxy in front of an upstream, the one both the e2e tests
// and the benchmark put between berth and its registry. It counts the bytes
// the upstream sent, which is how "upstream bytes ÷ image bytes" is measured;
// it can limit what the upstream sends to a rate shared by every connection,
// as a site's internet uplink would; and it can hang: accept connections and
// forward nothing, as a stuck registry does.
type Proxy struct {
	Addr   string // 127.0.0.1:PORT to give clients instead of Target
	URL    string // http://Addr
	Target string

	ln         net.Listener
	fromTarget atomic.Int64
	toTarget   atomic.Int64
	accepted   atomic.Int64

	lim limiter

	mu      sync.Mutex
	hung    bool
	resume  chan struct{} // closed when a hang ends
	closing chan struct{}
	open    map[net.Conn]struct{}
	wg      sync.WaitGroup
}

// NewProxy listens on a free loopback port and forwards every connection to
// target (host:port), limiting what target sends to rate bytes per second
// (0: unlimited). The caller must Close it.
func NewProxy(target string, rate int64) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{
		Addr:    ln.Addr().String(),
		URL:     "http://" + ln.Addr().String(),
		Target:  target,
		ln:      ln,
		closing: make(chan struct{}),
		open:    map[net.Conn]struct{}{},
	}
	p.lim.setRate(rate)
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// UpstreamBytes is the number of bytes the upstream sent to clients.
func (p *Proxy) UpstreamBytes() int64 { return p.fromTarget.Load() }

// ClientBytes is the number of bytes clients sent to the upstream.
func (p *Proxy) ClientBytes() int64 { return p.toTarget.Load() }

// Connections is the number of connections accepted.
func (p *Proxy) Connections() int64 { return p.accepted.Load() }

// Reset zeroes the counters, e.g. after seeding a cache.
func (p *Proxy) Reset() {
	p.fromTarget.Store(0)
	p.toTarget.Store(0)
	p.accepted.Store(0)
}

// SetRate changes the limit on what the upstream sends, in bytes per second
// across all connections; 0 lifts it.
func (p *Proxy) SetRate(bps int64) { p.lim.setRate(bps) }

// Hang makes the upstream look stuck: new connections are accepted but get
// no answer, and open ones stop forwarding in both directions, until Resume.
// Nothing is closed, so clients see a registry that takes their request and
// never answers.
func (p *Proxy) Hang() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.hung {
		p.hung = true
		p.resume = make(chan struct{})
	}
}

// Resume ends a Hang; held data then flows on.
func (p *Proxy) Resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.hung {
		p.hung = false
		close(p.resume)
	}
}

// DropConnections closes every open connection, as an upstream that resets
// them would.
func (p *Proxy) DropConnections() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.open {
		c.Close()
	}
}

// Close stops listening, drops all connections and waits for the goroutines.
// It may be called more than once.
func (p *Proxy) Close() {
	p.mu.Lock()
	select {
	case <-p.closing:
		p.mu.Unlock()
		return
	default:
	}
	close(p.closing)
	p.ln.Close()
	for c := range p.open {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// wait blocks while the proxy hangs; false means the proxy is closing.
func (p *Proxy) wait() bool {
	for {
		p.mu.Lock()
		hung, resume := p.hung, p.resume
		p.mu.Unlock()
		if !hung {
			select {
			case <-p.closing:
				return false
			default:
				return true
			}
		}
		select {
		case <-resume:
		case <-p.closing:
			return false
		}
	}
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.closing:
		c.Close()
		return false
	default:
	}
	p.open[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.open, c)
	p.mu.Unlock()
	c.Close()
}

func (p *Proxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.accepted.Add(1)
		if !p.track(c) {
			return
		}
		p.wg.Add(1)
		go p.handle(c)
	}
}

func (p *Proxy) handle(client net.Conn) {
	defer p.wg.Done()
	defer p.untrack(client)
	if !p.wait() {
		return
	}
	upstream, err := net.Dial("tcp", p.Target)
	if err != nil {
		return
	}
	if !p.track(upstream) {
		return
	}
	defer p.untrack(upstream)
	done := make(chan bool, 2)
	go func() { done <- p.pipe(upstream, client, &p.toTarget, nil) }()
	go func() { done <- p.pipe(client, upstream, &p.fromTarget, &p.lim) }()
	// A clean EOF is passed on as a half-close and the other direction may
	// go on; anything else breaks the pair, as it would a real connection.
	if !<-done {
		client.Close()
		upstream.Close()
	}
	<-done
}

// pipe copies src to dst, counting what was delivered, pacing by lim when
// given (the upstream's direction), and holds each chunk while the proxy
// hangs. It reports whether src ended with a clean EOF.
func (p *Proxy) pipe(dst, src net.Conn, counter *atomic.Int64, lim *limiter) bool {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if lim != nil {
				lim.wait(n)
			}
			if !p.wait() {
				return false
			}
			w, werr := dst.Write(buf[:n])
			counter.Add(int64(w))
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

package e2e

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// Proxy is a TCP proxy in front of an upstream. It counts the bytes the
// upstream sent, which is how tests measure "upstream bytes ÷ image bytes",
// and it can hang: accept connections and forward nothing, as a stuck
// registry does.
type Proxy struct {
	Addr   string // 127.0.0.1:PORT to give clients instead of Target
	URL    string // http://Addr
	Target string

	ln         net.Listener
	fromTarget atomic.Int64
	toTarget   atomic.Int64
	accepted   atomic.Int64

	mu      sync.Mutex
	hung    bool
	resume  chan struct{} // closed when a hang ends
	closing chan struct{}
	open    map[net.Conn]struct{}
	wg      sync.WaitGroup
}

// StartProxy listens on a free loopback port and forwards every connection
// to target (host:port). It is closed at cleanup.
func StartProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("proxy listen: %v", err)
	}
	p := &Proxy{
		Addr:    ln.Addr().String(),
		URL:     "http://" + ln.Addr().String(),
		Target:  target,
		ln:      ln,
		closing: make(chan struct{}),
		open:    map[net.Conn]struct{}{},
	}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(p.Close)
	return p
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

// Hang makes the upstream look stuck: new connections are accepted but get
// no answer, and open ones stop forwarding in both directions, until Resume.
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
	go func() { done <- p.pipe(upstream, client, &p.toTarget) }()
	go func() { done <- p.pipe(client, upstream, &p.fromTarget) }()
	// A clean EOF is passed on as a half-close and the other direction may
	// go on; anything else breaks the pair, as it would a real connection.
	if !<-done {
		client.Close()
		upstream.Close()
	}
	<-done
}

// pipe copies src to dst, counting what was delivered, and holds each chunk
// while the proxy hangs. It reports whether src ended with a clean EOF.
func (p *Proxy) pipe(dst, src net.Conn, counter *atomic.Int64) bool {
	buf := make([]byte, 32*1024)
	for {
		n, err := src.Read(buf)
		if n > 0 {
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

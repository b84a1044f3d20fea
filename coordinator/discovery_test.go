package coordinator

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// dnsServer answers SRV and A records for a headless Service on loopback.
func dnsServer(t *testing.T, srv map[string][]dns.SRV, a map[string][]string) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		q := r.Question[0]
		switch q.Qtype {
		case dns.TypeSRV:
			for _, s := range srv[q.Name] {
				s := s
				s.Hdr = dns.RR_Header{Name: q.Name, Rrtype: dns.TypeSRV, Class: dns.ClassINET, Ttl: 5}
				m.Answer = append(m.Answer, &s)
			}
		case dns.TypeA:
			for _, ip := range a[q.Name] {
				m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5}, A: net.ParseIP(ip)})
			}
		}
		if len(m.Answer) == 0 && q.Qtype != dns.TypeAAAA {
			m.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(m)
	})
	s := &dns.Server{PacketConn: pc, Handler: h}
	go s.ActivateAndServe()
	t.Cleanup(func() { s.Shutdown() })
	return pc.LocalAddr().String()
}

func resolverFor(addr string) *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}
}

func TestDiscovery(t *testing.T) {
	name := "_fleet._tcp.berth.berth.svc.cluster.local."
	addr := dnsServer(t,
		map[string][]dns.SRV{name: {{Target: "10-0-3-7.berth.berth.svc.cluster.local.", Port: 5001}, {Target: "10-0-3-8.berth.berth.svc.cluster.local.", Port: 5001}}},
		map[string][]string{"berth.berth.svc.cluster.local.": {"10.0.3.7", "10.0.3.8"}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	got, err := Discovery{DNSName: name, Resolver: resolverFor(addr)}.Nodes(ctx)
	want := []string{"http://10-0-3-7.berth.berth.svc.cluster.local:5001", "http://10-0-3-8.berth.berth.svc.cluster.local:5001"}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("SRV: %q %v, want %q", got, err, want)
	}
	got, err = Discovery{DNSName: "berth.berth.svc.cluster.local", Port: 5001, Scheme: "https", Resolver: resolverFor(addr)}.Nodes(ctx)
	want = []string{"https://10.0.3.7:5001", "https://10.0.3.8:5001"}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("A: %q %v, want %q", got, err, want)
	}
	if _, err := (Discovery{DNSName: "nothing.example.", Resolver: resolverFor(addr)}).Nodes(ctx); err == nil {
		t.Error("a name without SRV records gave nodes")
	}

	file := filepath.Join(t.TempDir(), "nodes")
	os.WriteFile(file, []byte("# nodes\nhttp://10.0.0.1:5001\n10.0.0.2:5001\n\nhttp://10.0.0.1:5001\n"), 0o644)
	got, err = Discovery{File: file, Static: []string{"https://n3:5001/"}}.Nodes(ctx)
	want = []string{"http://10.0.0.1:5001", "http://10.0.0.2:5001", "https://n3:5001"}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("file and list: %q %v, want %q", got, err, want)
	}
	os.WriteFile(file, []byte("ftp://x\n"), 0o644)
	if _, err := (Discovery{File: file}).Nodes(ctx); err == nil {
		t.Error("a bad URL in the nodes file was taken")
	}
}

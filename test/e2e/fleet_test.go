package e2e

// The fleet: several berth hosts (own ports, own data directories) share one
// MinIO bucket in front of one upstream registry. These tests check that a
// blob crosses from the upstream once for the whole fleet, and that killed
// hosts, an S3 outage and damaged objects cost at most extra fetches, never
// a failed pull or wrong bytes.

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/berth-dev/berth/internal/testsupport"
)

// fleetUpstream is the upstream as the fleet sees it: an HTTP proxy in front
// of the registry that notes every request berth makes, so tests count
// fetches per blob and per tag, and that can slow large responses down so a
// host can be killed in the middle of a download.
type fleetUpstream struct {
	URL string

	rate atomic.Int64 // bytes/s for responses of slowFrom bytes or more; 0: full speed

	mu   sync.Mutex
	reqs []*upstreamReq
}

// slowFrom: only blob bodies this large are slowed, so manifests and configs
// stay quick while a layer download takes seconds.
const slowFrom = 1 << 20

type upstreamReq struct {
	Method string
	Path   string
	Start  time.Time
	sent   atomic.Int64 // body bytes passed to berth so far
}

type reqKey struct{}

func startFleetUpstream(t *testing.T, target string) *fleetUpstream {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	up := &fleetUpstream{}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1 // pass bytes on as they come, as a real link would
	rp.ErrorLog = nil
	rp.ModifyResponse = func(resp *http.Response) error {
		if r, ok := resp.Request.Context().Value(reqKey{}).(*upstreamReq); ok {
			resp.Body = &meteredBody{rc: resp.Body, req: r, up: up, large: resp.ContentLength >= slowFrom}
		}
		return nil
	}
	up.URL = "http://" + testsupport.ServeLoopback(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Noted on arrival, so a fetch by a host killed halfway still counts.
		rec := &upstreamReq{Method: r.Method, Path: r.URL.Path, Start: time.Now()}
		up.mu.Lock()
		up.reqs = append(up.reqs, rec)
		up.mu.Unlock()
		rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), reqKey{}, rec)))
	}))
	return up
}

type meteredBody struct {
	rc    io.ReadCloser
	req   *upstreamReq
	up    *fleetUpstream
	large bool
}

func (b *meteredBody) Read(p []byte) (int, error) {
	rate := b.up.rate.Load()
	slow := rate > 0 && b.large
	if chunk := int(rate / 20); slow && len(p) > chunk {
		p = p[:chunk]
	}
	n, err := b.rc.Read(p)
	b.req.sent.Add(int64(n))
	if slow && n > 0 {
		time.Sleep(time.Duration(int64(n) * int64(time.Second) / rate))
	}
	return n, err
}

func (b *meteredBody) Close() error { return b.rc.Close() }

func (u *fleetUpstream) requests() []*upstreamReq {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]*upstreamReq(nil), u.reqs...)
}

// blobGETs lists the GETs of one blob.
func (u *fleetUpstream) blobGETs(dgst string) []*upstreamReq {
	var out []*upstreamReq
	for _, r := range u.requests() {
		if r.Method == http.MethodGet && strings.HasSuffix(r.Path, "/blobs/"+dgst) {
			out = append(out, r)
		}
	}
	return out
}

// manifestRequests lists the HEADs and GETs of repo's manifest ref.
func (u *fleetUpstream) manifestRequests(repo, ref string) []*upstreamReq {
	var out []*upstreamReq
	for _, r := range u.requests() {
		if r.Path == "/v2/"+repo+"/manifests/"+ref {
			out = append(out, r)
		}
	}
	return out
}

// checkBlobGETs fails the test unless each blob was fetched from the
// upstream exactly want times.
func (u *fleetUpstream) checkBlobGETs(t *testing.T, what string, blobs []Blob, want int) {
	t.Helper()
	for _, b := range blobs {
		if got := len(u.blobGETs(b.Digest)); got != want {
			t.Errorf("%s: blob %s (%d bytes) fetched from the upstream %d times, want %d", what, b.Digest, b.Size, got, want)
		}
	}
}

// fleet is one upstream registry and one bucket that hosts are started on.
type fleet struct {
	reg    *Registry
	up     *fleetUpstream
	bucket *FleetBucket
}

func startFleet(t *testing.T) *fleet {
	t.Helper()
	testsupport.RequireTool(t, "registry")
	testsupport.RequireTool(t, "minio")
	reg := StartRegistry(t)
	return &fleet{reg: reg, up: startFleetUpstream(t, reg.URL), bucket: StartFleetBucket(t)}
}

// host starts a berth on the fleet's bucket with data in dir (a new one if
// empty). docker.io is the upstream, so blobs are keyed docker.io in S3.
func (f *fleet) host(t *testing.T, dir string, extra ...string) *Berth {
	t.Helper()
	args := []string{"--upstream", "docker.io=" + f.up.URL, "--log-level", "debug"}
	if dir != "" {
		args = append(args, "--data", dir)
	}
	args = append(args, f.bucket.Args()...)
	return StartBerth(t, append(args, extra...)...)
}

func (f *fleet) hosts(t *testing.T, n int, extra ...string) []*Berth {
	t.Helper()
	hs := make([]*Berth, n)
	for i := range hs {
		hs[i] = f.host(t, "", extra...)
	}
	return hs
}

// pullImage pulls host/repo:tag as a client would, with go-containerregistry,
// and checks the manifest digest and every blob's digest and size itself.
func pullImage(ctx context.Context, host, repo, tag string, want *PushedImage) error {
	ref, err := name.ParseReference(host+"/"+repo+":"+tag, name.Insecure)
	if err != nil {
		return err
	}
	img, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	if d, err := img.Digest(); err != nil || d.String() != want.Digest {
		return fmt.Errorf("pull %s: manifest digest %v (%v), want %s", ref, d, err, want.Digest)
	}
	raw, err := img.RawConfigFile()
	if err != nil {
		return fmt.Errorf("pull %s: config: %w", ref, err)
	}
	if got := sha256Hex(raw); got != want.Config.Digest {
		return fmt.Errorf("pull %s: config hashes to %s, want %s", ref, got, want.Config.Digest)
	}
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("pull %s: layers: %w", ref, err)
	}
	if len(layers) != len(want.Layers) {
		return fmt.Errorf("pull %s: %d layers, want %d", ref, len(layers), len(want.Layers))
	}
	errs := make(chan error, len(layers))
	for i, l := range layers {
		go func() {
			rc, err := l.Compressed()
			if err != nil {
				errs <- fmt.Errorf("pull %s: layer %d: %w", ref, i, err)
				return
			}
			defer rc.Close()
			h := sha256.New()
			n, err := io.Copy(h, rc)
			switch {
			case err != nil:
				err = fmt.Errorf("pull %s: layer %s: %w", ref, want.Layers[i].Digest, err)
			case "sha256:"+hex.EncodeToString(h.Sum(nil)) != want.Layers[i].Digest || n != want.Layers[i].Size:
				err = fmt.Errorf("pull %s: layer %d is %d bytes hashing to sha256:%x, want %+v", ref, i, n, h.Sum(nil), want.Layers[i])
			}
			errs <- err
		}()
	}
	for range layers {
		if err := <-errs; err != nil {
			return err
		}
	}
	return nil
}

func mustPull(t *testing.T, b *Berth, repo, tag string, want *PushedImage) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	if err := pullImage(ctx, b.Host, repo, tag, want); err != nil {
		t.Fatalf("through %s: %v", b.Host, err)
	}
}

// pullAtOnce pulls the image n times concurrently through b.
func pullAtOnce(t *testing.T, b *Berth, repo, tag string, want *PushedImage, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	errs := make(chan error, n)
	for range n {
		go func() { errs <- pullImage(ctx, b.Host, repo, tag, want) }()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatalf("through %s: %v", b.Host, err)
		}
	}
}

// describe lists requests for messages.
func describe(reqs []*upstreamReq) string {
	var parts []string
	for _, r := range reqs {
		parts = append(parts, fmt.Sprintf("%s %s at %s", r.Method, r.Path, r.Start.Format("15:04:05.000")))
	}
	return strings.Join(parts, "; ")
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// getBlob GETs a blob from a host the way a registry client does and
// reports what came back: the body, whether it was as long as announced,
// and any transport error.
func getBlob(ctx context.Context, b *Berth, repo, dgst string) (body []byte, complete bool, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.URL+"/v2/"+repo+"/blobs/"+dgst, nil)
	if err != nil {
		return nil, false, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, false, err
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return body, false, fmt.Errorf("GET %s: status %d: %s", req.URL, resp.StatusCode, body)
	}
	return body, err == nil && int64(len(body)) == resp.ContentLength, err
}

// hostBlobs checks that a host keeps every blob on its own disk.
func hostBlobs(t *testing.T, b *Berth, blobs []Blob) {
	t.Helper()
	for _, blob := range blobs {
		alg, hexDigest, _ := strings.Cut(blob.Digest, ":")
		verifyFile(t, filepath.Join(b.Data, "blobs", "docker.io", alg, hexDigest), blob)
	}
}

// metric sums the samples of a counter or gauge whose labels include every
// name="value" pair given.
func metric(t *testing.T, b *Berth, family string, labels ...string) float64 {
	t.Helper()
	_, text := fetch(t, b, "/metrics")
	sum := 0.0
	for _, line := range strings.Split(string(text), "\n") {
		if !strings.HasPrefix(line, family) || len(line) == len(family) || (line[len(family)] != '{' && line[len(family)] != ' ') {
			continue
		}
		series, value, ok := cutLast(line, " ")
		if !ok {
			continue
		}
		match := true
		for i := 0; i+1 < len(labels); i += 2 {
			match = match && strings.Contains(series, labels[i]+`="`+labels[i+1]+`"`)
		}
		if !match {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			t.Fatalf("%s /metrics: %q: %v", b.Host, line, err)
		}
		sum += v
	}
	return sum
}

// servedFrom waits until a host has counted at least want bytes served from
// source, and returns its count: berth adds a response's bytes once the
// handler returns, which may be just after the client has read them all.
func servedFrom(t *testing.T, b *Berth, source string, want int64) int64 {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := int64(metric(t, b, "berth_bytes_served_total", "source", source))
		if n >= want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func cutLast(s, sep string) (string, string, bool) {
	i := strings.LastIndex(s, sep)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+len(sep):], true
}

// blobBytes is the size of an image's config and layers.
func blobBytes(img *PushedImage) int64 {
	var n int64
	for _, b := range img.Blobs() {
		n += b.Size
	}
	return n
}

// statusReport is what /status says, as far as these tests care.
type statusReport struct {
	Status string `json:"status"`
	Ready  bool   `json:"ready"`
	Checks []struct {
		Name   string `json:"name"`
		Status string `json:"status"`
		Error  string `json:"error"`
	} `json:"checks"`
}

func status(t *testing.T, b *Berth) (code int, rep statusReport) {
	t.Helper()
	code, body := fetch(t, b, "/status")
	if err := json.Unmarshal(body, &rep); err != nil {
		t.Fatalf("%s /status: %v: %s", b.Host, err, body)
	}
	return code, rep
}

// fetch GETs one of a host's own endpoints.
func fetch(t *testing.T, b *Berth, path string) (int, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, b.URL+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", b.Host, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: %v", b.Host, path, err)
	}
	return resp.StatusCode, body
}

// waitS3Check waits until /status shows the s3 check in state want and
// returns the report.
func waitS3Check(t *testing.T, b *Berth, want string, timeout time.Duration) statusReport {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		_, rep := status(t, b)
		for _, c := range rep.Checks {
			if c.Name == "s3" && c.Status == want {
				return rep
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: /status did not show the s3 check %s within %v: %+v", b.Host, want, timeout, rep)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestFleetConcurrentColdPull: three hosts pull one image at the same moment,
// two clients each. The upstream sees one GET per blob for the whole fleet,
// and every host keeps every blob on its own disk.
func TestFleetConcurrentColdPull(t *testing.T) {
	f := startFleet(t)
	img := PushImage(t, Docker, f.reg.Host, "library/fleet", "1", 4<<20, 3)
	hosts := f.hosts(t, 3, "--tag-ttl", "5m")

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(hosts))
	gate := make(chan struct{})
	for _, h := range hosts {
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-gate
				errs <- pullImage(ctx, h.Host, "library/fleet", "1", img)
			}()
		}
	}
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	t.Logf("6 concurrent cold pulls of %d bytes through 3 hosts took %v", img.Bytes(), time.Since(start))
	if t.Failed() {
		return
	}

	f.up.checkBlobGETs(t, "concurrent cold pulls", img.Blobs(), 1)
	if got := f.up.manifestRequests("library/fleet", "1"); len(got) != 1 {
		t.Errorf("the fleet asked the upstream about library/fleet:1 %d times, want once: %s", len(got), describe(got))
	}
	var upstreamBytes, fromS3, avoided, blobLeases, tagLeases float64
	for _, h := range hosts {
		hostBlobs(t, h, img.Blobs())
		upstreamBytes += metric(t, h, "berth_upstream_bytes_total")
		fromS3 += metric(t, h, "berth_bytes_served_total", "source", "s3")
		avoided += metric(t, h, "berth_fleet_upstream_fetches_avoided_total", "kind", "blob")
		blobLeases += metric(t, h, "berth_leases_total", "kind", "blob", "event", "taken")
		tagLeases += metric(t, h, "berth_leases_total", "kind", "tag", "event", "taken")
	}
	t.Logf("fleet metrics: upstream bytes %.0f (image blobs %d), served from s3 %.0f, blob fetches avoided %.0f, leases taken: %.0f blob, %.0f tag",
		upstreamBytes, blobBytes(img), fromS3, avoided, blobLeases, tagLeases)
	if int(blobLeases) != len(img.Blobs()) || tagLeases != 1 {
		t.Errorf("the fleet took %.0f blob leases and %.0f tag leases, want one per blob (%d) and one for the tag", blobLeases, tagLeases, len(img.Blobs()))
	}
	if int64(upstreamBytes) != blobBytes(img) {
		t.Errorf("berth_upstream_bytes_total summed over the fleet is %.0f, want the image's %d blob bytes", upstreamBytes, blobBytes(img))
	}
	// Two of the three hosts got each blob from the bucket.
	if want := float64(2 * len(img.Blobs())); avoided != want {
		t.Errorf("berth_fleet_upstream_fetches_avoided_total{kind=blob} summed over the fleet is %.0f, want %.0f", avoided, want)
	}
	if n := f.bucket.VerifyBlobs(t); n != len(img.Blobs()) {
		t.Errorf("the bucket holds %d blobs, want %d", n, len(img.Blobs()))
	}
}

// fetchingFor has h GET layer, a cold blob, and waits until h holds the
// layer's fleet lease and has 512 KiB of it from the upstream: h is then
// the host fetching it for the fleet, partway through. The GET's result
// comes on done.
func (f *fleet) fetchingFor(ctx context.Context, t *testing.T, h *Berth, repo string, layer Blob) (done <-chan error, leaseKey string) {
	t.Helper()
	got := make(chan error, 1)
	go func() {
		_, _, err := getBlob(ctx, h, repo, layer.Digest)
		got <- err
	}()
	leaseKey = f.bucket.BlobLeaseKey("docker.io", layer.Digest)
	testsupport.Eventually(t, "the host to take the layer's lease and start fetching it", 15*time.Second, func() bool {
		gets := f.up.blobGETs(layer.Digest)
		return len(gets) == 1 && gets[0].sent.Load() >= 512<<10 && f.bucket.Exists(t, leaseKey)
	})
	return got, leaseKey
}

// TestFleetLeaseHolderKilled: the host fetching a layer for the fleet is
// killed halfway. The hosts waiting on its lease take it over once it
// expires, the pulls through them succeed, and the bucket holds nothing
// wrong. The killed host, restarted on its data, gets the layer from S3.
func TestFleetLeaseHolderKilled(t *testing.T) {
	f := startFleet(t)
	img := PushImage(t, Docker, f.reg.Host, "library/killed", "1", 4<<20, 1)
	layer := img.Layers[0]
	const leaseTTL = 3 * time.Second
	hosts := f.hosts(t, 3, "--tag-ttl", "5m", "--s3-lease-ttl", leaseTTL.String())
	a, b, c := hosts[0], hosts[1], hosts[2]
	f.up.rate.Store(1 << 20) // the 4 MiB layer takes 4s per fetch

	ctx, cancel := context.WithTimeout(context.Background(), 55*time.Second)
	defer cancel()
	aDone, leaseKey := f.fetchingFor(ctx, t, a, "library/killed", layer)

	// B and C miss too and wait on A's lease, as the rest of a fleet would.
	pulls := make(chan error, 2)
	for _, h := range []*Berth{b, c} {
		go func() { pulls <- pullImage(ctx, h.Host, "library/killed", "1", img) }()
	}
	deadline := time.Now().Add(15 * time.Second)
	for metric(t, b, "berth_leases_total", "kind", "blob", "event", "waited") < 1 ||
		metric(t, c, "berth_leases_total", "kind", "blob", "event", "waited") < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("hosts B and C did not wait on A's lease within 15s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n := len(f.up.blobGETs(layer.Digest)); n != 1 {
		t.Fatalf("while A held the lease the layer was fetched %d times", n)
	}

	sentAtKill := f.up.blobGETs(layer.Digest)[0].sent.Load()
	killed := time.Now()
	if err := a.Cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-a.Exited()
	if err := <-aDone; err == nil {
		t.Errorf("the pull through the killed host A reported success")
	}
	t.Logf("killed host A holding the lease after %d of %d bytes", sentAtKill, layer.Size)
	if !f.bucket.Exists(t, leaseKey) {
		t.Errorf("the killed host's lease is gone at once; nothing kept the fleet from fetching twice")
	}

	for range 2 {
		if err := <-pulls; err != nil {
			t.Error(err)
		}
	}
	t.Logf("pulls through B and C finished %v after the kill", time.Since(killed))
	if t.Failed() {
		return
	}
	gets := f.up.blobGETs(layer.Digest)
	if len(gets) != 2 {
		t.Errorf("the layer was fetched from the upstream %d times, want 2 (A's cut-short fetch, then one for the fleet)", len(gets))
	}
	// Taking over is allowed only once A's lease has run out: its last
	// renewal was at most TTL/3 before the kill.
	for _, g := range gets[1:] {
		if after := g.Start.Sub(killed); after < leaseTTL-leaseTTL/3 {
			t.Errorf("the layer was fetched again %v after the kill, before A's %v lease could expire", after, leaseTTL)
		}
	}
	takenOver := metric(t, b, "berth_leases_total", "kind", "blob", "event", "taken_over") +
		metric(t, c, "berth_leases_total", "kind", "blob", "event", "taken_over")
	if takenOver != 1 {
		t.Errorf("berth_leases_total{kind=blob,event=taken_over} over B and C is %.0f, want 1", takenOver)
	}
	hostBlobs(t, b, img.Blobs())
	hostBlobs(t, c, img.Blobs())
	f.bucket.WaitBlobs(t, "docker.io", img.Blobs(), 10*time.Second)
	f.bucket.VerifyBlobs(t)
	deadline = time.Now().Add(10 * time.Second)
	for f.bucket.Exists(t, leaseKey) {
		if time.Now().After(deadline) {
			t.Fatalf("the layer's lease is still in the bucket 10s after the fleet finished")
		}
		time.Sleep(100 * time.Millisecond)
	}

	// A comes back on its data directory, where the half-written layer was
	// left: it serves the image from S3 and fetches nothing more.
	f.up.rate.Store(0)
	before := len(f.up.requests())
	a2 := f.host(t, a.Data, "--tag-ttl", "5m", "--s3-lease-ttl", leaseTTL.String())
	mustPull(t, a2, "library/killed", "1", img)
	f.up.checkBlobGETs(t, "after A restarted", img.Blobs()[1:], 2)
	f.up.checkBlobGETs(t, "after A restarted", img.Blobs()[:1], 1)
	if s3 := servedFrom(t, a2, "s3", layer.Size); s3 < layer.Size {
		t.Errorf("restarted A served %d bytes from S3, want at least the layer's %d", s3, layer.Size)
	}
	// The fleet's tag record is fresh, so A does not even ask about the tag.
	for _, r := range f.up.requests()[before:] {
		if strings.Contains(r.Path, "/library/killed/") {
			t.Errorf("restarted A asked the upstream: %s", describe([]*upstreamReq{r}))
		}
	}
	hostBlobs(t, a2, img.Blobs())
}

// TestFleetS3Outage: MinIO is killed mid-test and started again on its port
// and data. Pulls keep working throughout and go straight to the upstream,
// readiness stays green while /status reports the tier degraded, and once
// S3 is back the hosts share through it again without a restart.
func TestFleetS3Outage(t *testing.T) {
	f := startFleet(t)
	first := PushImage(t, Docker, f.reg.Host, "library/before", "1", 1<<20, 2)
	during := PushImage(t, Docker, f.reg.Host, "library/during", "1", 1<<20, 2)
	after := PushImage(t, Docker, f.reg.Host, "library/after", "1", 1<<20, 2)
	hosts := f.hosts(t, 2, "--tag-ttl", "5m")
	a, b := hosts[0], hosts[1]

	// Readiness is watched the whole time.
	stopWatch := make(chan struct{})
	watched := make(chan []string, 1)
	go func() {
		var bad []string
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			for _, h := range hosts {
				if code := httpStatus(context.Background(), h.URL+"/readyz"); code != 200 {
					bad = append(bad, fmt.Sprintf("%s /readyz %d at %s", h.Host, code, time.Now().Format(time.StampMilli)))
				}
			}
			select {
			case <-stopWatch:
				watched <- bad
				return
			case <-tick.C:
			}
		}
	}()

	mustPull(t, a, "library/before", "1", first)
	f.bucket.WaitBlobs(t, "docker.io", first.Blobs(), 10*time.Second)

	f.bucket.MinIO.Stop(t)
	down := time.Now()
	mustPull(t, a, "library/during", "1", during)
	mustPull(t, b, "library/during", "1", during)
	mustPull(t, b, "library/before", "1", first)
	mustPull(t, a, "library/before", "1", first)
	t.Logf("four pulls with S3 down took %v", time.Since(down))
	// Without the bucket each host fetched for itself.
	f.up.checkBlobGETs(t, "pulls of a new image with S3 down", during.Blobs(), 2)
	f.up.checkBlobGETs(t, "pull of a shared image with S3 down", first.Blobs(), 2)
	for _, h := range hosts {
		if n := metric(t, h, "berth_s3_degraded_total"); n < 1 {
			t.Errorf("%s: berth_s3_degraded_total is %.0f with S3 down", h.Host, n)
		}
		if n := metric(t, h, "berth_s3_errors_total"); n < 1 {
			t.Errorf("%s: berth_s3_errors_total is %.0f with S3 down", h.Host, n)
		}
		rep := waitS3Check(t, h, "degraded", 25*time.Second)
		if rep.Status != "degraded" || !rep.Ready {
			t.Errorf("%s: /status with S3 down is %q ready=%v, want degraded and ready", h.Host, rep.Status, rep.Ready)
		}
		if code, _ := status(t, h); code != 200 {
			t.Errorf("%s: /status answers %d with only S3 down, want 200", h.Host, code)
		}
	}
	t.Logf("/status showed S3 degraded on both hosts %v after MinIO stopped", time.Since(down))

	f.bucket.MinIO.Start(t)
	up := time.Now()
	for _, h := range hosts {
		waitS3Check(t, h, "ok", 25*time.Second)
	}
	t.Logf("/status showed S3 ok on both hosts %v after MinIO started", time.Since(up))
	mustPull(t, a, "library/after", "1", after)
	f.bucket.WaitBlobs(t, "docker.io", after.Blobs(), 10*time.Second)
	s3Before := servedFrom(t, b, "s3", 0)
	mustPull(t, b, "library/after", "1", after)
	f.up.checkBlobGETs(t, "pulls after S3 came back", after.Blobs(), 1)
	if got := servedFrom(t, b, "s3", s3Before+blobBytes(after)) - s3Before; got < blobBytes(after) {
		t.Errorf("after S3 came back, B served %d bytes from S3, want the image's %d", got, blobBytes(after))
	}

	close(stopWatch)
	for _, bad := range <-watched {
		t.Errorf("readiness went red: %s", bad)
	}
	f.bucket.VerifyBlobs(t)
}

// TestFleetCorruptObject: blobs in the bucket are overwritten with wrong
// bytes and with a truncated copy. A host that misses locally never hands a
// client a complete wrong body, deletes the object, fetches the blob again
// and leaves the right content in the bucket.
func TestFleetCorruptObject(t *testing.T) {
	f := startFleet(t)
	img := PushImage(t, Docker, f.reg.Host, "library/corrupt", "1", 1<<20, 2)
	hosts := f.hosts(t, 2, "--tag-ttl", "5m")
	a, b := hosts[0], hosts[1]
	mustPull(t, a, "library/corrupt", "1", img)
	f.bucket.WaitBlobs(t, "docker.io", img.Blobs(), 10*time.Second)

	wrong := make([]byte, img.Layers[0].Size)
	rand.Read(wrong)
	f.bucket.Put(t, f.bucket.BlobKey("docker.io", img.Layers[0].Digest), wrong)
	good := f.bucket.Get(t, f.bucket.BlobKey("docker.io", img.Layers[1].Digest))
	f.bucket.Put(t, f.bucket.BlobKey("docker.io", img.Layers[1].Digest), good[:len(good)/2])

	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	for _, layer := range img.Layers {
		attempts := 0
		for {
			attempts++
			body, complete, err := getBlob(ctx, b, "library/corrupt", layer.Digest)
			if complete {
				if got := sha256Hex(body); got != layer.Digest {
					t.Fatalf("B served a complete body for %s hashing to %s", layer.Digest, got)
				}
				break
			}
			// A cut-short answer is how a stream found corrupt at its end
			// is refused; a client retries.
			t.Logf("attempt %d for %s through B: %d bytes, incomplete (%v)", attempts, layer.Digest, len(body), err)
			if attempts == 5 {
				t.Fatalf("B did not serve %s correctly in %d attempts", layer.Digest, attempts)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	mustPull(t, b, "library/corrupt", "1", img)
	if n := metric(t, b, "berth_digest_mismatches_total", "source", "s3"); n < 2 {
		t.Errorf("B counted %.0f digest mismatches from S3, want at least 2", n)
	}
	// Each damaged layer was fetched again, once; the config was not.
	f.up.checkBlobGETs(t, "after the layers were damaged in S3", img.Layers, 2)
	f.up.checkBlobGETs(t, "after the layers were damaged in S3", img.Blobs()[:1], 1)
	hostBlobs(t, b, img.Blobs())
	f.bucket.WaitBlobs(t, "docker.io", img.Blobs(), 10*time.Second)
	// The replaced objects must hold the right bytes; waiting for them lets
	// a trailing upload land first.
	deadline := time.Now().Add(10 * time.Second)
	for {
		ok := true
		for _, l := range img.Layers {
			ok = ok && sha256Hex(f.bucket.Get(t, f.bucket.BlobKey("docker.io", l.Digest))) == l.Digest
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("10s after B refetched them the bucket still holds damaged layers")
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	f.bucket.VerifyBlobs(t)
}

// TestFleetEvictedBlobFromS3: blobs gone from a host's disk are served again
// from the bucket, not the upstream: once by removing them while the host is
// down, once by a cache too small to keep them all.
func TestFleetEvictedBlobFromS3(t *testing.T) {
	f := startFleet(t)
	img := PushImage(t, Docker, f.reg.Host, "library/evicted", "1", 2<<20, 3)

	t.Run("removed", func(t *testing.T) {
		a := f.host(t, "", "--tag-ttl", "5m")
		mustPull(t, a, "library/evicted", "1", img)
		f.bucket.WaitBlobs(t, "docker.io", img.Blobs(), 10*time.Second)
		a.Stop(t)
		dir := filepath.Join(a.Data, "blobs", "docker.io", "sha256")
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		if len(ents) != len(img.Blobs()) {
			t.Fatalf("host A kept %d blobs, want %d", len(ents), len(img.Blobs()))
		}
		for _, e := range ents {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
				t.Fatal(err)
			}
		}
		a2 := f.host(t, a.Data, "--tag-ttl", "5m")
		mustPull(t, a2, "library/evicted", "1", img)
		f.up.checkBlobGETs(t, "pull after A's blobs were removed", img.Blobs(), 1)
		if s3 := servedFrom(t, a2, "s3", blobBytes(img)); s3 != blobBytes(img) {
			t.Errorf("A served %d bytes from S3 after its blobs were removed, want %d", s3, blobBytes(img))
		}
		if up := metric(t, a2, "berth_upstream_bytes_total"); up != 0 {
			t.Errorf("A fetched %.0f blob bytes from the upstream after its blobs were removed", up)
		}
		hostBlobs(t, a2, img.Blobs())
	})

	t.Run("cache-size", func(t *testing.T) {
		// Room for about two of the three 2 MiB layers: each pull evicts.
		b := f.host(t, "", "--tag-ttl", "5m", "--cache-size", "5MiB")
		for i := range 3 {
			mustPull(t, b, "library/evicted", "1", img)
			t.Logf("pull %d: %0.f evictions, %.0f bytes from S3", i+1,
				metric(t, b, "berth_evictions_total"), metric(t, b, "berth_bytes_served_total", "source", "s3"))
		}
		if n := metric(t, b, "berth_evictions_total"); n < 1 {
			t.Fatalf("a 5MiB cache evicted nothing; the test did not exercise eviction")
		}
		f.up.checkBlobGETs(t, "pulls through a host that evicts", img.Blobs(), 1)
		if s3 := servedFrom(t, b, "s3", blobBytes(img)+1); s3 <= blobBytes(img) {
			t.Errorf("B served %d bytes from S3 over three pulls, want more than one image's %d (evicted blobs come back from S3)", s3, blobBytes(img))
		}
		if up := metric(t, b, "berth_upstream_bytes_total"); up != 0 {
			t.Errorf("B fetched %.0f blob bytes from the upstream", up)
		}
	})

	t.Run("no-room", func(t *testing.T) {
		// A cache smaller than one layer: every layer is relayed uncached,
		// from the bucket, to concurrent pulls.
		c := f.host(t, "", "--tag-ttl", "5m", "--cache-size", "1MiB")
		const pulls = 4
		pullAtOnce(t, c, "library/evicted", "1", img, pulls)
		f.up.checkBlobGETs(t, "pulls through a host with no room", img.Blobs(), 1)
		if up := metric(t, c, "berth_upstream_bytes_total"); up != 0 {
			t.Errorf("C fetched %.0f blob bytes from the upstream", up)
		}
		if n := metric(t, c, "berth_passthrough_total"); n < 3 {
			t.Errorf("C relayed %.0f blobs, want at least the 3 layers it has no room for", n)
		}
		if s3 := servedFrom(t, c, "s3", pulls*blobBytes(img)); s3 < pulls*(blobBytes(img)-img.Config.Size) {
			t.Errorf("C served %d bytes from S3, want the layers of %d pulls", s3, pulls)
		}
	})

	t.Run("no-room-first", func(t *testing.T) {
		// The first host to pull an image has no room for its layers: it
		// relays them from the upstream and still shares them through the
		// bucket, so the next host reads them from there.
		fresh := PushImage(t, Docker, f.reg.Host, "library/noroom", "1", 2<<20, 3)
		d := f.host(t, "", "--tag-ttl", "5m", "--cache-size", "1MiB")
		pullAtOnce(t, d, "library/noroom", "1", fresh, 3)
		f.up.checkBlobGETs(t, "first pulls through a host with no room", fresh.Blobs(), 1)
		f.bucket.WaitBlobs(t, "docker.io", fresh.Blobs(), 10*time.Second)
		e := f.host(t, "", "--tag-ttl", "5m")
		mustPull(t, e, "library/noroom", "1", fresh)
		f.up.checkBlobGETs(t, "the next host's pull", fresh.Blobs(), 1)
		if up := metric(t, e, "berth_upstream_bytes_total"); up != 0 {
			t.Errorf("the next host fetched %.0f blob bytes from the upstream", up)
		}
	})
	f.bucket.VerifyBlobs(t)
}

// TestFleetTagRevalidation: three hosts with a 2s tag TTL ask for a tag over
// and over. The fleet asks the upstream about it at most once per TTL, and
// when the tag moves every host follows within about a TTL.
func TestFleetTagRevalidation(t *testing.T) {
	f := startFleet(t)
	const ttl = 2 * time.Second
	one := PushImage(t, Docker, f.reg.Host, "library/tagged", "v1", 64<<10, 1)
	hosts := f.hosts(t, 3, "--tag-ttl", ttl.String())

	var pushing, moved atomic.Int64 // unix nanoseconds when the tag's move began and ended; 0: not yet
	var two atomic.Pointer[PushedImage]
	ask := func(ctx context.Context, h *Berth) (string, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, h.URL+"/v2/library/tagged/manifests/v1", nil)
		req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 {
			return "", fmt.Errorf("GET manifest through %s: %d %v %s", h.Host, resp.StatusCode, err, body)
		}
		if got := sha256Hex(body); got != resp.Header.Get("Docker-Content-Digest") {
			return "", fmt.Errorf("through %s: manifest hashes to %s, header says %s", h.Host, got, resp.Header.Get("Docker-Content-Digest"))
		}
		return sha256Hex(body), nil
	}

	const run = 11 * time.Second
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), run+20*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var problems []string
	for _, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sawNew := false
			defer func() {
				if !sawNew {
					mu.Lock()
					problems = append(problems, fmt.Sprintf("%s never served the moved tag", h.Host))
					mu.Unlock()
				}
			}()
			for time.Since(start) < run {
				asked := time.Now()
				got, err := ask(ctx, h)
				mu.Lock()
				if m := moved.Load(); m != 0 && err == nil && got == two.Load().Digest {
					sawNew = true
				}
				switch m := moved.Load(); {
				case err != nil:
					problems = append(problems, err.Error())
				case pushing.Load() == 0 && got != one.Digest:
					problems = append(problems, fmt.Sprintf("%s served %s before the tag moved", h.Host, got))
				case m != 0 && asked.After(time.Unix(0, m).Add(ttl+time.Second)) && got != two.Load().Digest:
					problems = append(problems, fmt.Sprintf("%s still served %s %v after the tag moved", h.Host, got, asked.Sub(time.Unix(0, m))))
				}
				mu.Unlock()
				time.Sleep(50 * time.Millisecond)
			}
		}()
	}
	time.Sleep(run / 2)
	pushing.Store(time.Now().UnixNano())
	img := PushImage(t, Docker, f.reg.Host, "library/tagged", "v1", 64<<10, 1)
	two.Store(img)
	moved.Store(time.Now().UnixNano())
	wg.Wait()
	for _, p := range problems {
		t.Error(p)
	}

	reqs := f.up.manifestRequests("library/tagged", "v1")
	sort.Slice(reqs, func(i, j int) bool { return reqs[i].Start.Before(reqs[j].Start) })
	var lines []string
	for i, r := range reqs {
		gap := time.Duration(0)
		if i > 0 {
			gap = r.Start.Sub(reqs[i-1].Start)
		}
		lines = append(lines, fmt.Sprintf("%s +%v (gap %v)", r.Method, r.Start.Sub(start).Round(time.Millisecond), gap.Round(time.Millisecond)))
	}
	t.Logf("upstream requests for library/tagged:v1 over %v from 3 hosts:\n  %s", run, strings.Join(lines, "\n  "))
	// One revalidation per TTL window: a request answers for the whole
	// fleet until TTL after it completed, so starts are at least TTL apart.
	// A tag that changed costs a HEAD and then a GET of the new manifest.
	for i := 1; i < len(reqs); i++ {
		prev, cur := reqs[i-1], reqs[i]
		if prev.Method == http.MethodHead && cur.Method == http.MethodGet && cur.Start.Sub(prev.Start) < time.Second {
			continue
		}
		if gap := cur.Start.Sub(prev.Start); gap < ttl {
			t.Errorf("upstream asked about the tag twice within %v: %s then %s", gap, prev.Method, cur.Method)
		}
	}
	if limit := int(run/ttl) + 3; len(reqs) > limit {
		t.Errorf("%d upstream requests for the tag in %v with a %v TTL, want at most %d", len(reqs), run, ttl, limit)
	}
	if len(reqs) < 3 {
		t.Errorf("only %d upstream requests for the tag in %v with a %v TTL: the tag was not revalidated", len(reqs), run, ttl)
	}
}

// With --s3-advertise, hosts waiting on another's blob lease stream the blob
// from the holder while it downloads: every host gets it in about one
// download's time, the upstream still sends it once, and nothing waits for
// the upload to the bucket.
func TestFleetPeerStreaming(t *testing.T) {
	f := startFleet(t)
	img := PushImage(t, Docker, f.reg.Host, "library/peer", "1", 4<<20, 1)
	hosts := f.hosts(t, 3, "--tag-ttl", "5m", "--s3-advertise", "http://{listen}")
	f.up.rate.Store(2 << 20) // the 4 MiB layer takes about 2s to come down

	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, len(hosts))
	took := make([]time.Duration, len(hosts))
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- pullImage(ctx, h.Host, "library/peer", "1", img)
			took[i] = time.Since(start)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("3 hosts pulled in %v", took)
	f.up.checkBlobGETs(t, "pulls with peer streaming", img.Blobs(), 1)

	var fromPeer, fromS3 float64
	for _, h := range hosts {
		hostBlobs(t, h, img.Blobs())
		fromPeer += metric(t, h, "berth_bytes_served_total", "source", "peer")
		fromS3 += metric(t, h, "berth_bytes_served_total", "source", "s3")
	}
	layer := float64(img.Layers[0].Size)
	// The two hosts without the lease got the layer from the holder, not
	// from the bucket after the upload.
	if fromPeer < 2*layer {
		t.Errorf("bytes served from a peer %.0f, want at least two copies of the %.0f-byte layer (from s3: %.0f)", fromPeer, layer, fromS3)
	}
	// Streaming, not store-and-forward: the slowest host finished well
	// before a second full download could have (2s each).
	slowest := slices.Max(took)
	if slowest > 3500*time.Millisecond {
		t.Errorf("slowest host took %v: waiting hosts did not stream from the holder", slowest)
	}
	// The holder uploads once its download is committed, which can be
	// after its clients are done: give the upload a moment.
	deadline := time.Now().Add(10 * time.Second)
	n := f.bucket.VerifyBlobs(t)
	for n != len(img.Blobs()) && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		n = f.bucket.VerifyBlobs(t)
	}
	if n != len(img.Blobs()) {
		t.Errorf("the bucket holds %d blobs, want %d (the holder still uploads)", n, len(img.Blobs()))
	}
}

// A holder frozen mid-download (SIGSTOP: its port still takes connections,
// its connections stay open, nothing more comes) is judged dead after
// --peer-idle-timeout: the host streaming from it takes its lease over and
// fetches the rest from the upstream with a Range, so its pull ends
// seconds after the freeze, not after source_idle_timeout or the lease's
// expiry (15s each by default).
func TestFleetFrozenPeer(t *testing.T) {
	const peerIdle = 3 * time.Second
	f := startFleet(t)
	img := PushImage(t, Docker, f.reg.Host, "library/frozen", "1", 4<<20, 1)
	layer := img.Layers[0]
	hosts := f.hosts(t, 2, "--tag-ttl", "5m", "--s3-advertise", "http://{listen}", "--peer-idle-timeout", peerIdle.String())
	a, b := hosts[0], hosts[1]
	f.up.rate.Store(1 << 20) // the 4 MiB layer takes 4s per fetch

	ctx, cancel := context.WithTimeout(context.Background(), 55*time.Second)
	defer cancel()
	aDone, _ := f.fetchingFor(ctx, t, a, "library/frozen", layer)

	// B pulls the image and streams the layer from A as A downloads it.
	pulled := make(chan error, 1)
	go func() { pulled <- pullImage(ctx, b.Host, "library/frozen", "1", img) }()
	testsupport.Eventually(t, "host B streaming the layer from A (1 MiB in its temp file)", 15*time.Second, func() bool {
		ents, _ := os.ReadDir(filepath.Join(b.Data, "tmp"))
		for _, e := range ents {
			if fi, err := e.Info(); err == nil && strings.HasPrefix(e.Name(), "blob-") && fi.Size() >= 1<<20 {
				return true
			}
		}
		return false
	})
	if n := len(f.up.blobGETs(layer.Digest)); n != 1 {
		t.Fatalf("B fetched the layer from the upstream (%d GETs) instead of streaming it from A", n)
	}

	t.Cleanup(func() { _ = a.Cmd.Process.Signal(syscall.SIGCONT) }) // before A's stop, even on failure
	if err := a.Cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	frozen := time.Now()
	err := <-pulled
	took := time.Since(frozen)
	if err != nil {
		t.Fatalf("the pull through B failed after A froze: %v", err)
	}
	t.Logf("B's pull completed %v after A froze (--peer-idle-timeout %v)", took.Round(time.Millisecond), peerIdle)
	// Detection takes peerIdle, the rest of the layer at most 4s at 1 MiB/s:
	// 12s leaves room for a loaded machine and still fails if B waited for
	// source_idle_timeout or A's lease to expire (15s each).
	if took > 12*time.Second {
		t.Errorf("B's pull took %v after A froze, want under 12s: A was not judged dead after %v", took, peerIdle)
	}
	if n := metric(t, b, "berth_leases_total", "kind", "blob", "event", "taken_over"); n != 1 {
		t.Errorf("B took over %.0f leases, want 1 (the frozen A's)", n)
	}
	if n := metric(t, b, "berth_resumes_total", "source", "peer", "reason", "stall"); n < 1 {
		t.Errorf("B counted no resume after a peer stall")
	}
	gets := f.up.blobGETs(layer.Digest)
	if len(gets) != 2 {
		t.Errorf("the layer was fetched from the upstream %d times, want 2 (A's, frozen, and B's for the rest)", len(gets))
	} else if gets[1].Start.Before(frozen) {
		t.Errorf("B fetched the layer from the upstream before A froze")
	}
	hostBlobs(t, b, img.Blobs())

	// A thaws and finishes its own download: its lease is B's now, which
	// costs it nothing but a failed renewal.
	if err := a.Cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if err := <-aDone; err != nil {
		t.Logf("A's client after the thaw: %v", err)
	}
	f.bucket.WaitBlobs(t, "docker.io", img.Layers, 20*time.Second)
	f.bucket.VerifyBlobs(t)
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"
)

// s3Counter sits between the mirrors and MinIO and counts the S3 requests
// they make, so both mirrors are measured by the same outside observer
// rather than by their own metrics. Requests are path-style
// (/bucket/key?query) and keep their Host header, which their signatures
// cover.
type s3Counter struct {
	addr string
	srv  *http.Server

	mu        sync.Mutex
	ops       map[string]int64
	detail    map[string]int64 // by operation, kind of object and status
	blobReads int64            // successful GETs of blob content
	leases    leaseLedger
	inflight  int       // requests whose answer is not through yet
	last      time.Time // when the last request but a health check ended
}

// leaseLedger tells blob lease renewals from the other lease writes and
// adds up how long blob leases were held, from the writes alone. A renewal and a takeover
// are both a PutObject with If-Match; a renewal's If-Match names an ETag
// that the same holder wrote (the holder is in the lease's JSON body), a
// takeover's one another holder wrote. A hold runs from a lease's creation
// or takeover to its deletion.
type leaseLedger struct {
	writer   map[string]string    // ETag → the holder whose write it is
	held     map[string]time.Time // key → start of its current hold, or of this period
	renewals int64                // renewal attempts, whatever the answer
	seconds  float64              // hold time closed in this period
	holds    int64                // holds begun in this period
}

type leaseHolderKey struct{}

// leaseHolder reads the holder from a lease write's body, which it leaves
// for the proxy to send as it was. The body may be aws-chunked: the JSON is
// what starts at its first '{'.
func leaseHolder(r *http.Request) *http.Request {
	if r.Method != http.MethodPut || objectKind(r.URL.Path) != "leases" || r.Body == nil {
		return r
	}
	b, err := io.ReadAll(io.LimitReader(r.Body, 64<<10))
	r.Body.Close()
	r.Body = io.NopCloser(bytes.NewReader(b))
	if err != nil {
		return r
	}
	var rec struct {
		Holder string `json:"holder"`
	}
	if i := bytes.IndexByte(b, '{'); i >= 0 && json.NewDecoder(bytes.NewReader(b[i:])).Decode(&rec) == nil {
		return r.WithContext(context.WithValue(r.Context(), leaseHolderKey{}, rec.Holder))
	}
	return r
}

// note records a lease request with its answer.
func (l *leaseLedger) note(r *http.Request, status int, etag string, now time.Time) {
	if l.writer == nil {
		l.writer, l.held = map[string]string{}, map[string]time.Time{}
	}
	ok := status/100 == 2
	path := r.URL.Path
	holder, _ := r.Context().Value(leaseHolderKey{}).(string)
	switch r.Method {
	case http.MethodPut:
		ifMatch := strings.Trim(r.Header.Get("If-Match"), `"`)
		if ifMatch != "" && holder != "" && l.writer[ifMatch] == holder {
			l.renewals++
		} else if ok { // created or taken over: a new hold
			l.close(path, now)
			l.held[path] = now
			l.holds++
		}
		if ok && etag != "" {
			l.writer[strings.Trim(etag, `"`)] = holder
		}
	case http.MethodDelete:
		if ok {
			l.close(path, now)
		}
	}
}

func (l *leaseLedger) close(path string, now time.Time) {
	if start, ok := l.held[path]; ok {
		l.seconds += now.Sub(start).Seconds()
		delete(l.held, path)
	}
}

// take ends a period: the holds still running count up to now, and go on
// into the next period from now.
func (l *leaseLedger) take(now time.Time) (renewals, holds int64, seconds float64) {
	renewals, holds, seconds = l.renewals, l.holds, l.seconds
	for path, start := range l.held {
		seconds += now.Sub(start).Seconds()
		l.held[path] = now
	}
	l.renewals, l.holds, l.seconds = 0, 0, 0
	return renewals, holds, seconds
}

func startS3Counter(target string) (*s3Counter, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	c := &s3Counter{addr: ln.Addr().String(), ops: map[string]int64{}, detail: map[string]int64{}}
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(u)
			r.Out.Host = r.In.Host
		},
		FlushInterval: -1,
		ModifyResponse: func(resp *http.Response) error {
			c.record(resp.Request, resp.StatusCode, resp.Header.Get("ETag"))
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			c.record(r, 0, "")
			w.WriteHeader(http.StatusBadGateway)
		},
	}
	// A request counts as ended once its whole body has passed both ways:
	// a multipart upload's part may take seconds.
	c.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		c.inflight++
		c.mu.Unlock()
		defer func() {
			c.mu.Lock()
			c.inflight--
			if s3Op(r) != "HeadBucket" {
				c.last = time.Now()
			}
			c.mu.Unlock()
		}()
		rp.ServeHTTP(w, leaseHolder(r))
	})}
	go c.srv.Serve(ln)
	return c, nil
}

func (c *s3Counter) url() string { return "http://" + c.addr }

func (c *s3Counter) close() { c.srv.Close() }

// s3Op names a request after the S3 API call it is.
func s3Op(r *http.Request) string {
	q := r.URL.Query()
	key := strings.SplitN(strings.TrimPrefix(r.URL.Path, "/"), "/", 2)
	hasKey := len(key) == 2 && key[1] != ""
	switch r.Method {
	case http.MethodGet:
		switch {
		case q.Has("uploadId"):
			return "ListParts"
		case q.Has("uploads"):
			return "ListMultipartUploads"
		case !hasKey:
			return "ListObjects"
		default:
			return "GetObject"
		}
	case http.MethodHead:
		if !hasKey {
			return "HeadBucket"
		}
		return "HeadObject"
	case http.MethodPut:
		switch {
		case q.Has("partNumber") && r.Header.Get("X-Amz-Copy-Source") != "":
			return "UploadPartCopy"
		case q.Has("partNumber"):
			return "UploadPart"
		case r.Header.Get("X-Amz-Copy-Source") != "":
			return "CopyObject"
		default:
			return "PutObject"
		}
	case http.MethodPost:
		switch {
		case q.Has("uploads"):
			return "CreateMultipartUpload"
		case q.Has("uploadId"):
			return "CompleteMultipartUpload"
		case q.Has("delete"):
			return "DeleteObjects"
		}
	case http.MethodDelete:
		if q.Has("uploadId") {
			return "AbortMultipartUpload"
		}
		return "DeleteObject"
	}
	return r.Method + " other"
}

// isRead is a request that does not change the bucket.
func isRead(op string) bool {
	return strings.HasPrefix(op, "Get") || strings.HasPrefix(op, "Head") || strings.HasPrefix(op, "List")
}

// isBlobContent tells blob objects from leases, manifests, tag records and
// the distribution registry's link files. berth keeps a blob at
// <prefix>blobs/<upstream>/<alg>/<hex> (docs/s3.md), the distribution
// registry at <root>/docker/registry/v2/blobs/<alg>/<xx>/<hex>/data.
func isBlobContent(path string) bool {
	if strings.Contains(path, "/docker/registry/v2/") {
		return strings.Contains(path, "/docker/registry/v2/blobs/") && strings.HasSuffix(path, "/data")
	}
	return strings.Contains(path, "/blobs/") && !strings.Contains(path, "/leases/")
}

func (c *s3Counter) record(r *http.Request, status int, etag string) {
	op := s3Op(r)
	kind := objectKind(r.URL.Path)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ops[op]++
	c.detail[fmt.Sprintf("%s %s %d", op, kind, status)]++
	// Blob leases are the ones renewed; a tag's lease lives 30s unrenewed.
	if kind == "leases" && strings.Contains(r.URL.Path, "/leases/blobs/") {
		c.leases.note(r, status, etag, time.Now())
	}
	if op == "GetObject" && (status == http.StatusOK || status == http.StatusPartialContent) && isBlobContent(r.URL.Path) {
		c.blobReads++
	}
}

// objectKind names what a key holds: berth's top-level kinds (blobs,
// manifests, tags, leases; docs/s3.md) or the distribution registry's.
func objectKind(path string) string {
	if i := strings.Index(path, "/docker/registry/v2/"); i >= 0 {
		rest := strings.Split(path[i+len("/docker/registry/v2/"):], "/")
		switch {
		case len(rest) > 0 && rest[0] == "blobs":
			return "dist-blobs"
		case len(rest) > 0 && rest[0] == "repositories":
			for _, p := range rest {
				if strings.HasPrefix(p, "_") {
					return "dist-repo" + p
				}
			}
		}
		return "dist-other"
	}
	parts := strings.Split(strings.TrimPrefix(path, "/"), "/")
	// bucket, prefix, kind, ...
	if len(parts) >= 3 {
		return parts[2]
	}
	return "bucket"
}

// s3Counts is what the mirrors asked of S3 since the last reset.
type s3Counts struct {
	ops       map[string]int64
	detail    map[string]int64
	blobReads int64
	renewals  int64   // blob lease renewal requests, among the ops
	leaseHeld int64   // blob leases created or taken over
	leaseSecs float64 // how long blob leases were held, summed over leases
}

// settle waits until no request is in flight and the mirrors have sent
// none but their periodic health checks for quiet, so work they finish
// after answering (an upload to the bucket) is counted too; at most until
// ctx ends.
func (c *s3Counter) settle(ctx context.Context, quiet time.Duration) {
	for {
		c.mu.Lock()
		idle, busy := time.Since(c.last), c.inflight > 0
		c.mu.Unlock()
		if !busy && idle >= quiet {
			return
		}
		wait := quiet / 10
		if !busy {
			wait = quiet - idle
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

func (c *s3Counter) take() s3Counts {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := s3Counts{ops: c.ops, detail: c.detail, blobReads: c.blobReads}
	out.renewals, out.leaseHeld, out.leaseSecs = c.leases.take(time.Now())
	c.ops, c.detail, c.blobReads = map[string]int64{}, map[string]int64{}, 0
	return out
}

// total is every request of the period.
func (s s3Counts) total() (n int64) {
	for _, k := range s.ops {
		n += k
	}
	return n
}

// details lists the requests by operation, object kind and status.
func (s s3Counts) details() string {
	out := make([]string, 0, len(s.detail))
	for k, n := range s.detail {
		out = append(out, fmt.Sprintf("%s: %d", k, n))
	}
	sort.Strings(out)
	return strings.Join(out, "; ")
}

func (s s3Counts) reads() (n int64) {
	for op, k := range s.ops {
		if isRead(op) {
			n += k
		}
	}
	return n
}

func (s s3Counts) writes() (n int64) {
	for op, k := range s.ops {
		if !isRead(op) {
			n += k
		}
	}
	return n
}

func (s s3Counts) String() string {
	ops := make([]string, 0, len(s.ops))
	for op, n := range s.ops {
		ops = append(ops, fmt.Sprintf("%s %d", op, n))
	}
	sort.Strings(ops)
	return strings.Join(ops, ", ")
}

package coordinator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/auth"
	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/storage"
)

// NodeOptions build a Node.
type NodeOptions struct {
	Engine  *engine.Engine
	Local   *storage.Local
	DataDir string // the node ID (DataDir/node-id) and the pins file (DataDir/prewarm/pins.json) live here
	Version string // berth's version, for node facts
	// AdminTokens are the bearer tokens writes (prefetch, cancel) need.
	// Nil: writes are accepted from loopback addresses only.
	AdminTokens *auth.Tokens
	Log         *logrus.Entry // nil: discard
	// Upstreams lists the configured registries, for node facts; optional.
	Upstreams func() []string
}

// Node is the node API of one berth: prefetch jobs, pins, warm gate, facts.
type Node struct {
	o    NodeOptions
	id   string
	pins *pinStore
	life context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup

	mu   sync.Mutex
	jobs map[string]*job
	ids  []string // oldest first, bounded by maxJobs

	reapplied chan struct{} // closed once the stored pins are re-applied

	queue atomic.Int64 // blobs pre-warm has to fetch: waiting or being fetched
}

// maxJobs bounds the finished jobs a node remembers.
const maxJobs = 200

// prefetchWorkers is how many blobs one job fetches at once.
const prefetchWorkers = 4

// NewNode opens the pins file and re-applies, in the background, every
// pin still in force: the blob is fetched if it is gone and pinned until
// its stored time.
func NewNode(o NodeOptions) (*Node, error) {
	if o.Log == nil {
		l := logrus.New()
		l.Out = discard{}
		o.Log = logrus.NewEntry(l)
	}
	id, err := loadNodeID(o.DataDir)
	if err != nil {
		return nil, fmt.Errorf("node ID: %w", err)
	}
	ps, err := openPinStore(filepath.Join(o.DataDir, "prewarm", "pins.json"))
	if err != nil {
		return nil, fmt.Errorf("pre-warm pins: %w", err)
	}
	n := &Node{o: o, id: id, pins: ps, jobs: map[string]*job{}, reapplied: make(chan struct{})}
	n.life, n.stop = context.WithCancel(context.Background())
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		defer close(n.reapplied)
		n.reapply()
	}()
	return n, nil
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// Queue is how many blobs pre-warm has yet to bring onto this node's
// disk, waiting or being fetched: by prefetch jobs, and by the pins
// re-applied at start. The scaler feed reports it (prewarm_queue).
func (n *Node) Queue() int { return int(n.queue.Load()) }

// Close cancels running jobs and waits for them.
func (n *Node) Close() {
	n.stop()
	n.wg.Wait()
}

// reapply pins again what the pins file holds, after a restart.
func (n *Node) reapply() {
	pins := n.pins.active(time.Now())
	if len(pins) == 0 {
		return
	}
	n.o.Log.WithField("pins", len(pins)).Info("pre-warm: re-applying pins")
	n.queue.Add(int64(len(pins)))
	forEach(len(pins), prefetchWorkers, func(i int) {
		defer n.queue.Add(-1)
		p := pins[i]
		up, name, _ := strings.Cut(p.Repository, "/")
		repo := engine.Repo{Upstream: up, Name: name}
		if err := n.o.Engine.Prefetch(n.life, repo, p.Digest, p.Until); err != nil && n.life.Err() == nil {
			n.o.Log.WithError(err).WithFields(logrus.Fields{"repository": p.Repository, "digest": p.Digest, "kind": engine.KindOf(err)}).Warn("pre-warm: a stored pin could not be re-applied")
		}
	})
}

// Handler is the node API for the registry listener: reads are open as
// /status is; writes need an admin token, or come from loopback when no
// admin token is configured.
func (n *Node) Handler() http.Handler { return n.guard(nil, false) }

// FleetHandler is the node API for the fleet port: every request needs a
// fleet credential (a fleet token, a verified client certificate) or an
// admin token; writes need an admin token, or come from loopback when no
// admin token is configured.
func (n *Node) FleetHandler(fleet *auth.Tokens) http.Handler { return n.guard(fleet, true) }

func (n *Node) guard(fleet *auth.Tokens, fleetPort bool) http.Handler {
	mux := n.routes()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok := takeToken(r, false)
		admin := n.o.AdminTokens.Valid(tok)
		write := r.Method != http.MethodGet && r.Method != http.MethodHead
		if fleetPort && !admin && !auth.VerifiedClient(r) && !fleet.Valid(tok) {
			refuse(w, r, n.o.Log.WithField("api", "node"), `Bearer realm="`+auth.FleetRealm+`"`, "no valid fleet or admin credential")
			return
		}
		if write {
			if ok, why := admit(n.o.AdminTokens, tok, r.RemoteAddr, "writes need an admin token", "no admin token is configured (admin_token_file), so writes"); !ok {
				refuse(w, r, n.o.Log.WithField("api", "node"), `Bearer realm="`+adminRealm+`"`, why)
				return
			}
		}
		mux.ServeHTTP(w, r)
	})
}

// adminRealm is the challenge's realm when a write lacks an admin token.
const adminRealm = "berth-admin"

// refuse answers 401 with the challenge and the registry error JSON, and
// logs the refusal (who, what, why), never the credential.
func refuse(w http.ResponseWriter, r *http.Request, log *logrus.Entry, challenge, why string) {
	log.WithFields(logrus.Fields{"remote": r.RemoteAddr, "method": r.Method, "path": r.URL.Path, "reason": why}).Warn("request refused")
	w.Header().Set("WWW-Authenticate", challenge)
	writeError(w, http.StatusUnauthorized, errcode.ErrorCodeUnauthorized, "unauthorized", "authentication required: "+why)
}

// admit reports whether a request holding tok passes a door that needs
// one of tokens; when none is configured, loopback clients pass. why is
// the refusal's reason: need, or (no tokens) what is accepted from
// loopback only.
func admit(tokens *auth.Tokens, tok, remote, need, what string) (ok bool, why string) {
	switch {
	case tokens.Valid(tok):
		return true, ""
	case tokens != nil:
		return false, need
	case Loopback(remote):
		return true, ""
	}
	return false, what + " are accepted from loopback only"
}

// takeToken returns the request's bearer token (or, with basic, the
// password of basic authentication, which is what a browser can send) and
// deletes the header, so that nothing downstream may log or forward it.
func takeToken(r *http.Request, basic bool) string {
	tok := bearerToken(r)
	if _, pw, ok := r.BasicAuth(); ok && basic && tok == "" {
		tok = pw
	}
	r.Header.Del("Authorization")
	return tok
}

// Loopback reports whether a RemoteAddr (host:port) is a loopback address.
func Loopback(remote string) bool {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func bearerToken(r *http.Request) string {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(tok)
}

func (n *Node) routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /berth/v1/prefetch", n.postPrefetch)
	mux.HandleFunc("GET /berth/v1/jobs", n.listJobs)
	mux.HandleFunc("GET /berth/v1/jobs/{id}", n.getJob)
	mux.HandleFunc("GET /berth/v1/jobs/{id}/events", n.jobEvents)
	mux.HandleFunc("DELETE /berth/v1/jobs/{id}", n.cancelJob)
	mux.HandleFunc("GET /berth/v1/pins", n.listPins)
	mux.HandleFunc("GET /berth/v1/warm", n.warm)
	mux.HandleFunc("GET /berth/v1/node", n.facts)
	mux.HandleFunc("GET /berth/v1/resolve", n.resolve)
	mux.HandleFunc("/berth/v1/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, errcode.ErrorCodeUnsupported, "", "no such node API route: "+r.Method+" "+r.URL.Path)
	})
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// maxImages bounds one request.
const maxImages = 1000

func (n *Node) postPrefetch(w http.ResponseWriter, r *http.Request) {
	var req PrefetchRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, ErrorCodeInvalid, "invalid_request", "request body: "+err.Error())
		return
	}
	if len(req.Images) == 0 || len(req.Images) > maxImages {
		writeError(w, http.StatusBadRequest, ErrorCodeInvalid, "invalid_request", fmt.Sprintf("images: need 1 to %d, got %d", maxImages, len(req.Images)))
		return
	}
	for _, p := range req.Platforms {
		if err := ValidPlatform(p); err != nil {
			writeError(w, http.StatusBadRequest, ErrorCodeInvalid, "invalid_request", err.Error())
			return
		}
	}
	if !req.PinUntil.IsZero() && !req.PinUntil.After(time.Now()) {
		writeError(w, http.StatusBadRequest, ErrorCodeInvalid, "invalid_request", "pin_until "+req.PinUntil.Format(time.RFC3339)+" is in the past")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	j := n.plan(ctx, req)
	if req.PinUntil.IsZero() {
		n.start(j)
		writeJSON(w, http.StatusAccepted, PrefetchAccepted{ID: j.snap.ID})
		return
	}
	// The pin check and the intent's record under one lock: two requests
	// cannot both count on the same room.
	n.mu.Lock()
	err := n.checkBudget(j)
	if err == nil {
		err = n.recordIntent(j)
	}
	n.mu.Unlock()
	if err != nil {
		kind := string(engine.KindOf(err))
		status := statusOfKind(engine.KindOf(err))
		code := ErrorCodeFailed
		if engine.KindOf(err) == engine.KindNoSpace {
			code = ErrorCodeNoSpace
		}
		n.o.Log.WithError(err).Warn("pre-warm: prefetch refused")
		writeError(w, status, code, kind, err.Error())
		return
	}
	n.start(j)
	writeJSON(w, http.StatusAccepted, PrefetchAccepted{ID: j.snap.ID})
}

// ValidPlatform checks an os/arch[/variant] string.
func ValidPlatform(p string) error {
	parts := strings.Split(p, "/")
	if len(parts) < 2 || len(parts) > 3 || slices.Contains(parts, "") {
		return fmt.Errorf("platform %q is not os/arch or os/arch/variant", p)
	}
	return nil
}

// job is one prefetch on this node.
type job struct {
	mu       sync.Mutex
	snap     JobSnapshot
	changed  chan struct{} // closed and replaced on every change
	cancel   context.CancelFunc
	repos    []engine.Repo // by image, for the images that resolved
	restore  map[string]Pin
	pinUntil time.Time
	// fromHolder: blobs another node is filling the bucket with
	// (engine.PrefetchOptions.FromHolder).
	fromHolder map[digest.Digest]bool
}

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// plan resolves every image to its blobs and sizes; an image that fails
// is marked failed with its typed error and the rest go on.
func (n *Node) plan(ctx context.Context, req PrefetchRequest) *job {
	j := &job{changed: make(chan struct{}), pinUntil: req.PinUntil, fromHolder: map[digest.Digest]bool{}}
	for _, d := range req.FromHolder {
		j.fromHolder[d] = true
	}
	j.snap = JobSnapshot{ID: newID(), State: StateRunning, Created: time.Now().UTC(), PinUntil: req.PinUntil}
	j.snap.Images = make([]ImageStatus, len(req.Images))
	j.repos = make([]engine.Repo, len(req.Images))
	forEach(len(req.Images), 8, func(i int) {
		img := req.Images[i]
		st := ImageStatus{Image: img, State: StatePending}
		ri, err := walkImage(ctx, n.o.Engine, img, req.Platforms)
		if err == nil {
			st.Platforms = ri.platforms
			j.repos[i] = ri.repo
			n.primeTag(ctx, ri.repo, img)
			for _, d := range ri.blobs {
				size, serr := n.blobSize(ctx, ri, d)
				if serr != nil {
					err = serr
					break
				}
				st.Blobs = append(st.Blobs, BlobStatus{Digest: d, Size: size, State: StatePending})
				st.BytesTotal += size
			}
		}
		if err != nil {
			st.State, st.Error, st.Blobs, st.BytesTotal = StateFailed, infoOf(err), nil, 0
		}
		j.snap.Images[i] = st
	})
	j.totals()
	return j
}

// blobSize is a blob's size: the manifest's descriptor gives it (the blob
// is verified against its digest when fetched); only a descriptor without
// one costs a lookup.
func (n *Node) blobSize(ctx context.Context, ri *resolvedImage, d digest.Digest) (int64, error) {
	if size := ri.sizes[d]; size > 0 {
		return size, nil
	}
	size, err := n.o.Engine.StatBlob(ctx, ri.repo, d)
	if err != nil {
		return 0, fmt.Errorf("blob %s: %w", d, err)
	}
	return size, nil
}

// primeTag looks up the tag the image was resolved from, so that a pull
// by that tag finds it on this node (its tag record, within tag_ttl)
// without asking the bucket or the upstream. A tag that has moved since is
// logged; the job still warms the digest it was given.
func (n *Node) primeTag(ctx context.Context, repo engine.Repo, img Image) {
	if img.Ref == "" {
		return
	}
	_, tag, _, err := ParseReference(img.Ref)
	if err != nil || tag == "" {
		return
	}
	m, err := n.o.Engine.Manifest(ctx, repo, tag, nil)
	if err == nil && m.Digest != img.Digest {
		n.o.Log.WithFields(logrus.Fields{"ref": img.Ref, "digest": img.Digest, "now": m.Digest}).Warn("pre-warm: the tag has moved since the job resolved it; warming the job's digest")
	}
}

// totals recomputes the job's sums; callers hold j.mu (or own j alone).
func (j *job) totals() {
	j.snap.BytesDone, j.snap.BytesTotal, j.snap.BlobsDone, j.snap.BlobsTotal = 0, 0, 0, 0
	for i := range j.snap.Images {
		im := &j.snap.Images[i]
		im.BytesDone = 0
		for _, b := range im.Blobs {
			if b.State == StateDone {
				im.BytesDone += b.Size
				j.snap.BlobsDone++
			}
		}
		j.snap.BlobsTotal += len(im.Blobs)
		j.snap.BytesDone += im.BytesDone
		j.snap.BytesTotal += im.BytesTotal
	}
}

// jobKeys are the distinct blobs of the images that resolved, with their
// repository and size.
type blobJob struct {
	repo engine.Repo
	d    digest.Digest
	size int64
}

func (j *job) blobs() []blobJob {
	seen := map[string]bool{}
	var out []blobJob
	for i, im := range j.snap.Images {
		for _, b := range im.Blobs {
			k := pinKey(j.repos[i].Upstream, b.Digest.String())
			if !seen[k] {
				seen[k] = true
				out = append(out, blobJob{repo: j.repos[i], d: b.Digest, size: b.Size})
			}
		}
	}
	return out
}

// checkBudget refuses a pin that would not fit the cache budget beside
// the pins in force. Callers hold n.mu.
func (n *Node) checkBudget(j *job) error {
	now := time.Now()
	var pinned int64
	active := map[string]bool{}
	for _, p := range n.pins.active(now) {
		pinned += p.Size
		active[pinKey(upstreamOf(p.Repository), p.Digest.String())] = true
	}
	var need int64
	for _, b := range j.blobs() {
		if !active[pinKey(b.repo.Upstream, b.d.String())] {
			need += b.size
		}
	}
	budget := n.o.Local.Budget()
	if pinned+need > budget {
		return &engine.Error{Kind: engine.KindNoSpace, Msg: fmt.Sprintf("pinning %d bytes beside the %d bytes already pinned would exceed this node's cache budget of %d bytes; nothing was pinned", need, pinned, budget)}
	}
	return nil
}

// recordIntent writes the job's pins to the pins file before any is
// fetched, so /berth/v1/warm is not 200 until they are on disk and a
// restart finishes them; restore is what to put back if the job fails.
// Callers hold n.mu.
func (n *Node) recordIntent(j *job) error {
	j.restore = map[string]Pin{}
	var add []Pin
	now := time.Now()
	for _, b := range j.blobs() {
		k := pinKey(b.repo.Upstream, b.d.String())
		old, _ := n.pins.get(b.repo.Upstream, b.d.String(), now)
		j.restore[k] = old
		add = append(add, Pin{Repository: b.repo.String(), Digest: b.d, Size: b.size, Until: j.pinUntil})
	}
	return n.pins.update(add, nil)
}

func (n *Node) start(j *job) {
	ctx, cancel := context.WithCancel(n.life)
	j.cancel = cancel
	n.mu.Lock()
	n.jobs[j.snap.ID] = j
	n.ids = append(n.ids, j.snap.ID)
	for len(n.ids) > maxJobs {
		old := n.jobs[n.ids[0]]
		if old != nil {
			old.mu.Lock()
			done := old.snap.Terminal()
			old.mu.Unlock()
			if !done {
				break
			}
		}
		delete(n.jobs, n.ids[0])
		n.ids = n.ids[1:]
	}
	n.mu.Unlock()
	n.o.Log.WithFields(logrus.Fields{"job": j.snap.ID, "images": len(j.snap.Images), "blobs": j.snap.BlobsTotal, "bytes": j.snap.BytesTotal, "pin_until": j.pinUntil}).Info("pre-warm: job started")
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		defer cancel()
		n.run(ctx, j)
	}()
}

// update changes the job's snapshot under its lock and wakes watchers.
func (j *job) update(fn func(s *JobSnapshot)) {
	j.mu.Lock()
	fn(&j.snap)
	j.totals()
	j.snap.Seq++
	close(j.changed)
	j.changed = make(chan struct{})
	j.mu.Unlock()
}

// setBlob sets the state of blob d in every image of upstream that has it.
func (j *job) setBlob(upstream string, d digest.Digest, state string, e *ErrorInfo) {
	j.update(func(s *JobSnapshot) {
		for i := range s.Images {
			if j.repos[i].Upstream != upstream {
				continue
			}
			im := &s.Images[i]
			for k := range im.Blobs {
				if im.Blobs[k].Digest == d && im.Blobs[k].State != StateDone {
					im.Blobs[k].State, im.Blobs[k].Error = state, e
					if im.State == StatePending {
						im.State = StateRunning
					}
				}
			}
		}
	})
}

func (n *Node) run(ctx context.Context, j *job) {
	// The node fetching the from_holder blobs, found once for the job
	// with one lease read (of the largest: its fetch runs longest), so
	// each of them costs no bucket request.
	var holder string
	var largest *blobJob
	for _, b := range j.blobs() {
		if j.fromHolder[b.d] && (largest == nil || b.size > largest.size) {
			largest = &b
		}
	}
	if largest != nil {
		holder = n.o.Engine.BlobHolder(ctx, largest.repo, largest.d)
	}
	work := make(chan blobJob)
	var wg sync.WaitGroup
	for range prefetchWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range work {
				// Running once bytes flow: the run that filled the bucket
				// through this node starts the others then (Run).
				err := n.o.Engine.PrefetchWith(ctx, b.repo, b.d, engine.PrefetchOptions{
					PinUntil: j.pinUntil, FromHolder: j.fromHolder[b.d], Holder: holder,
					Started: func() { j.setBlob(b.repo.Upstream, b.d, StateRunning, nil) },
				})
				n.queue.Add(-1)
				if err != nil {
					j.setBlob(b.repo.Upstream, b.d, StateFailed, infoOf(err))
					continue
				}
				j.setBlob(b.repo.Upstream, b.d, StateDone, nil)
			}
		}()
	}
	blobs := j.blobs()
	n.queue.Add(int64(len(blobs)))
	sent := 0
	for _, b := range blobs {
		select {
		case work <- b:
			sent++
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	n.queue.Add(-int64(len(blobs) - sent)) // canceled before a worker took them
	close(work)
	wg.Wait()
	canceled := ctx.Err() != nil && n.life.Err() == nil
	// A blob canceled while the job was not is the engine shutting down
	// under it (SIGTERM): the pins stay recorded, and the restart finishes them.
	shutdown := n.life.Err() != nil
	if ctx.Err() == nil {
		j.mu.Lock()
		for _, im := range j.snap.Images {
			for _, b := range im.Blobs {
				if b.Error != nil && b.Error.Kind == StateCanceled {
					shutdown = true
				}
			}
		}
		j.mu.Unlock()
	}
	// Each image ends done or failed; a failed image's pins are undone
	// unless an image that succeeded needs the same blob.
	keep := map[string]bool{}
	var failedKeys []blobJob
	j.update(func(s *JobSnapshot) {
		failed := 0
		for i := range s.Images {
			im := &s.Images[i]
			if im.State != StateFailed {
				for _, b := range im.Blobs {
					if b.State != StateDone {
						im.State = StateFailed
						im.Error = b.Error
						if im.Error == nil {
							im.Error = &ErrorInfo{Kind: StateCanceled, Message: "job canceled"}
						}
						break
					}
				}
			}
			if im.State == StateFailed {
				failed++
				for _, b := range im.Blobs {
					failedKeys = append(failedKeys, blobJob{repo: j.repos[i], d: b.Digest})
				}
				continue
			}
			im.State = StateDone
			for _, b := range im.Blobs {
				keep[pinKey(j.repos[i].Upstream, b.Digest.String())] = true
			}
		}
		switch {
		case canceled:
			s.State = StateCanceled
		case failed > 0:
			s.State = StateFailed
			s.Error = &ErrorInfo{Kind: "images_failed", Message: fmt.Sprintf("%d of %d images failed", failed, len(s.Images))}
		default:
			s.State = StateSucceeded
		}
		s.Finished = time.Now().UTC()
	})
	if !j.pinUntil.IsZero() && len(failedKeys) > 0 && !shutdown {
		restore := map[string]Pin{}
		for _, b := range failedKeys {
			k := pinKey(b.repo.Upstream, b.d.String())
			if keep[k] {
				continue
			}
			old := j.restore[k]
			restore[k] = old
			if old.Until.IsZero() {
				n.o.Engine.Unpin(b.repo, b.d)
			}
		}
		n.mu.Lock()
		if err := n.pins.update(nil, restore); err != nil {
			n.o.Log.WithError(err).Error("pre-warm: cannot write the pins file")
		}
		n.mu.Unlock()
	}
	j.mu.Lock()
	s := j.snap
	j.mu.Unlock()
	n.o.Log.WithFields(logrus.Fields{"job": s.ID, "state": s.State, "bytes": s.BytesDone, "blobs": s.BlobsDone}).Info("pre-warm: job ended")
}

func (n *Node) job(w http.ResponseWriter, r *http.Request) *job {
	n.mu.Lock()
	j := n.jobs[r.PathValue("id")]
	n.mu.Unlock()
	if j == nil {
		writeError(w, http.StatusNotFound, ErrorCodeJobUnknown, "not_found", "no job "+r.PathValue("id")+" on this node")
	}
	return j
}

func (j *job) snapshot() (JobSnapshot, chan struct{}) {
	j.mu.Lock()
	defer j.mu.Unlock()
	s := j.snap
	s.Images = slices.Clone(s.Images)
	for i := range s.Images {
		s.Images[i].Blobs = slices.Clone(s.Images[i].Blobs)
	}
	return s, j.changed
}

func (n *Node) getJob(w http.ResponseWriter, r *http.Request) {
	if j := n.job(w, r); j != nil {
		s, _ := j.snapshot()
		writeJSON(w, http.StatusOK, s)
	}
}

func (n *Node) listJobs(w http.ResponseWriter, r *http.Request) {
	n.mu.Lock()
	js := make([]*job, 0, len(n.ids))
	for _, id := range n.ids {
		js = append(js, n.jobs[id])
	}
	n.mu.Unlock()
	out := make([]JobSnapshot, 0, len(js))
	for _, j := range js {
		s, _ := j.snapshot()
		s.Images = nil // the list is a summary; GET the job for its images
		out = append(out, s)
	}
	writeJSON(w, http.StatusOK, out)
}

func (n *Node) cancelJob(w http.ResponseWriter, r *http.Request) {
	if j := n.job(w, r); j != nil {
		j.cancel()
		s, _ := j.snapshot()
		writeJSON(w, http.StatusAccepted, s)
	}
}

// jobEvents streams the job as server-sent events: a "progress" event with
// the whole snapshot at every change (at most every 50ms), and an "end"
// event with the final one.
func (n *Node) jobEvents(w http.ResponseWriter, r *http.Request) {
	j := n.job(w, r)
	if j == nil {
		return
	}
	ServeSSE(w, r, func(ctx context.Context) (any, bool, <-chan struct{}) {
		s, ch := j.snapshot()
		return s, s.Terminal(), ch
	})
}

// ServeSSE streams snapshots as server-sent events until next says the
// end is reached or the client leaves: "progress" events, then "end".
func ServeSSE(w http.ResponseWriter, r *http.Request, next func(ctx context.Context) (v any, end bool, changed <-chan struct{})) {
	fl, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	keepalive := time.NewTicker(15 * time.Second)
	defer keepalive.Stop()
	for {
		v, end, changed := next(r.Context())
		b, _ := json.Marshal(v)
		ev := "progress"
		if end {
			ev = "end"
		}
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", ev, b); err != nil {
			return
		}
		if fl != nil {
			fl.Flush()
		}
		if end {
			return
		}
		for waiting := true; waiting; {
			select {
			case <-changed:
				waiting = false
			case <-keepalive.C:
				if _, err := fmt.Fprint(w, ": keepalive\n\n"); err != nil {
					return
				}
				if fl != nil {
					fl.Flush()
				}
			case <-r.Context().Done():
				return
			}
		}
		select { // coalesce bursts of changes
		case <-time.After(50 * time.Millisecond):
		case <-r.Context().Done():
			return
		}
	}
}

func (n *Node) listPins(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, n.activePins())
}

// activePins lists the pins in force, each with whether it is on disk
// and held by the engine.
func (n *Node) activePins() []Pin {
	held := n.o.Engine.Pinned()
	pins := n.pins.active(time.Now())
	for i, p := range pins {
		k := storage.Key{Upstream: upstreamOf(p.Repository), Digest: p.Digest}
		_, on := n.o.Local.HasBlob(k)
		_, pinned := held[k]
		pins[i].OnDisk = on && pinned
	}
	return pins
}

// warm answers 200 when every pin in force is on this node's disk and
// held against eviction, 503 otherwise, naming what is missing. With
// ?image=REPOSITORY@DIGEST (repeatable, and ?platform=os/arch to expand
// indexes) it also says how much of each image the disk lacks, and 200
// needs each of those images on disk and pinned too.
func (n *Node) warm(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var images []Image
	for _, s := range q["image"] {
		img, err := ParseImage(s)
		if err != nil {
			writeError(w, http.StatusBadRequest, ErrorCodeInvalid, "invalid_request", err.Error())
			return
		}
		images = append(images, img)
	}
	if len(images) > maxImages {
		writeError(w, http.StatusBadRequest, ErrorCodeInvalid, "invalid_request", fmt.Sprintf("image: at most %d, got %d", maxImages, len(images)))
		return
	}
	for _, p := range q["platform"] {
		if err := ValidPlatform(p); err != nil {
			writeError(w, http.StatusBadRequest, ErrorCodeInvalid, "invalid_request", err.Error())
			return
		}
	}
	pins := n.activePins()
	st := WarmStatus{Warm: true, Pins: len(pins)}
	for _, p := range pins {
		if !p.OnDisk {
			st.Warm = false
			st.Missing = append(st.Missing, p)
		}
	}
	if len(images) > 0 {
		ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
		defer cancel()
		st.Images = n.ImagesWarmth(ctx, images, q["platform"])
		for _, iw := range st.Images {
			st.Warm = st.Warm && iw.Warm
		}
	}
	code := http.StatusOK
	if !st.Warm {
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, st)
}

// ImagesWarmth says, for each image, how many of its bytes (the blobs of
// platforms, default this node's) this node's disk lacks and until when
// they are pinned here. The manifests are read through the engine, from
// this node's disk when a warm-up put them there; an image that cannot be
// read carries its typed error.
func (n *Node) ImagesWarmth(ctx context.Context, images []Image, platforms []string) []ImageWarmth {
	out := make([]ImageWarmth, len(images))
	now := time.Now()
	held := n.o.Engine.Pinned()
	forEach(len(images), 8, func(i int) {
		iw := ImageWarmth{Image: images[i]}
		ri, err := walkImage(ctx, n.o.Engine, images[i], platforms)
		if err != nil {
			iw.Error = infoOf(err)
			out[i] = iw
			return
		}
		iw.Platforms = ri.platforms
		pinned := true
		for _, d := range ri.blobs {
			k := storage.Key{Upstream: ri.repo.Upstream, Digest: d}
			onDisk, on := n.o.Local.HasBlob(k)
			size := ri.sizes[d]
			if size <= 0 && on {
				size = onDisk
			}
			if size <= 0 {
				if size, err = n.blobSize(ctx, ri, d); err != nil {
					iw.Error = infoOf(err)
					break
				}
			}
			iw.Blobs++
			iw.Bytes += size
			if !on {
				iw.MissingBlobs++
				iw.MissingBytes += size
			}
			p, ok := n.pins.get(ri.repo.Upstream, d.String(), now)
			_, isHeld := held[k]
			switch {
			case !ok || !isHeld:
				pinned = false
			case iw.PinnedUntil.IsZero() || p.Until.Before(iw.PinnedUntil):
				iw.PinnedUntil = p.Until
			}
		}
		if !pinned || iw.Error != nil {
			iw.PinnedUntil = time.Time{}
		}
		iw.Warm = iw.Error == nil && iw.MissingBytes == 0 && !iw.PinnedUntil.IsZero()
		out[i] = iw
	})
	return out
}

// ParseImage reads REPOSITORY@DIGEST, the repository as a client pulls it
// (registry host and path).
func ParseImage(s string) (Image, error) {
	at := strings.LastIndex(s, "@")
	if at <= 0 {
		return Image{}, fmt.Errorf("image %q is not REPOSITORY@DIGEST", s)
	}
	d, err := digest.Parse(s[at+1:])
	if err != nil {
		return Image{}, fmt.Errorf("image %q: digest: %v", s, err)
	}
	return Image{Repository: s[:at], Digest: d}, nil
}

// Facts are this node's facts.
func (n *Node) Facts() NodeFacts {
	used, blobs := n.o.Local.Usage()
	host, _ := os.Hostname()
	f := NodeFacts{
		ID: n.id, Hostname: host,
		OS: runtime.GOOS, Arch: runtime.GOARCH, Version: n.o.Version,
		CacheBudget: n.o.Local.Budget(), CacheUsed: used, CacheBlobs: blobs,
		Features: []string{FeatureFromHolder},
	}
	if runtime.GOARCH == "arm" {
		f.Variant = "v7"
	}
	var st syscall.Statfs_t
	if syscall.Statfs(n.o.DataDir, &st) == nil {
		f.DiskFree = int64(st.Bavail) * int64(st.Bsize)
	}
	for _, p := range n.pins.active(time.Now()) {
		f.PinnedBytes += p.Size
		f.Pins++
	}
	if n.o.Upstreams != nil {
		f.Upstreams = n.o.Upstreams()
		sort.Strings(f.Upstreams)
	}
	return f
}

func (n *Node) facts(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, n.Facts())
}

// resolve answers a tag's digest through this node's upstream (and its
// credentials, which stay here): GET /berth/v1/resolve?ref=REF.
func (n *Node) resolve(w http.ResponseWriter, r *http.Request) {
	ref := r.URL.Query().Get("ref")
	res, err := n.Resolve(r.Context(), ref)
	if err != nil {
		k := engine.KindOf(err)
		writeError(w, statusOfKind(k), ErrorCodeFailed, string(k), err.Error())
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// Resolve resolves a reference to a digest through the engine.
func (n *Node) Resolve(ctx context.Context, ref string) (Resolved, error) {
	repository, tag, dg, err := ParseReference(ref)
	if err != nil {
		return Resolved{}, err
	}
	registry, name, err := SplitRepository(repository, n.o.Engine.DefaultUpstream())
	if err != nil {
		return Resolved{}, err
	}
	repo, err := n.o.Engine.Resolve(registry, name)
	if err != nil {
		return Resolved{}, err
	}
	want := tag
	if dg != "" {
		want = dg.String()
	}
	m, err := n.o.Engine.Manifest(ctx, repo, want, nil)
	if err != nil {
		return Resolved{}, err
	}
	return Resolved{Ref: ref, Repository: repository, Digest: m.Digest, MediaType: m.MediaType}, nil
}

// ParseReference splits an image reference into its repository (registry
// host and path, Docker Hub's names normalised: alpine is
// docker.io/library/alpine), its tag (latest when neither tag nor digest
// is given) and its digest.
func ParseReference(ref string) (repository, tag string, d digest.Digest, err error) {
	named, err := reference.ParseNormalizedNamed(strings.TrimSpace(ref))
	if err != nil {
		return "", "", "", &engine.Error{Kind: engine.KindInvalidReference, Msg: fmt.Sprintf("%q is not an image reference: %v", ref, err)}
	}
	repository = named.Name()
	if t, ok := named.(reference.Tagged); ok {
		tag = t.Tag()
	}
	if c, ok := named.(reference.Canonical); ok {
		d = c.Digest()
	}
	if tag == "" && d == "" {
		tag = "latest"
	}
	return repository, tag, d, nil
}

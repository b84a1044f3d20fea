package coordinator

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
)

// RunOptions are one pre-warm across a set of nodes.
type RunOptions struct {
	Nodes  []string // node API base URLs
	Token  string   // bearer token for the nodes (admin token); never logged
	HTTP   *http.Client
	Images []Image // resolved, by digest
	// Platforms an index is expanded to; empty: each node's own.
	Platforms []string
	PinUntil  time.Time
	// Parallel is how many nodes fill their disks at once (after the
	// bucket is filled); <= 0: 4.
	Parallel int
	// Report is called with every change; it must not block for long.
	Report func(Progress)
	// SkipBucket skips the bucket phase (a single node, or a rerun).
	SkipBucket bool
}

// Phases of a run.
const (
	PhaseFacts  = "facts"
	PhaseBucket = "bucket"
	PhaseNode   = "node"
	PhaseDone   = "done"
)

// Progress is one change in a run, for one node.
type Progress struct {
	Node       string     `json:"node"`
	Phase      string     `json:"phase"`
	State      string     `json:"state"` // pending, running, succeeded, failed
	JobID      string     `json:"job,omitempty"`
	BytesDone  int64      `json:"bytes_done"`
	BytesTotal int64      `json:"bytes_total"`
	BlobsDone  int        `json:"blobs_done"`
	BlobsTotal int        `json:"blobs_total"`
	Error      *ErrorInfo `json:"error,omitempty"`
}

// NodeResult is how one node ended.
type NodeResult struct {
	// Node is the first of the run's URLs that reached the node.
	Node string `json:"node"`
	// ID is the node's ID (its facts), "" when it could not be asked or
	// is older than node IDs.
	ID string `json:"id,omitempty"`
	// Aliases are the run's other URLs that reached the same node (the
	// same ID): it was warmed once, under Node, and counts once.
	Aliases    []string      `json:"aliases,omitempty"`
	Platform   string        `json:"platform,omitempty"`
	State      string        `json:"state"` // succeeded, failed
	JobID      string        `json:"job,omitempty"`
	Images     int           `json:"images"`
	ImagesDone int           `json:"images_done"`
	BytesDone  int64         `json:"bytes_done"`
	BytesTotal int64         `json:"bytes_total"`
	Duration   time.Duration `json:"duration_ns"`
	Error      *ErrorInfo    `json:"error,omitempty"`
	// Failures names each image that failed on this node and why.
	Failures []string `json:"failures,omitempty"`
}

// RunResult is a whole run.
type RunResult struct {
	Nodes []NodeResult `json:"nodes"`
	// Seed is the node that filled the bucket, "" when none did.
	Seed string `json:"seed,omitempty"`
}

// Succeeded counts the nodes that warmed every image.
func (r RunResult) Succeeded() int {
	n := 0
	for _, x := range r.Nodes {
		if x.State == StateSucceeded {
			n++
		}
	}
	return n
}

// Run warms opts.Images on opts.Nodes: it asks every node for its facts
// (URLs that reach one node ID are one node: one result, with Aliases),
// has one node fetch every blob (the bucket fills: each blob crosses from
// the upstream once, under the fleet's lease), and once that node has
// every blob under way has every node fill its own disk from it, the
// bucket and its peers, opts.Parallel at a time. Every node gets a result;
// nothing stops at a node's failure.
func Run(ctx context.Context, o RunOptions) RunResult {
	if o.Parallel <= 0 {
		o.Parallel = 4
	}
	report := o.Report
	if report == nil {
		report = func(Progress) {}
	}
	var mu sync.Mutex
	safeReport := func(p Progress) {
		mu.Lock()
		defer mu.Unlock()
		report(p)
	}
	results := make([]NodeResult, len(o.Nodes))
	facts := make([]*NodeFacts, len(o.Nodes))
	var wg sync.WaitGroup
	for i, u := range o.Nodes {
		results[i] = NodeResult{Node: u, State: StatePending, Images: len(o.Images)}
		wg.Add(1)
		go func() {
			defer wg.Done()
			fctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			defer cancel()
			c := o.client(u)
			f, err := c.Facts(fctx)
			if err != nil {
				results[i].State, results[i].Error = StateFailed, infoOf(err)
				safeReport(Progress{Node: u, Phase: PhaseFacts, State: StateFailed, Error: infoOf(err)})
				return
			}
			facts[i] = &f
			results[i].ID, results[i].Platform = f.ID, f.Platform()
		}()
	}
	wg.Wait()
	// A node reached under several URLs is one node: warmed once, under
	// the first, and counted once by the completion policy.
	first := firstOfEachID(facts)
	for i, j := range first {
		if j != i {
			results[j].Aliases = append(results[j].Aliases, o.Nodes[i])
			facts[i] = nil
		}
	}

	platformsOf := func(i int) []string {
		if len(o.Platforms) > 0 {
			return o.Platforms
		}
		return []string{facts[i].Platform()}
	}
	var union []string
	for i := range o.Nodes {
		if facts[i] != nil {
			for _, p := range platformsOf(i) {
				if !slices.Contains(union, p) {
					union = append(union, p)
				}
			}
		}
	}
	sort.Strings(union)

	var res RunResult
	// The bucket first: one node fetches every blob of every platform, no
	// pin (the node's own pins come with its turn below). A seed that is
	// unreachable hands over to the next node. The other nodes start as
	// soon as the seed has every blob under way, and stream each from it
	// as it arrives (FromHolder): waiting for the whole image first would
	// add its transfer time to theirs.
	reachable := 0
	for i := range o.Nodes {
		if facts[i] != nil {
			reachable++
		}
	}
	var seed seedJob
	if !o.SkipBucket && reachable > 1 {
		for i, u := range o.Nodes {
			if facts[i] == nil || ctx.Err() != nil {
				continue
			}
			if err := o.seed(ctx, &wg, &seed, u, PrefetchRequest{Images: o.Images, Platforms: union}, safeReport); err != nil && err.Kind == "node_unreachable" {
				continue
			}
			res.Seed = u
			break
		}
	}

	sem := make(chan struct{}, o.Parallel)
	for i, u := range o.Nodes {
		if facts[i] == nil {
			continue
		}
		safeReport(Progress{Node: u, Phase: PhaseNode, State: StatePending})
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				results[i].State, results[i].Error = StateFailed, infoOf(ctx.Err())
				safeReport(Progress{Node: u, Phase: PhaseDone, State: StateFailed, Error: results[i].Error})
				return
			}
			defer func() { <-sem }()
			start := time.Now()
			req := PrefetchRequest{Images: o.Images, Platforms: platformsOf(i), PinUntil: o.PinUntil}
			if u != res.Seed && facts[i].has(FeatureFromHolder) {
				req.FromHolder = seed.fetching()
			}
			s, err := o.job(ctx, u, PhaseNode, req, safeReport, nil)
			r := &results[i]
			r.Duration = time.Since(start)
			r.JobID, r.BytesDone, r.BytesTotal = s.ID, s.BytesDone, s.BytesTotal
			for _, im := range s.Images {
				if im.State == StateDone {
					r.ImagesDone++
				} else if im.Error != nil {
					r.Failures = append(r.Failures, fmt.Sprintf("%s: %s: %s", im.Image, im.Error.Kind, im.Error.Message))
				}
			}
			switch {
			case err != nil:
				r.State, r.Error = StateFailed, err
			case s.State != StateSucceeded:
				r.State = StateFailed
				r.Error = s.Error
				if len(r.Failures) > 0 {
					r.Error = &ErrorInfo{Kind: firstKind(s), Message: strings.Join(r.Failures, "; ")}
				}
				if r.Error == nil {
					r.Error = &ErrorInfo{Kind: s.State, Message: "job " + s.State}
				}
			default:
				r.State = StateSucceeded
			}
			safeReport(Progress{Node: u, Phase: PhaseDone, State: r.State, JobID: s.ID, BytesDone: s.BytesDone, BytesTotal: s.BytesTotal, BlobsDone: s.BlobsDone, BlobsTotal: s.BlobsTotal, Error: r.Error})
		}()
	}
	wg.Wait()
	for i, r := range results {
		if first[i] == i {
			res.Nodes = append(res.Nodes, r)
		}
	}
	return res
}

// firstOfEachID maps each node to the first one with the same ID; a node
// without an ID (unreachable, or older than node IDs) is its own.
func firstOfEachID(facts []*NodeFacts) []int {
	first := make([]int, len(facts))
	seen := map[string]int{}
	for i, f := range facts {
		first[i] = i
		if f == nil || f.ID == "" {
			continue
		}
		if j, ok := seen[f.ID]; ok {
			first[i] = j
		} else {
			seen[f.ID] = i
		}
	}
	return first
}

func firstKind(s JobSnapshot) string {
	for _, im := range s.Images {
		if im.Error != nil {
			return im.Error.Kind
		}
	}
	return StateFailed
}

func (o RunOptions) client(u string) *Client {
	return &Client{Base: u, Token: o.Token, HTTP: o.HTTP}
}

// seedJob is the bucket phase's job as last seen.
type seedJob struct {
	mu   sync.Mutex
	snap JobSnapshot
}

// fetching lists the blobs the seed is fetching now: a node started now
// streams them from it (PrefetchRequest.FromHolder) and reads the rest
// from the bucket.
func (s *seedJob) fetching() []digest.Digest {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.snap.Terminal() {
		return nil
	}
	var out []digest.Digest
	for _, im := range s.snap.Images {
		for _, b := range im.Blobs {
			if b.State == StateRunning && !slices.Contains(out, b.Digest) {
				out = append(out, b.Digest)
			}
		}
	}
	return out
}

// seed starts the bucket phase's job on node u and returns once every
// blob of it is under way on u (or the job has ended, with its error);
// wg is done when the job ends.
func (o RunOptions) seed(ctx context.Context, wg *sync.WaitGroup, sj *seedJob, u string, req PrefetchRequest, report func(Progress)) *ErrorInfo {
	underWay := make(chan struct{})
	var once sync.Once
	ready := func() { once.Do(func() { close(underWay) }) }
	ended := make(chan *ErrorInfo, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		last, err := o.job(ctx, u, PhaseBucket, req, report, func(s JobSnapshot) {
			sj.mu.Lock()
			sj.snap = s
			sj.mu.Unlock()
			if allStarted(s) {
				ready()
			}
		})
		sj.mu.Lock()
		sj.snap = last
		sj.mu.Unlock()
		ended <- err
		ready()
	}()
	<-underWay
	select {
	case err := <-ended:
		return err
	default:
		return nil
	}
}

// allStarted reports whether no blob of the job waits to start.
func allStarted(s JobSnapshot) bool {
	for _, im := range s.Images {
		for _, b := range im.Blobs {
			if b.State == StatePending {
				return false
			}
		}
	}
	return true
}

// job runs one prefetch on a node and follows it to its end. A node whose
// event stream breaks is asked for the job's state once more; a run whose
// context ends cancels the node's job.
func (o RunOptions) job(ctx context.Context, u, phase string, req PrefetchRequest, report func(Progress), snap func(JobSnapshot)) (JobSnapshot, *ErrorInfo) {
	c := o.client(u)
	report(Progress{Node: u, Phase: phase, State: StateRunning})
	id, err := c.Prefetch(ctx, req)
	if err != nil {
		e := infoOf(err)
		report(Progress{Node: u, Phase: phase, State: StateFailed, Error: e})
		return JobSnapshot{}, e
	}
	s, err := c.Watch(ctx, id, func(s JobSnapshot) {
		if snap != nil {
			snap(s)
		}
		report(Progress{Node: u, Phase: phase, State: StateRunning, JobID: id, BytesDone: s.BytesDone, BytesTotal: s.BytesTotal, BlobsDone: s.BlobsDone, BlobsTotal: s.BlobsTotal})
	})
	if err != nil && ctx.Err() == nil {
		// The stream broke: the job may still have ended.
		gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if got, gerr := c.Job(gctx, id); gerr == nil && got.Terminal() {
			s, err = got, nil
		}
		cancel()
	}
	if ctx.Err() != nil {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = c.Cancel(cctx, id)
		cancel()
	}
	if err != nil {
		e := infoOf(err)
		report(Progress{Node: u, Phase: phase, State: StateFailed, JobID: id, Error: e})
		return s, e
	}
	st := StateSucceeded
	if s.State != StateSucceeded {
		st = StateFailed
	}
	report(Progress{Node: u, Phase: phase, State: st, JobID: id, BytesDone: s.BytesDone, BytesTotal: s.BytesTotal, BlobsDone: s.BlobsDone, BlobsTotal: s.BlobsTotal, Error: s.Error})
	return s, nil
}

package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/distribution/distribution/v3/notifications"
	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/auth"
	"github.com/berth-dev/berth/inspector/web"
	"github.com/berth-dev/berth/storage"
)

// Store is what the coordinator keeps in the fleet's bucket: its jobs (as
// small objects, listed) and the leases that give one coordinator at a
// time the right to run a job. storage.S3 and storage.Memory are Stores.
type Store interface {
	storage.Objects
	storage.ObjectLister
	storage.Leases
}

// ServiceOptions configure a coordinator.
type ServiceOptions struct {
	Store     Store
	Discovery Discovery
	// Interval is how often nodes are discovered again (and new ones
	// warmed with every pin in force); default 30s.
	Interval time.Duration
	// Poll is how often the bucket is checked for jobs to run; default 2s.
	Poll time.Duration
	// NodeToken is sent to the nodes (their admin token); never logged.
	NodeToken string
	// APITokens are accepted on the coordinator's own API; nil: loopback only.
	APITokens *auth.Tokens
	HTTP      *http.Client
	// LeaseTTL is how long a coordinator that stops renewing keeps a job
	// from the others; default 30s.
	LeaseTTL time.Duration
	Parallel int
	// Holder names this coordinator in its leases.
	Holder string
	// Warm on push: the registry name the nodes know the notifying
	// registry by (PushRegistry), which repositories and tags to warm
	// (PushRules; none: every push), and how long to pin them.
	PushRegistry string
	PushRules    []PushRule
	PushPin      time.Duration
	Log          *logrus.Entry
}

// JobSpec is a job as submitted: the same fields as berth prewarm's flags.
type JobSpec struct {
	Refs      []string  `json:"refs,omitempty"`
	Images    []Image   `json:"images,omitempty"` // already resolved (warm on push)
	Platforms []string  `json:"platforms,omitempty"`
	PinUntil  time.Time `json:"pin_until,omitzero"`
	Parallel  int       `json:"parallel,omitempty"`
	Require   string    `json:"require,omitempty"`
}

// JobRecord is a coordinator job as kept in the bucket.
type JobRecord struct {
	ID        string                `json:"id"`
	Source    string                `json:"source"` // api, push
	Spec      JobSpec               `json:"spec"`
	State     string                `json:"state"` // queued, running, succeeded, failed, canceled
	Created   time.Time             `json:"created"`
	Updated   time.Time             `json:"updated"`
	Finished  time.Time             `json:"finished,omitzero"`
	Attempts  int                   `json:"attempts"`
	Runner    string                `json:"runner,omitempty"` // the coordinator (its Holder) that runs or last ran it
	Images    []Image               `json:"images,omitempty"`
	RefErrors map[string]*ErrorInfo `json:"ref_errors,omitempty"`
	Progress  map[string]Progress   `json:"progress,omitempty"`
	Nodes     []NodeResult          `json:"nodes,omitempty"`
	Met       bool                  `json:"met"`
	Error     *ErrorInfo            `json:"error,omitempty"`
}

// clone copies the record's maps and slices, so that it can be read
// while the job's progress goes on.
func (r JobRecord) clone() JobRecord {
	r.Images = slices.Clone(r.Images)
	r.Nodes = slices.Clone(r.Nodes)
	if r.RefErrors != nil {
		m := make(map[string]*ErrorInfo, len(r.RefErrors))
		for k, v := range r.RefErrors {
			m[k] = v
		}
		r.RefErrors = m
	}
	if r.Progress != nil {
		m := make(map[string]Progress, len(r.Progress))
		for k, v := range r.Progress {
			m[k] = v
		}
		r.Progress = m
	}
	return r
}

// StateQueued is a job no coordinator has started.
const StateQueued = "queued"

// Terminal reports whether the job has ended.
func (r *JobRecord) Terminal() bool {
	return r.State == StateSucceeded || r.State == StateFailed || r.State == StateCanceled
}

const jobsPrefix = "prewarm/jobs/"

func jobObject(id string) string { return jobsPrefix + id + ".json" }
func jobLease(id string) string  { return "prewarm/jobs/" + id }

// Service is a running coordinator.
type Service struct {
	o    ServiceOptions
	kick chan struct{}

	mu      sync.Mutex
	running map[string]*runningJob
	nodes   []string
	// Nodes by their key (reached.key: the node ID, or the URL of a node
	// that has none), so that a node reached under a new address is not
	// warmed again.
	warmed  map[string]map[string]bool // node -> job ids it was warmed with
	warming map[string]bool            // node being warmed now
}

type runningJob struct {
	mu     sync.Mutex
	rec    JobRecord
	cancel context.CancelFunc
}

// NewService builds a coordinator; Run starts it.
func NewService(o ServiceOptions) *Service {
	if o.Interval <= 0 {
		o.Interval = 30 * time.Second
	}
	if o.Poll <= 0 {
		o.Poll = 2 * time.Second
	}
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = 30 * time.Second
	}
	if o.Log == nil {
		l := logrus.New()
		l.Out = discard{}
		o.Log = logrus.NewEntry(l)
	}
	return &Service{o: o, kick: make(chan struct{}, 1), running: map[string]*runningJob{}, warmed: map[string]map[string]bool{}, warming: map[string]bool{}}
}

// Run works until ctx ends: it runs the bucket's jobs that no other
// coordinator holds (resuming those whose coordinator died), and warms
// nodes that join with every pin in force.
func (s *Service) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.membership(ctx)
	}()
	t := time.NewTicker(s.o.Poll)
	defer t.Stop()
	for {
		s.claimJobs(ctx, &wg)
		select {
		case <-ctx.Done():
			wg.Wait()
			return
		case <-t.C:
		case <-s.kick:
		}
	}
}

func (s *Service) poke() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// Nodes lists the nodes found by the last discovery.
func (s *Service) Nodes() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.nodes)
}

func (s *Service) discover(ctx context.Context) ([]string, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	nodes, err := s.o.Discovery.Nodes(dctx)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.nodes = nodes
	s.mu.Unlock()
	return nodes, nil
}

// loadJobs reads every job record in the bucket.
func (s *Service) loadJobs(ctx context.Context) ([]JobRecord, error) {
	names, err := s.o.Store.ListObjects(ctx, jobsPrefix)
	if err != nil {
		return nil, err
	}
	var out []JobRecord
	for _, n := range names {
		b, err := s.o.Store.GetObject(ctx, n)
		if errors.Is(err, storage.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		var r JobRecord
		if err := json.Unmarshal(b, &r); err != nil {
			s.o.Log.WithError(err).WithField("object", n).Warn("coordinator: unreadable job record skipped")
			continue
		}
		out = append(out, r)
	}
	return out, nil
}

func (s *Service) getJob(ctx context.Context, id string) (JobRecord, error) {
	s.mu.Lock()
	rj := s.running[id]
	s.mu.Unlock()
	if rj != nil {
		rj.mu.Lock()
		defer rj.mu.Unlock()
		return rj.rec.clone(), nil
	}
	b, err := s.o.Store.GetObject(ctx, jobObject(id))
	if err != nil {
		return JobRecord{}, err
	}
	var r JobRecord
	return r, json.Unmarshal(b, &r)
}

func (s *Service) putJob(ctx context.Context, r JobRecord) error {
	r.Updated = time.Now().UTC()
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return s.o.Store.PutObject(ctx, jobObject(r.ID), b)
}

// Submit stores a new job; a coordinator (this one, usually) runs it.
func (s *Service) Submit(ctx context.Context, spec JobSpec, source string) (JobRecord, error) {
	if len(spec.Refs) == 0 && len(spec.Images) == 0 {
		return JobRecord{}, &ErrorInfo{Kind: "invalid_request", Message: "a job needs refs or images"}
	}
	if _, err := ParsePolicy(spec.Require); err != nil {
		return JobRecord{}, &ErrorInfo{Kind: "invalid_request", Message: err.Error()}
	}
	for _, p := range spec.Platforms {
		if err := ValidPlatform(p); err != nil {
			return JobRecord{}, &ErrorInfo{Kind: "invalid_request", Message: err.Error()}
		}
	}
	now := time.Now().UTC()
	r := JobRecord{ID: now.Format("20060102T150405Z") + "-" + newID(), Source: source, Spec: spec, State: StateQueued, Created: now}
	b, _ := json.Marshal(r)
	created, err := s.o.Store.CreateObject(ctx, jobObject(r.ID), b)
	if err != nil {
		return JobRecord{}, err
	}
	if !created {
		return JobRecord{}, fmt.Errorf("job %s exists already", r.ID)
	}
	s.o.Log.WithFields(logrus.Fields{"job": r.ID, "source": source, "refs": len(spec.Refs), "images": len(spec.Images)}).Info("coordinator: job submitted")
	s.poke()
	return r, nil
}

// Cancel marks a job canceled; the coordinator running it stops it.
func (s *Service) Cancel(ctx context.Context, id string) (JobRecord, error) {
	r, err := s.getJob(ctx, id)
	if err != nil {
		return r, err
	}
	if r.Terminal() {
		return r, nil
	}
	s.mu.Lock()
	rj := s.running[id]
	s.mu.Unlock()
	if rj != nil {
		rj.mu.Lock()
		rj.rec.State = StateCanceled
		r = rj.rec.clone()
		stop := rj.cancel
		rj.mu.Unlock()
		if stop != nil {
			stop()
		}
	}
	r.State = StateCanceled
	r.Finished = time.Now().UTC()
	return r, s.putJob(ctx, r)
}

// claimJobs starts every job that is not finished and whose lease it gets.
func (s *Service) claimJobs(ctx context.Context, wg *sync.WaitGroup) {
	jobs, err := s.loadJobs(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.o.Log.WithError(err).Warn("coordinator: cannot list jobs")
		}
		return
	}
	for _, r := range jobs {
		if r.Terminal() {
			continue
		}
		s.mu.Lock()
		_, mine := s.running[r.ID]
		s.mu.Unlock()
		if mine {
			continue
		}
		lease, err := s.o.Store.AcquireLease(ctx, jobLease(r.ID), s.o.LeaseTTL)
		if errors.Is(err, storage.ErrLeaseHeld) {
			continue
		}
		if err != nil {
			s.o.Log.WithError(err).WithField("job", r.ID).Warn("coordinator: cannot take a job's lease")
			continue
		}
		// Read again under the lease: another coordinator may have just
		// finished it.
		if b, err := s.o.Store.GetObject(ctx, jobObject(r.ID)); err == nil {
			_ = json.Unmarshal(b, &r)
		}
		if r.Terminal() {
			_ = lease.Release(ctx)
			continue
		}
		rj := &runningJob{rec: r}
		s.mu.Lock()
		s.running[r.ID] = rj
		s.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.runJob(ctx, rj, lease)
			s.mu.Lock()
			delete(s.running, r.ID)
			s.mu.Unlock()
		}()
	}
}

// runJob runs one job under its lease, renewing it; a lost lease or a
// cancel stops it.
func (s *Service) runJob(ctx context.Context, rj *runningJob, lease storage.Lease) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rj.mu.Lock()
	rj.cancel = cancel
	rj.mu.Unlock()
	lost := make(chan struct{})
	go func() {
		t := time.NewTicker(s.o.LeaseTTL / 3)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if err := lease.Renew(ctx); err != nil && ctx.Err() == nil {
				if errors.Is(err, storage.ErrLeaseLost) {
					s.o.Log.WithField("job", rj.rec.ID).Warn("coordinator: lost a job's lease; another coordinator runs it")
					close(lost)
					cancel()
					return
				}
				s.o.Log.WithError(err).Warn("coordinator: cannot renew a job's lease")
			}
			// A cancel written by another coordinator's API.
			if b, err := s.o.Store.GetObject(ctx, jobObject(rj.rec.ID)); err == nil {
				var r JobRecord
				if json.Unmarshal(b, &r) == nil && r.State == StateCanceled {
					rj.mu.Lock()
					rj.rec.State = StateCanceled
					rj.mu.Unlock()
					cancel()
				}
			}
		}
	}()
	log := s.o.Log.WithField("job", rj.rec.ID)
	rj.mu.Lock()
	rj.rec.Attempts++
	if rj.rec.State == StateRunning || lease.TookOver() {
		log = log.WithField("attempt", rj.rec.Attempts)
		log.Info("coordinator: resuming a job another coordinator left")
	}
	rj.rec.State = StateRunning
	rj.rec.Runner = s.o.Holder
	rec := rj.rec
	rj.mu.Unlock()
	log.WithField("attempt", rec.Attempts).Info("coordinator: running a job")
	save := func() {
		rj.mu.Lock()
		r := rj.rec.clone()
		rj.mu.Unlock()
		select {
		case <-lost:
			return // the job is someone else's now
		default:
		}
		sctx, c := context.WithTimeout(context.Background(), 10*time.Second)
		defer c()
		if err := s.putJob(sctx, r); err != nil {
			log.WithError(err).Warn("coordinator: cannot save the job")
		}
	}
	save()

	nodes, err := s.discover(ctx)
	fail := func(e *ErrorInfo) {
		rj.mu.Lock()
		if rj.rec.State != StateCanceled {
			rj.rec.State, rj.rec.Error = StateFailed, e
		}
		rj.rec.Finished = time.Now().UTC()
		rj.mu.Unlock()
		save()
		_ = lease.Release(context.Background())
	}
	if err != nil {
		fail(&ErrorInfo{Kind: "no_nodes", Message: err.Error()})
		return
	}
	if len(nodes) == 0 {
		fail(&ErrorInfo{Kind: "no_nodes", Message: "discovery found no nodes"})
		return
	}
	images := rec.Images
	if len(images) == 0 {
		images = append(images, rec.Spec.Images...)
		if len(rec.Spec.Refs) > 0 {
			got, bad := ResolveAll(ctx, rec.Spec.Refs, firstNodeResolver(nodes, s.o.NodeToken, s.o.HTTP))
			images = append(images, got...)
			rj.mu.Lock()
			rj.rec.RefErrors = bad
			rj.mu.Unlock()
		}
		rj.mu.Lock()
		rj.rec.Images = images
		rj.mu.Unlock()
		save()
	}
	if len(images) == 0 {
		fail(&ErrorInfo{Kind: "no_images", Message: "no image could be resolved"})
		return
	}
	var lastSave time.Time
	var saveMu sync.Mutex
	parallel := rec.Spec.Parallel
	if parallel <= 0 {
		parallel = s.o.Parallel
	}
	res := Run(ctx, RunOptions{
		Nodes: nodes, Token: s.o.NodeToken, HTTP: s.o.HTTP, Images: images, Platforms: rec.Spec.Platforms,
		PinUntil: rec.Spec.PinUntil, Parallel: parallel,
		Report: func(p Progress) {
			rj.mu.Lock()
			if rj.rec.Progress == nil {
				rj.rec.Progress = map[string]Progress{}
			}
			rj.rec.Progress[p.Node+" "+p.Phase] = p
			rj.mu.Unlock()
			saveMu.Lock()
			due := time.Since(lastSave) > time.Second
			if due {
				lastSave = time.Now()
			}
			saveMu.Unlock()
			if due {
				go save()
			}
		},
	})
	select {
	case <-lost:
		return
	default:
	}
	policy, _ := ParsePolicy(rec.Spec.Require)
	rj.mu.Lock()
	rj.rec.Nodes = res.Nodes
	rj.rec.Met = policy.Met(res.Succeeded(), len(res.Nodes)) && len(rj.rec.RefErrors) == 0
	switch {
	case rj.rec.State == StateCanceled:
	case ctx.Err() != nil: // the coordinator is stopping: leave it for the next one
		rj.mu.Unlock()
		_ = lease.Release(context.Background())
		return
	case rj.rec.Met:
		rj.rec.State = StateSucceeded
	default:
		rj.rec.State = StateFailed
	}
	rj.rec.Finished = time.Now().UTC()
	state := rj.rec.State
	rj.mu.Unlock()
	saveMu.Lock() // no late progress save after the final one
	lastSave = time.Now().Add(time.Hour)
	saveMu.Unlock()
	save()
	if state == StateSucceeded || state == StateFailed {
		for _, n := range res.Nodes {
			if n.State == StateSucceeded {
				s.markWarmed(n.key(), rec.ID)
			}
		}
	}
	_ = lease.Release(context.Background())
	log.WithFields(logrus.Fields{"state": state, "nodes": len(res.Nodes), "succeeded": res.Succeeded()}).Info("coordinator: job ended")
}

// firstNodeResolver resolves through the first node that answers.
func firstNodeResolver(nodes []string, token string, hc *http.Client) Resolver {
	return func(ctx context.Context, ref string) (Image, error) {
		var last error = &ErrorInfo{Kind: "no_nodes", Message: "no node to resolve through"}
		for _, n := range nodes {
			img, err := NodeResolver(&Client{Base: n, Token: token, HTTP: hc})(ctx, ref)
			var ei *ErrorInfo
			if err != nil && errors.As(err, &ei) && ei.Kind == "node_unreachable" {
				last = err
				continue
			}
			return img, err
		}
		return Image{}, last
	}
}

// membership discovers the nodes every Interval and warms each node that
// has not been warmed with every job whose pins are in force: nodes that
// joined, and every node when this coordinator starts.
func (s *Service) membership(ctx context.Context) {
	t := time.NewTicker(s.o.Interval)
	defer t.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		if nodes, err := s.discover(ctx); err != nil {
			if ctx.Err() == nil {
				s.o.Log.WithError(err).Warn("coordinator: node discovery failed")
			}
		} else if jobs, err := s.loadJobs(ctx); err == nil {
			now := time.Now()
			var pinned []JobRecord
			for _, j := range jobs {
				if (j.State == StateSucceeded || j.State == StateFailed) && j.Spec.PinUntil.After(now) && len(j.Images) > 0 {
					pinned = append(pinned, j)
				}
			}
			var members []reached
			if len(pinned) > 0 {
				members = s.reach(ctx, nodes)
			}
			for _, n := range members {
				k := n.key()
				var todo []JobRecord
				s.mu.Lock()
				busy := s.warming[k]
				for _, j := range pinned {
					if !s.warmed[k][j.ID] && !succeededOn(j, k) {
						todo = append(todo, j)
					}
				}
				if !busy && len(todo) > 0 {
					s.warming[k] = true
				}
				s.mu.Unlock()
				if busy || len(todo) == 0 {
					continue
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					s.warmNode(ctx, n.url, todo)
					s.mu.Lock()
					delete(s.warming, k)
					s.mu.Unlock()
				}()
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// succeededOn reports whether the job's record says the node (its key)
// was warmed.
func succeededOn(j JobRecord, key string) bool {
	for _, r := range j.Nodes {
		if r.key() == key && r.State == StateSucceeded {
			return true
		}
	}
	return false
}

// warmNode puts every pinned job's images on one node, each with its pin.
func (s *Service) warmNode(ctx context.Context, node string, jobs []JobRecord) {
	for _, j := range jobs {
		res := Run(ctx, RunOptions{Nodes: []string{node}, Token: s.o.NodeToken, HTTP: s.o.HTTP, Images: j.Images,
			Platforms: j.Spec.Platforms, PinUntil: j.Spec.PinUntil, SkipBucket: true})
		log := s.o.Log.WithFields(logrus.Fields{"node": node, "job": j.ID})
		if len(res.Nodes) == 1 && res.Nodes[0].State == StateSucceeded {
			s.markWarmed(res.Nodes[0].key(), j.ID)
			log.Info("coordinator: node warmed with a job's pins")
			continue
		}
		if len(res.Nodes) == 1 && res.Nodes[0].Error != nil && ctx.Err() == nil {
			log.WithField("error", res.Nodes[0].Error.Error()).Warn("coordinator: cannot warm a node; will retry")
		}
	}
}

func (s *Service) markWarmed(key, job string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.warmed[key] == nil {
		s.warmed[key] = map[string]bool{}
	}
	s.warmed[key][job] = true
}

// reached is one node as asked for its facts: the first URL that reached
// it, the other URLs that reached the same node ID, and its facts or why
// it could not be asked.
type reached struct {
	url     string
	aliases []string
	facts   *NodeFacts
	err     *ErrorInfo
}

// key is what the node is remembered by: its ID, or the URL of a node
// that gave none (unreachable, or older than node IDs).
func (r reached) key() string {
	if r.facts == nil {
		return r.url
	}
	return nodeKey(r.url, r.facts.ID)
}

func nodeKey(url, id string) string {
	if id != "" {
		return id
	}
	return url
}

func (r NodeResult) key() string { return nodeKey(r.Node, r.ID) }

// reach asks every URL for its node's facts, fleetParallel at a time, and
// returns one entry per node: URLs that reach one node ID are merged.
func (s *Service) reach(ctx context.Context, urls []string) []reached {
	all := make([]reached, len(urls))
	facts := make([]*NodeFacts, len(urls))
	forEach(len(urls), fleetParallel, func(i int) {
		fctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		all[i].url = urls[i]
		f, err := (&Client{Base: urls[i], Token: s.o.NodeToken, HTTP: s.o.HTTP}).Facts(fctx)
		if err != nil {
			all[i].err = infoOf(err)
			return
		}
		all[i].facts, facts[i] = &f, &f
	})
	var out []reached
	first := firstOfEachID(facts)
	for i, j := range first {
		if j != i {
			all[j].aliases = append(all[j].aliases, urls[i])
		}
	}
	for i, j := range first {
		if j == i {
			out = append(out, all[i])
		}
	}
	return out
}

// PushRule selects pushes to warm: a repository glob and an optional tag
// glob, where * matches any characters, / included.
type PushRule struct {
	Repo, Tag string
	repo, tag *regexp.Regexp
}

// ParsePushRule reads REPO_GLOB[:TAG_GLOB].
func ParsePushRule(s string) (PushRule, error) {
	repo, tag, _ := strings.Cut(s, ":")
	if repo == "" {
		return PushRule{}, fmt.Errorf("push rule %q: want REPOSITORY_GLOB[:TAG_GLOB]", s)
	}
	if tag == "" {
		tag = "*"
	}
	r := PushRule{Repo: repo, Tag: tag}
	r.repo = globRegexp(repo)
	r.tag = globRegexp(tag)
	return r, nil
}

func globRegexp(g string) *regexp.Regexp {
	parts := strings.Split(g, "*")
	for i := range parts {
		parts[i] = regexp.QuoteMeta(parts[i])
	}
	return regexp.MustCompile("^" + strings.Join(parts, ".*") + "$")
}

// Match reports whether a push of repo:tag is selected.
func (r PushRule) Match(repo, tag string) bool {
	return r.repo.MatchString(repo) && r.tag.MatchString(tag)
}

// notificationTypes are the envelope media types accepted (v1 is what the
// issue names; distribution v3 sends v2; the fields are the same).
var notificationTypes = []string{"application/vnd.docker.distribution.events.v1+json", notifications.EventsMediaType, "application/json"}

// Notify handles a distribution registry notification envelope: each push
// of a manifest by tag that a rule selects becomes a job, pinned for PushPin.
func (s *Service) Notify(ctx context.Context, body []byte) ([]string, error) {
	var env struct {
		Events []notifications.Event `json:"events"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		return nil, &ErrorInfo{Kind: "invalid_request", Message: "notification envelope: " + err.Error()}
	}
	var images []Image
	seen := map[string]bool{}
	for _, ev := range env.Events {
		tg := ev.Target
		if ev.Action != notifications.EventActionPush || tg.Tag == "" || !(IsImageManifest(tg.MediaType) || IsIndex(tg.MediaType)) {
			continue
		}
		selected := len(s.o.PushRules) == 0
		for _, r := range s.o.PushRules {
			if r.Match(tg.Repository, tg.Tag) {
				selected = true
				break
			}
		}
		if !selected || tg.Digest.Validate() != nil {
			continue
		}
		repository := tg.Repository
		if s.o.PushRegistry != "" {
			repository = s.o.PushRegistry + "/" + tg.Repository
		}
		img := Image{Repository: repository, Digest: digest.Digest(tg.Digest.String()), Ref: repository + ":" + tg.Tag}
		if k := img.Repository + "@" + img.Digest.String(); !seen[k] {
			seen[k] = true
			images = append(images, img)
		}
	}
	if len(images) == 0 {
		return nil, nil
	}
	spec := JobSpec{Images: images}
	if s.o.PushPin > 0 {
		spec.PinUntil = time.Now().Add(s.o.PushPin).UTC().Truncate(time.Second)
	}
	r, err := s.Submit(ctx, spec, "push")
	if err != nil {
		return nil, err
	}
	return []string{r.ID}, nil
}

// Handler is the coordinator's HTTP API and its fleet page (/ui/). Every
// request but the probes needs one of the API tokens (as a bearer token,
// or as the password of basic authentication, which a browser asks for),
// or comes from loopback when none is configured.
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /berth/v1/coordinator/jobs", s.httpSubmit)
	mux.HandleFunc("GET /berth/v1/coordinator/jobs", s.httpList)
	mux.HandleFunc("GET /berth/v1/coordinator/jobs/{id}", s.httpGet)
	mux.HandleFunc("DELETE /berth/v1/coordinator/jobs/{id}", s.httpCancel)
	mux.HandleFunc("GET /berth/v1/coordinator/jobs/{id}/events", s.httpEvents)
	mux.HandleFunc("POST /berth/v1/coordinator/notifications", s.httpNotify)
	mux.HandleFunc("GET /berth/v1/coordinator/nodes", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, 200, s.Nodes()) })
	mux.HandleFunc("GET /berth/v1/coordinator/fleet", s.httpFleet)
	mux.Handle("GET "+web.StaticPrefix, web.Static())
	mux.HandleFunc("GET /ui/{$}", s.pageFleet)
	mux.HandleFunc("GET /ui", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/ui/", http.StatusMovedPermanently) })
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, errcode.ErrorCodeUnsupported, "", "no such coordinator route: "+r.Method+" "+r.URL.Path)
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" || r.URL.Path == "/readyz" {
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write([]byte("ok\n"))
			return
		}
		// A browser sends the token as a password: the page is read
		// through the same door as the API.
		tok := takeToken(r, true)
		if ok, why := admit(s.o.APITokens, tok, r.RemoteAddr, "an API token is needed", "no API token is configured, so requests"); !ok {
			challenge := `Bearer realm="berth-coordinator"`
			if r.URL.Path == "/ui" || strings.HasPrefix(r.URL.Path, "/ui/") {
				challenge = `Basic realm="berth-coordinator", charset="UTF-8"` // a browser asks for it
			}
			refuse(w, r, s.o.Log.WithField("api", "coordinator"), challenge, why)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func (s *Service) storeError(w http.ResponseWriter, err error) {
	var ei *ErrorInfo
	switch {
	case errors.Is(err, storage.ErrNotFound):
		writeError(w, http.StatusNotFound, ErrorCodeJobUnknown, "not_found", "no such job")
	case errors.As(err, &ei) && ei.Kind == "invalid_request":
		writeError(w, http.StatusBadRequest, ErrorCodeInvalid, ei.Kind, ei.Message)
	default:
		writeError(w, http.StatusBadGateway, ErrorCodeFailed, "bucket_unavailable", err.Error())
	}
}

func (s *Service) httpSubmit(w http.ResponseWriter, r *http.Request) {
	var spec JobSpec
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		writeError(w, http.StatusBadRequest, ErrorCodeInvalid, "invalid_request", "job: "+err.Error())
		return
	}
	rec, err := s.Submit(r.Context(), spec, "api")
	if err != nil {
		s.storeError(w, err)
		return
	}
	writeJSON(w, http.StatusAccepted, PrefetchAccepted{ID: rec.ID})
}

func (s *Service) httpList(w http.ResponseWriter, r *http.Request) {
	jobs, err := s.loadJobs(r.Context())
	if err != nil {
		s.storeError(w, err)
		return
	}
	for i := range jobs {
		jobs[i].Progress = nil
	}
	writeJSON(w, http.StatusOK, jobs)
}

func (s *Service) httpGet(w http.ResponseWriter, r *http.Request) {
	rec, err := s.getJob(r.Context(), r.PathValue("id"))
	if err != nil {
		s.storeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, rec)
}

func (s *Service) httpCancel(w http.ResponseWriter, r *http.Request) {
	rec, err := s.Cancel(r.Context(), r.PathValue("id"))
	if err != nil {
		s.storeError(w, err)
		return
	}
	writeJSON(w, http.StatusAccepted, rec)
}

func (s *Service) httpEvents(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if _, err := s.getJob(r.Context(), id); err != nil {
		s.storeError(w, err)
		return
	}
	ServeSSE(w, r, func(ctx context.Context) (any, bool, <-chan struct{}) {
		rec, err := s.getJob(ctx, id)
		if err != nil {
			rec = JobRecord{ID: id, Error: infoOf(err)}
		}
		ch := make(chan struct{})
		time.AfterFunc(500*time.Millisecond, func() { close(ch) })
		return rec, rec.Terminal(), ch
	})
}

func (s *Service) httpNotify(w http.ResponseWriter, r *http.Request) {
	mt := strings.TrimSpace(strings.Split(r.Header.Get("Content-Type"), ";")[0])
	if mt != "" && !slices.Contains(notificationTypes, mt) {
		writeError(w, http.StatusUnsupportedMediaType, ErrorCodeInvalid, "invalid_request", "Content-Type "+mt+" is not a notification envelope ("+strings.Join(notificationTypes, ", ")+")")
		return
	}
	b := make([]byte, 0, 4096)
	buf := make([]byte, 32<<10)
	body := http.MaxBytesReader(w, r.Body, 8<<20)
	for {
		n, err := body.Read(buf)
		b = append(b, buf[:n]...)
		if err != nil {
			break
		}
	}
	ids, err := s.Notify(r.Context(), b)
	if err != nil {
		s.storeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"jobs": ids})
}

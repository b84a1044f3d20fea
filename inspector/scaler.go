package inspector

import (
	"math"
	"sort"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/storage"
)

// assumedFetchRate stands in for the measured rate until the node has
// fetched something: 10 MiB/s.
const assumedFetchRate = 10 << 20

// scaler keeps the figures an autoscaler reads: per pinned or watched
// image, the bytes this node lacks and the time fetching them would take.
type scaler struct {
	i *Inspector

	mu        sync.Mutex
	bytes     int64   // cached since the last sample
	sumBytes  float64 // bytes cached, decaying
	sumBusy   float64 // seconds with a download in flight, decaying alike
	rate      float64 // sumBytes / sumBusy; 0: not measured
	lastTick  time.Time
	configs   map[storage.Key]digest.Digest // config blob -> image manifest, for pinned images
	lastFeed  Feed
	lastBuilt time.Time
}

func newScaler(i *Inspector) *scaler {
	return &scaler{i: i, configs: map[storage.Key]digest.Digest{}, lastTick: time.Now()}
}

func (s *scaler) cached(n int64) {
	s.mu.Lock()
	s.bytes += n
	s.mu.Unlock()
}

// recorded remembers an image's config blob so a pin on it names the image.
func (s *scaler) recorded(r *Record) {
	if r.Image == nil {
		return
	}
	d, _ := digest.Parse(r.Digest)
	s.config(r.Upstream, r.Image.ConfigDigest, d)
}

// config remembers that manifest d names config blob ref.
func (s *scaler) config(upstream, ref string, d digest.Digest) {
	cd, err := digest.Parse(ref)
	if err != nil {
		return
	}
	s.mu.Lock()
	s.configs[storage.Key{Upstream: upstream, Digest: cd}] = d
	s.mu.Unlock()
}

// sample folds what was cached since the last tick into the rate: bytes
// over the time downloads were in flight, both decaying (half-life about
// 20 s of busy time) so the rate follows the link.
func (s *scaler) sample(now time.Time, downloads int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	el := now.Sub(s.lastTick).Seconds()
	s.lastTick = now
	n := s.bytes
	s.bytes = 0
	if el <= 0 || (n == 0 && downloads == 0) {
		return // idle: the link's speed is not being measured
	}
	decay := math.Pow(0.5, el/20)
	s.sumBytes = s.sumBytes*decay + float64(n)
	s.sumBusy = s.sumBusy*decay + el
	if s.sumBytes > 0 {
		s.rate = s.sumBytes / s.sumBusy
	}
}

func (s *scaler) run() {
	s.i.store.each(func(r *Record) { s.recorded(r) })
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	feed := time.NewTicker(5 * time.Second)
	defer feed.Stop()
	s.refresh()
	for {
		select {
		case <-s.i.life.Done():
			return
		case now := <-tick.C:
			s.sample(now, s.i.eng.Downloads())
		case <-feed.C:
			s.refresh()
		}
	}
}

// FeedImage is one pinned or watched image in the scaler feed.
type FeedImage struct {
	Image            string        `json:"image"` // upstream/repository:tag, or @digest for a pin without a tag
	Digest           string        `json:"digest"`
	Platform         string        `json:"platform,omitempty"`
	Watched          bool          `json:"watched"`
	Pinned           bool          `json:"pinned"`
	Bytes            int64         `json:"bytes"`         // config and layers of this node's platform
	MissingBytes     int64         `json:"missing_bytes"` // what this node's disk lacks of them
	ColdStartSeconds float64       `json:"cold_start_seconds"`
	Inspected        bool          `json:"inspected"` // false: sizes unknown until inspected
	Microscaling     *Microscaling `json:"microscaling,omitempty"`
}

// Feed is the scaler endpoint's body (docs/inspector.md shows KEDA's
// valueLocation for it).
type Feed struct {
	Images            []FeedImage `json:"images"`
	MissingBytes      int64       `json:"missing_bytes"` // summed over the images
	ColdStartSeconds  float64     `json:"cold_start_seconds"`
	FetchRate         float64     `json:"fetch_rate_bytes_per_second"`
	FetchRateMeasured bool        `json:"fetch_rate_measured"`
	InspectQueue      int         `json:"inspect_queue"`
	InspectWaiting    int         `json:"inspect_waiting"`
	InflightFetches   int         `json:"inflight_fetches"`
	PrewarmQueue      *int        `json:"prewarm_queue,omitempty"` // when pre-warm reports it
	Time              time.Time   `json:"time"`
}

// Feed computes the scaler feed now.
func (i *Inspector) Feed() Feed { return i.scaler.refresh() }

func (s *scaler) refresh() Feed {
	i := s.i
	s.mu.Lock()
	rate, measured := s.rate, s.rate > 0
	s.mu.Unlock()
	if !measured {
		rate = assumedFetchRate
	}
	f := Feed{Images: []FeedImage{}, FetchRate: rate, FetchRateMeasured: measured,
		InspectQueue: i.QueueLen(), InspectWaiting: i.Waiting(), InflightFetches: i.eng.Downloads(), Time: time.Now().UTC()}
	if i.o.PrewarmQueue != nil {
		n := i.o.PrewarmQueue()
		f.PrewarmQueue = &n
	}

	type target struct {
		repo    engine.Repo
		name    string
		d       digest.Digest
		watched bool
		pinned  bool
	}
	var targets []target
	for _, w := range i.cfg.Load().Inspector.Watch {
		host, name, _ := splitRepo(w.Repository)
		repo := engine.Repo{Upstream: host, Name: name}
		tags, _ := i.local.Tags(host, name)
		for _, tag := range matching(tags, w.Tags) {
			rec, err := i.local.GetTag(host, name, tag)
			if err != nil {
				continue
			}
			targets = append(targets, target{repo: repo, name: w.Repository + ":" + tag, d: rec.Digest, watched: true})
		}
	}
	s.mu.Lock()
	for k := range i.eng.Pinned() {
		if d, ok := s.configs[k]; ok {
			targets = append(targets, target{repo: engine.Repo{Upstream: k.Upstream}, name: k.Upstream + "@" + d.String(), d: d, pinned: true})
		}
	}
	s.mu.Unlock()

	i.metrics.missing.Reset()
	i.metrics.coldStart.Reset()
	seen := map[string]bool{}
	for _, t := range targets {
		if seen[t.name] {
			continue
		}
		seen[t.name] = true
		fi := FeedImage{Image: t.name, Digest: t.d.String(), Watched: t.watched, Pinned: t.pinned}
		var img *Image
		if rec, ok := i.store.get(t.repo.Upstream, t.d); ok {
			v := i.view(rec)
			img = v.Image
			if v.Index != nil {
				if p := nodePlatform(v); p != nil {
					img = p.Image
					fi.Platform = p.Platform()
				}
			}
			fi.Microscaling = v.Microscaling
			fi.Inspected = img != nil
		}
		if img == nil {
			// Not inspected here (the fleet's record is read when asked
			// for): the sizes are in the manifests on disk.
			img, fi.Platform = i.manifestImage(t.repo.Upstream, t.d)
		}
		if img != nil {
			// An image read from its manifest alone has no config, so no
			// platform to name: leave it out rather than say "unknown".
			if fi.Platform == "" && img.OS != "" {
				fi.Platform = img.Platform()
			}
			blobs := []struct {
				d    string
				size int64
			}{{img.ConfigDigest, img.ConfigSize}}
			for _, l := range img.Layers {
				blobs = append(blobs, struct {
					d    string
					size int64
				}{l.Digest, l.Size})
			}
			for _, b := range blobs {
				fi.Bytes += b.size
				bd, err := digest.Parse(b.d)
				if err != nil {
					continue
				}
				if _, ok := i.local.HasBlob(storage.Key{Upstream: t.repo.Upstream, Digest: bd}); !ok {
					fi.MissingBytes += b.size
				}
			}
		}
		fi.ColdStartSeconds = float64(fi.MissingBytes) / rate
		f.MissingBytes += fi.MissingBytes
		f.Images = append(f.Images, fi)
		i.metrics.missing.WithLabelValues(fi.Image).Set(float64(fi.MissingBytes))
		i.metrics.coldStart.WithLabelValues(fi.Image).Set(fi.ColdStartSeconds)
	}
	sort.Slice(f.Images, func(a, b int) bool { return f.Images[a].Image < f.Images[b].Image })
	f.ColdStartSeconds = float64(f.MissingBytes) / rate
	if measured {
		i.metrics.fetchRate.Set(rate)
	}
	s.mu.Lock()
	s.lastFeed, s.lastBuilt = f, time.Now()
	s.mu.Unlock()
	return f
}

// manifestImage reads an image's config and layers from the manifests on
// this host's disk, without its config: for an index, the platform this
// node would pull, which it names.
func (i *Inspector) manifestImage(upstream string, d digest.Digest) (*Image, string) {
	m, err := i.local.GetManifest(storage.Key{Upstream: upstream, Digest: d})
	if err != nil {
		return nil, ""
	}
	kind, err := kindOf(m.Content, m.MediaType)
	if err != nil {
		return nil, ""
	}
	if kind == KindIndex {
		idx, err := parseIndex(m.Content)
		if err != nil {
			return nil, ""
		}
		v := &View{}
		for _, e := range idx.Platforms {
			v.Platforms = append(v.Platforms, Platform{Entry: e})
		}
		p := nodePlatform(v)
		if p == nil {
			return nil, ""
		}
		pd, err := digest.Parse(p.Digest)
		if err != nil {
			return nil, ""
		}
		img, _ := i.manifestImage(upstream, pd)
		return img, p.Platform()
	}
	pm, err := parseManifest(m.Content)
	if err != nil {
		return nil, ""
	}
	return imageFromManifest(pm), ""
}

func splitRepo(s string) (host, name string, ok bool) {
	for k := 0; k < len(s); k++ {
		if s[k] == '/' {
			return s[:k], s[k+1:], true
		}
	}
	return s, "", false
}

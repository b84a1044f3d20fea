package coordinator

import (
	"context"
	"embed"
	"html/template"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/berth-dev/berth/inspector/web"
)

// FleetPin is one column of the fleet matrix: an image that jobs in force
// pin, with the platforms they asked for (none: each node's own).
type FleetPin struct {
	Image     Image     `json:"image"`
	Platforms []string  `json:"platforms,omitempty"`
	Until     time.Time `json:"until"` // the latest pin time of its jobs
	Jobs      []string  `json:"jobs"`
}

// FleetNode is one row of the fleet matrix: a discovered node (the first
// URL that reached it; Aliases, the other discovered URLs with the same
// node ID), its facts (nil when it could not be asked), and one cell per
// pin, in Fleet.Pins' order, each the node's own account of that image.
type FleetNode struct {
	Node    string        `json:"node"`
	Aliases []string      `json:"aliases,omitempty"`
	Facts   *NodeFacts    `json:"facts,omitempty"`
	Error   *ErrorInfo    `json:"error,omitempty"`
	Cells   []ImageWarmth `json:"cells"`
}

// Warm reports whether the node holds every pin.
func (n FleetNode) Warm() bool {
	if n.Error != nil {
		return false
	}
	for _, c := range n.Cells {
		if !c.Warm {
			return false
		}
	}
	return true
}

// Fleet is GET /berth/v1/coordinator/fleet: nodes × the pins in force.
type Fleet struct {
	Time      time.Time   `json:"time"`
	Pins      []FleetPin  `json:"pins"`
	Nodes     []FleetNode `json:"nodes"`
	WarmNodes int         `json:"warm_nodes"`
	// Error: the jobs or the nodes could not be listed.
	Error *ErrorInfo `json:"error,omitempty"`
}

// fleetParallel bounds the nodes asked at once for the fleet matrix.
const fleetParallel = 16

// fleetBatch bounds the images of one warm request (they go in its URL).
const fleetBatch = 50

// activePins are the images of the jobs whose pins are in force: jobs
// that ran (or run) with a pin time still ahead. A canceled job's pins
// were undone on the nodes.
func activePins(jobs []JobRecord, now time.Time) []FleetPin {
	byKey := map[string]*FleetPin{}
	for _, j := range jobs {
		if !j.Spec.PinUntil.After(now) || (j.State != StateRunning && j.State != StateSucceeded && j.State != StateFailed) {
			continue
		}
		plats := slices.Clone(j.Spec.Platforms)
		sort.Strings(plats)
		for _, img := range j.Images {
			k := img.Repository + "@" + img.Digest.String() + " " + strings.Join(plats, ",")
			p := byKey[k]
			if p == nil {
				p = &FleetPin{Image: img, Platforms: plats}
				byKey[k] = p
			}
			if p.Image.Ref == "" {
				p.Image.Ref = img.Ref
			}
			if j.Spec.PinUntil.After(p.Until) {
				p.Until = j.Spec.PinUntil
			}
			p.Jobs = append(p.Jobs, j.ID)
		}
	}
	out := make([]FleetPin, 0, len(byKey))
	for _, p := range byKey {
		out = append(out, *p)
	}
	sort.Slice(out, func(a, b int) bool {
		if out[a].Image.String() != out[b].Image.String() {
			return out[a].Image.String() < out[b].Image.String()
		}
		return strings.Join(out[a].Platforms, ",") < strings.Join(out[b].Platforms, ",")
	})
	return out
}

// Fleet asks every discovered node for its facts and how much of each pin
// in force it lacks. A node that cannot answer is a row with its error.
func (s *Service) Fleet(ctx context.Context) Fleet {
	f := Fleet{Time: time.Now().UTC(), Pins: []FleetPin{}, Nodes: []FleetNode{}}
	jobs, err := s.loadJobs(ctx)
	if err != nil {
		f.Error = &ErrorInfo{Kind: "bucket_unavailable", Message: "listing the jobs: " + err.Error()}
		return f
	}
	f.Pins = activePins(jobs, time.Now())
	nodes := s.Nodes()
	if nodes == nil {
		if nodes, err = s.discover(ctx); err != nil {
			f.Error = &ErrorInfo{Kind: "no_nodes", Message: "discovering the nodes: " + err.Error()}
			return f
		}
	}
	members := s.reach(ctx, nodes)
	f.Nodes = make([]FleetNode, len(members))
	forEach(len(members), fleetParallel, func(i int) { f.Nodes[i] = s.askNode(ctx, members[i], f.Pins) })
	for _, n := range f.Nodes {
		if n.Warm() {
			f.WarmNodes++
		}
	}
	return f
}

// askNode fills one row: the node's facts (asked already), then its
// warmth for the pins, asked in batches of the same platforms.
func (s *Service) askNode(ctx context.Context, node reached, pins []FleetPin) FleetNode {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	c := &Client{Base: node.url, Token: s.o.NodeToken, HTTP: s.o.HTTP}
	row := FleetNode{Node: node.url, Aliases: node.aliases, Facts: node.facts, Cells: make([]ImageWarmth, len(pins))}
	if node.err != nil {
		row.Error = node.err
		for i, p := range pins {
			row.Cells[i] = ImageWarmth{Image: p.Image, Error: row.Error}
		}
		return row
	}
	// Columns that share platforms go in one request.
	groups := map[string][]int{}
	var order []string
	for i, p := range pins {
		k := strings.Join(p.Platforms, ",")
		if groups[k] == nil {
			order = append(order, k)
		}
		groups[k] = append(groups[k], i)
	}
	for _, k := range order {
		idx := groups[k]
		for len(idx) > 0 {
			batch := idx[:min(len(idx), fleetBatch)]
			idx = idx[len(batch):]
			images := make([]Image, len(batch))
			for j, i := range batch {
				images[j] = pins[i].Image
			}
			st, err := c.WarmImages(ctx, images, pins[batch[0]].Platforms)
			if err == nil && len(st.Images) != len(batch) {
				err = &ErrorInfo{Kind: "bad_answer", Message: "the node answered for a different number of images"}
			}
			for j, i := range batch {
				if err != nil {
					row.Cells[i] = ImageWarmth{Image: pins[i].Image, Error: infoOf(err)}
					continue
				}
				row.Cells[i] = st.Images[j]
				row.Cells[i].Image = pins[i].Image // with its Ref, for the page
			}
		}
	}
	return row
}

//go:embed templates/fleet.html
var fleetFS embed.FS

var fleetPage = web.Parse("fleet", template.FuncMap{"join": strings.Join}, fleetFS, "templates/fleet.html")

// fleetNav is the coordinator's navigation bar: its one page.
var fleetNav = []web.Link{{Href: "/ui/", Text: "Fleet"}}

func (s *Service) pageFleet(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
	defer cancel()
	web.Render(w, http.StatusOK, fleetPage, struct {
		Title string
		Nav   []web.Link
		Data  Fleet
	}{"Fleet", fleetNav, s.Fleet(ctx)})
}

func (s *Service) httpFleet(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
	defer cancel()
	f := s.Fleet(ctx)
	status := http.StatusOK
	if f.Error != nil {
		status = http.StatusBadGateway
	}
	writeJSON(w, status, f)
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"

	"github.com/berth-dev/berth/auth"
	"github.com/berth-dev/berth/coordinator"
	"github.com/berth-dev/berth/inspector/web"
)

func init() {
	register("prewarm", "put a deploy's images on every node before it starts: exit 0 warm, 1 not (names the nodes), 2 bad usage", runPrewarm)
}

func runPrewarm(args []string) int {
	return prewarmMain(context.Background(), args, os.Stdin, os.Stdout, os.Stderr, isTerminal(os.Stdout))
}

// isTerminal reports whether f is a character device (a terminal).
func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// listFlag collects a repeatable, comma-separable flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// prewarmOptions are berth prewarm's flags.
type prewarmOptions struct {
	files       listFlag
	nodes       listFlag
	nodesFile   string
	nodesDNS    string
	nodesPort   int
	nodesScheme string
	dnsServer   string
	platforms   listFlag
	parallel    int
	require     string
	timeout     time.Duration
	pin         time.Duration
	output      string
	resolve     string
	tokenFile   string
	coordinator string
}

func prewarmFlags(o *prewarmOptions, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("berth prewarm", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Var(&o.files, "f", "read image references from `FILE`: Kubernetes manifests, a Compose file or one reference a line; - for stdin (repeatable)")
	fs.Var(&o.nodes, "nodes", "node API `URLS`, comma-separated: the nodes' fleet ports, e.g. http://10.0.3.7:5001 (repeatable)")
	fs.StringVar(&o.nodesFile, "nodes-file", "", "`FILE` of node URLs, one a line")
	fs.StringVar(&o.nodesDNS, "nodes-dns", "", "DNS `NAME` of the nodes: SRV records, or A/AAAA records with --nodes-port (a headless Service)")
	fs.IntVar(&o.nodesPort, "nodes-port", 0, "`PORT` of the nodes' fleet port, for --nodes-dns A/AAAA records")
	fs.StringVar(&o.nodesScheme, "nodes-scheme", "http", "`SCHEME` of nodes found by DNS or given as HOST:PORT: http or https")
	fs.StringVar(&o.dnsServer, "dns-server", "", "ask this DNS server (`HOST:PORT`) for --nodes-dns instead of the system's resolver")
	fs.Var(&o.platforms, "platform", "`OS/ARCH[/VARIANT]` to expand image indexes to, repeatable (default: each node's own)")
	fs.IntVar(&o.parallel, "parallel", 4, "at most `N` nodes fill their disks at once")
	fs.StringVar(&o.require, "require", "all", "`POLICY` for success: all, a node count N, or a percentage P%")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Minute, "give up after `DURATION`; unfinished nodes count as failed")
	fs.DurationVar(&o.pin, "pin", 0, "keep the images from eviction on every node for `DURATION` (default: no pin)")
	fs.StringVar(&o.output, "output", "auto", "`FORMAT`: auto (bars in a terminal, JSON lines otherwise), text or json")
	fs.StringVar(&o.resolve, "resolve", "node", "`MODE` of resolving tags to digests: node (through a node, with its upstream credentials) or direct (from this machine, with its Docker config)")
	fs.StringVar(&o.tokenFile, "token-file", os.Getenv("BERTH_PREWARM_TOKEN_FILE"), "`FILE` whose first token is sent to the nodes or the coordinator (their admin_token_file) [$BERTH_PREWARM_TOKEN_FILE]")
	fs.StringVar(&o.coordinator, "coordinator", "", "hand the job to the coordinator at `URL` and follow it there")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: berth prewarm [flags] [IMAGE...]\n\nResolves every image reference to a digest once, fills the fleet's bucket\nthrough one node and, once that node has every blob under way, has every\nnode put the images on its disk, streaming what it still fetches from it.\nURLs that reach one node (the same node ID) are one node: warmed once and\ncounted once by --require.\nExit status: 0 the --require policy is met, 1 it is not (the nodes and reasons\nare named), 2 bad usage.\n\nFlags:")
		fs.PrintDefaults()
	}
	return fs
}

func prewarmMain(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, tty bool) int {
	var o prewarmOptions
	fs := prewarmFlags(&o, stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	usage := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "berth prewarm: "+format+"\n", a...)
		return 2
	}
	// Every reference, from the arguments and the files.
	refs := append([]string(nil), fs.Args()...)
	for _, f := range o.files {
		var r io.Reader
		name := f
		if f == "-" {
			r, name = stdin, "stdin"
		} else {
			file, err := os.Open(f)
			if err != nil {
				return usage("%v", err)
			}
			defer file.Close()
			r = file
		}
		got, err := coordinator.ImageRefs(r, name)
		if err != nil {
			return usage("%v", err)
		}
		refs = append(refs, got...)
	}
	if len(refs) == 0 {
		return usage("no images: give references as arguments or -f FILE")
	}
	seen := map[string]bool{}
	uniq := refs[:0]
	for _, r := range refs {
		if !seen[r] {
			seen[r] = true
			uniq = append(uniq, r)
		}
	}
	refs = uniq
	policy, err := coordinator.ParsePolicy(o.require)
	if err != nil {
		return usage("%v", err)
	}
	for _, p := range o.platforms {
		if err := coordinator.ValidPlatform(p); err != nil {
			return usage("--platform: %v", err)
		}
	}
	switch {
	case o.parallel < 1:
		return usage("--parallel must be at least 1")
	case o.timeout <= 0:
		return usage("--timeout must be positive")
	case o.pin < 0:
		return usage("--pin must not be negative")
	case o.output != "auto" && o.output != "text" && o.output != "json":
		return usage("--output %q: auto, text or json", o.output)
	case o.resolve != "node" && o.resolve != "direct":
		return usage("--resolve %q: node or direct", o.resolve)
	case o.nodesScheme != "http" && o.nodesScheme != "https":
		return usage("--nodes-scheme %q: http or https", o.nodesScheme)
	case o.nodesPort < 0 || o.nodesPort > 65535:
		return usage("--nodes-port %d is not a port", o.nodesPort)
	}
	token := ""
	if o.tokenFile != "" {
		ts, err := auth.LoadTokens(o.tokenFile)
		if err != nil {
			return usage("--token-file: %v", err)
		}
		token = ts.Current()
	}
	json := o.output == "json" || (o.output == "auto" && !tty)
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	var pinUntil time.Time
	if o.pin > 0 {
		pinUntil = time.Now().Add(o.pin).UTC().Truncate(time.Second)
	}

	if o.coordinator != "" {
		if len(o.nodes) > 0 || o.nodesFile != "" || o.nodesDNS != "" {
			return usage("--coordinator finds the nodes itself: no --nodes, --nodes-file or --nodes-dns with it")
		}
		return prewarmViaCoordinator(ctx, o, refs, token, pinUntil, policy, json, stdout, stderr)
	}

	disc := coordinator.Discovery{Static: o.nodes, File: o.nodesFile, DNSName: o.nodesDNS, Port: o.nodesPort, Scheme: o.nodesScheme}
	if disc.Empty() {
		return usage("no nodes: give --nodes, --nodes-file, --nodes-dns or --coordinator")
	}
	if o.dnsServer != "" {
		if _, _, err := net.SplitHostPort(o.dnsServer); err != nil {
			return usage("--dns-server %q is not HOST:PORT", o.dnsServer)
		}
		disc.Resolver = resolverAt(o.dnsServer)
	}
	nodes, err := disc.Nodes(ctx)
	if err != nil {
		return usage("%v", err)
	}
	if len(nodes) == 0 {
		return usage("no nodes found")
	}
	out := newPrewarmOutput(json, stdout, nodes)

	// Tags to digests, once, before any node starts.
	var resolve coordinator.Resolver
	if o.resolve == "direct" {
		resolve = coordinator.DirectResolver()
	} else {
		resolve = firstNodeResolver(nodes, token)
	}
	images, badRefs := coordinator.ResolveAll(ctx, refs, resolve)
	out.resolved(refs, images, badRefs)

	var res coordinator.RunResult
	if len(images) > 0 {
		out.start()
		res = coordinator.Run(ctx, coordinator.RunOptions{
			Nodes: nodes, Token: token, Images: images, Platforms: o.platforms,
			PinUntil: pinUntil, Parallel: o.parallel, Report: out.progress,
		})
		out.stop()
	} else {
		for _, n := range nodes {
			res.Nodes = append(res.Nodes, coordinator.NodeResult{Node: n, State: coordinator.StateFailed, Error: &coordinator.ErrorInfo{Kind: "no_images", Message: "no image could be resolved"}})
		}
	}
	return finish(out, res.Nodes, badRefs, policy, stderr)
}

// finish prints the summary and decides the exit status.
func finish(out *prewarmOutput, nodes []coordinator.NodeResult, badRefs map[string]*coordinator.ErrorInfo, policy coordinator.Policy, stderr io.Writer) int {
	ok := 0
	for _, n := range nodes {
		if n.State == coordinator.StateSucceeded {
			ok++
		}
	}
	met := policy.Met(ok, len(nodes)) && len(badRefs) == 0
	out.summary(nodes, policy, ok, met)
	if met {
		return 0
	}
	var why []string
	for ref, e := range badRefs {
		why = append(why, fmt.Sprintf("image %s: %s: %s", ref, e.Kind, e.Message))
	}
	sort.Strings(why)
	for _, n := range nodes {
		if n.State != coordinator.StateSucceeded && n.Error != nil {
			why = append(why, fmt.Sprintf("node %s: %s: %s", n.Node, n.Error.Kind, n.Error.Message))
		}
	}
	fmt.Fprintf(stderr, "berth prewarm: --require %s not met: %d of %d nodes warm", policy, ok, len(nodes))
	if u := urls(nodes); u != len(nodes) {
		fmt.Fprintf(stderr, " (%d URLs, the same node's counted once)", u)
	}
	fmt.Fprintln(stderr)
	for _, w := range why {
		fmt.Fprintln(stderr, "  "+w)
	}
	return 1
}

// firstNodeResolver resolves through the first node that answers.
func firstNodeResolver(nodes []string, token string) coordinator.Resolver {
	var mu sync.Mutex
	return func(ctx context.Context, ref string) (coordinator.Image, error) {
		var last error
		for _, n := range nodes {
			img, err := coordinator.NodeResolver(&coordinator.Client{Base: n, Token: token})(ctx, ref)
			if err == nil {
				return img, nil
			}
			var ei *coordinator.ErrorInfo
			if errors.As(err, &ei) && ei.Kind == "node_unreachable" {
				mu.Lock()
				last = err
				mu.Unlock()
				continue
			}
			return img, err
		}
		return coordinator.Image{}, last
	}
}

// resolverAt is a DNS resolver that asks server (HOST:PORT).
func resolverAt(server string) *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, server)
	}}
}

// prewarmOutput shows a run: bars in a terminal, JSON lines otherwise.
type prewarmOutput struct {
	json  bool
	w     io.Writer
	mu    sync.Mutex
	enc   *json.Encoder
	nodes []string
	p     *mpb.Progress
	bars  map[string]*mpb.Bar
	width int
	last  map[string]time.Time
}

func newPrewarmOutput(jsonOut bool, w io.Writer, nodes []string) *prewarmOutput {
	return &prewarmOutput{json: jsonOut, w: w, enc: json.NewEncoder(w), nodes: nodes, bars: map[string]*mpb.Bar{}, last: map[string]time.Time{}}
}

func (o *prewarmOutput) event(v map[string]any) {
	v["time"] = time.Now().UTC().Format(time.RFC3339Nano)
	o.mu.Lock()
	defer o.mu.Unlock()
	_ = o.enc.Encode(v)
}

func (o *prewarmOutput) resolved(refs []string, images []coordinator.Image, bad map[string]*coordinator.ErrorInfo) {
	for _, img := range images {
		if o.json {
			o.event(map[string]any{"event": "resolved", "ref": img.Ref, "repository": img.Repository, "digest": img.Digest})
		} else {
			fmt.Fprintf(o.w, "%s -> %s@%s\n", img.Ref, img.Repository, img.Digest)
		}
	}
	for _, r := range refs {
		if e, ok := bad[r]; ok {
			if o.json {
				o.event(map[string]any{"event": "resolve_failed", "ref": r, "error": e})
			} else {
				fmt.Fprintf(o.w, "%s: %s: %s\n", r, e.Kind, e.Message)
			}
		}
	}
}

func (o *prewarmOutput) start() {
	if o.json {
		return
	}
	o.p = mpb.New(mpb.WithOutput(o.w), mpb.WithWidth(40), mpb.WithRefreshRate(150*time.Millisecond))
	o.width = len("bucket")
	for _, n := range o.nodes {
		o.width = max(o.width, len(n))
	}
}

// bar is the bar of key ("bucket" or a node), made when first needed, so
// bars come in the order the run reaches them.
func (o *prewarmOutput) bar(key string) *mpb.Bar {
	if b := o.bars[key]; b != nil {
		return b
	}
	b := o.p.AddBar(0,
		mpb.PrependDecorators(decor.Name(key, decor.WC{W: o.width + 1, C: decor.DindentRight}), decor.CountersKibiByte("% .1f / % .1f", decor.WC{W: 24})),
		mpb.AppendDecorators(decor.Percentage(decor.WC{W: 5}), decor.Name(" ETA "), decor.AverageETA(decor.ET_STYLE_GO)),
		mpb.BarFillerOnAbort(" failed"),
	)
	o.bars[key] = b
	return b
}

func (o *prewarmOutput) stop() {
	if o.p == nil {
		return
	}
	for _, b := range o.bars {
		if !b.AbortedOrCompleted() {
			b.Abort(false)
		}
	}
	o.p.Wait()
}

func (o *prewarmOutput) progress(p coordinator.Progress) {
	if o.json {
		// Every state change; running progress at most 5 times a second per node.
		key := p.Node + "/" + p.Phase
		if p.State == coordinator.StateRunning && p.BytesTotal > 0 && p.BytesDone < p.BytesTotal {
			o.mu.Lock()
			recent := time.Since(o.last[key]) < 200*time.Millisecond
			if !recent {
				o.last[key] = time.Now()
			}
			o.mu.Unlock()
			if recent {
				return
			}
		}
		ev := map[string]any{"event": "progress", "node": p.Node, "phase": p.Phase, "state": p.State,
			"bytes_done": p.BytesDone, "bytes_total": p.BytesTotal, "blobs_done": p.BlobsDone, "blobs_total": p.BlobsTotal}
		if p.JobID != "" {
			ev["job"] = p.JobID
		}
		if p.Error != nil {
			ev["error"] = p.Error
		}
		o.event(ev)
		return
	}
	key := p.Node
	if p.Phase == coordinator.PhaseBucket {
		key = "bucket"
	}
	if o.p == nil {
		return
	}
	b := o.bar(key)
	if b.AbortedOrCompleted() {
		return
	}
	if p.BytesTotal > 0 {
		b.SetTotal(p.BytesTotal, false)
		b.SetCurrent(p.BytesDone)
	}
	switch {
	case p.State == coordinator.StateFailed:
		b.Abort(false)
	case p.State == coordinator.StateSucceeded && (p.Phase == coordinator.PhaseDone || p.Phase == coordinator.PhaseBucket):
		b.SetTotal(-1, true)
	}
}

func (o *prewarmOutput) summary(nodes []coordinator.NodeResult, policy coordinator.Policy, ok int, met bool) {
	if o.json {
		for _, n := range nodes {
			ev := map[string]any{"event": "result", "node": n.Node, "state": n.State, "platform": n.Platform, "images": n.Images, "images_done": n.ImagesDone,
				"bytes": n.BytesDone, "seconds": n.Duration.Seconds(), "error": n.Error, "failures": n.Failures}
			if n.ID != "" {
				ev["id"] = n.ID
			}
			if len(n.Aliases) > 0 {
				ev["aliases"] = n.Aliases
			}
			o.event(ev)
		}
		o.event(map[string]any{"event": "summary", "require": policy.String(), "nodes": len(nodes), "urls": urls(nodes), "succeeded": ok, "met": met})
		return
	}
	tw := tabwriter.NewWriter(o.w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tIMAGES\tBYTES\tTIME\tRESULT")
	for _, n := range nodes {
		result := n.State
		if n.Error != nil {
			result += ": " + n.Error.Kind
		}
		fmt.Fprintf(tw, "%s\t%d/%d\t%s\t%s\t%s\n", n.Node, n.ImagesDone, n.Images, web.Bytes(n.BytesDone), n.Duration.Round(100*time.Millisecond), result)
	}
	tw.Flush()
	for _, n := range nodes {
		if len(n.Aliases) > 0 {
			fmt.Fprintf(o.w, "%s is also %s (node ID %s): warmed and counted once\n", n.Node, strings.Join(n.Aliases, ", "), n.ID)
		}
	}
	verdict := "met"
	if !met {
		verdict = "NOT met"
	}
	merged := ""
	if u := urls(nodes); u != len(nodes) {
		merged = fmt.Sprintf(" (%d URLs)", u)
	}
	fmt.Fprintf(o.w, "%d of %d nodes warm%s; --require %s %s\n", ok, len(nodes), merged, policy, verdict)
}

// urls counts the node URLs behind the results: URLs that reached one
// node ID are one result.
func urls(nodes []coordinator.NodeResult) int {
	n := 0
	for _, r := range nodes {
		n += 1 + len(r.Aliases)
	}
	return n
}

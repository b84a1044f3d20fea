// Command bench measures berth beside the distribution registry in proxy
// mode (and nginx for serving hot blobs) on this machine, against one
// upstream registry behind a throttled link, and prints the results as a
// table with the goals berth sets itself. Run it from the repository root:
//
//	go run ./bench            # everything, about ten minutes
//	go run ./bench -quick     # smaller sizes, a minute or two
//	go run ./bench -h         # scenarios, sizes and rates
//
// See bench/README.md for what each row means and the last measured table.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/internal/testsupport"
)

type options struct {
	scenarios []string
	rate      int64 // bytes per second on the upstream link; 0 is unlimited
	fleetRate int64 // the same, in the fleet scenario
	layers    int
	layerSize int64
	pullNs    []int
	wallN     int
	reps      int
	bigSize   int64
	cpuConc   int
	cpuReads  int
	rssConc   int
	hangCap   time.Duration
	tagTTL    time.Duration
	leaseTTL  time.Duration // berth's --s3-lease-ttl in the fleet's lease-renewal round
	timeout   time.Duration
	workDir   string
	keep      bool
	verbose   bool
	perfDir   string

	prewarmNodes, prewarmScale int   // nodes of the prewarm scenario's main and scale rounds
	prewarmSmall               int64 // layer size of the scale round's image

	berthBin, registryBin, nginxBin, minioBin string
}

// allScenarios in the order they run. A scenario is a function over the
// shared bench (upstream, link, content) adding rows to the table.
var allScenarios = []struct {
	name, help string
	run        func(*bench, context.Context) error
}{
	{"pulls", "concurrent cold pulls: upstream bytes ÷ image bytes, and wall time", (*bench).scenarioPulls},
	{"cpu", "server CPU per GiB of hot blobs, beside nginx with sendfile", (*bench).scenarioCPU},
	{"rss", "berth's peak RSS while many clients stream one big blob, cold and hot", (*bench).scenarioRSS},
	{"hang", "pull of a cached tag while the upstream hangs", (*bench).scenarioHang},
	{"fleet", "three hosts sharing one S3 bucket (MinIO), ten cold pulls on each", (*bench).scenarioFleet},
	{"stall", "concurrent cold pulls while the upstream stalls once in the middle of every layer", (*bench).scenarioStall},
	{"prewarm", "berth prewarm onto N nodes on one bucket, beside each node pulling the image itself; then many nodes with a small image, by the CLI and by a coordinator", (*bench).scenarioPrewarm},
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "bench:", err)
		}
		os.Exit(1)
	}
}

// sizeFlag takes sizes like 32MiB, 1GiB or 100MB, as berth's own flags do.
type sizeFlag struct{ n *int64 }

func (s sizeFlag) String() string {
	if s.n == nil || *s.n < 0 { // unset: the usage text says what the default is
		return ""
	}
	return strconv.FormatInt(*s.n, 10)
}

func (s sizeFlag) Set(v string) error {
	n, err := config.ParseSize(v)
	if err != nil {
		return err
	}
	*s.n = n
	return nil
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	o := options{}
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var scen, ns string
	quick := fs.Bool("quick", false, "smaller sizes and fewer repetitions for a fast smoke run (flags given explicitly still win)")
	var names []string
	for _, s := range allScenarios {
		names = append(names, s.name)
	}
	fs.StringVar(&scen, "scenarios", strings.Join(names, ","), "comma-separated scenarios to run: "+strings.Join(names, ", "))
	o.rate = 100_000_000
	fs.Var(sizeFlag{&o.rate}, "rate", "bandwidth of the upstream link per second, e.g. 100MB or 1GiB; 0 for unlimited")
	o.fleetRate = -1
	fs.Var(sizeFlag{&o.fleetRate}, "fleet-rate", "bandwidth of the upstream link in the fleet scenario (default: -rate ÷ 3, as its three hosts share this machine's CPU; see bench/README.md)")
	fs.IntVar(&o.layers, "layers", 3, "layers in the test image")
	o.layerSize = 32 << 20
	fs.Var(sizeFlag{&o.layerSize}, "layer-size", "bytes of random data per layer")
	fs.StringVar(&ns, "ns", "1,20,100", "numbers of concurrent cold pulls to measure upstream bytes for")
	fs.IntVar(&o.wallN, "wall-n", 20, "concurrent cold pulls whose wall time is compared with one pull's")
	fs.IntVar(&o.reps, "reps", 3, "repetitions of each timing measurement (medians are reported)")
	o.bigSize = 1 << 30
	fs.Var(sizeFlag{&o.bigSize}, "big", "size of the blob for the cpu and rss scenarios")
	fs.IntVar(&o.cpuConc, "cpu-clients", 8, "concurrent clients reading the hot blob in the cpu scenario")
	fs.IntVar(&o.cpuReads, "cpu-reads", 1, "times each client reads the hot blob per repetition")
	fs.IntVar(&o.rssConc, "rss-clients", 50, "concurrent clients streaming the big blob in the rss scenario")
	fs.DurationVar(&o.hangCap, "hang-cap", 60*time.Second, "give up on a pull from a hung upstream after this long")
	fs.DurationVar(&o.tagTTL, "tag-ttl", time.Second, "berth's --tag-ttl in the hang scenario (expired before each pull)")
	fs.DurationVar(&o.leaseTTL, "lease-ttl", 15*time.Second, "berth's --s3-lease-ttl in the fleet scenario's lease-renewal round, which holds leases across two renewals (every third of it)")
	fs.IntVar(&o.prewarmNodes, "prewarm-nodes", 8, "nodes berth prewarm warms in the prewarm scenario")
	fs.IntVar(&o.prewarmScale, "prewarm-scale", 50, "nodes of the prewarm scenario's scale round (small image)")
	o.prewarmSmall = 1 << 20
	fs.Var(sizeFlag{&o.prewarmSmall}, "prewarm-small", "layer size of the prewarm scale round's image")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Minute, "abort the whole run after this long")
	fs.StringVar(&o.workDir, "work", "", "work directory (default: a new temporary directory)")
	fs.BoolVar(&o.keep, "keep", false, "keep the work directory (logs, caches) afterwards")
	fs.StringVar(&o.perfDir, "perf", "", "record perf CPU profiles of berth's measurements into `DIR`")
	fs.BoolVar(&o.verbose, "v", false, "more progress output, registry logs at info")
	fs.StringVar(&o.berthBin, "berth", "", "berth binary (default: built from this checkout)")
	fs.StringVar(&o.registryBin, "registry", "", "distribution registry binary (default: ./bin/registry, then PATH)")
	fs.StringVar(&o.nginxBin, "nginx", "", "nginx binary (default: PATH, then /usr/sbin)")
	fs.StringVar(&o.minioBin, "minio", "", "MinIO binary (default: ./bin/minio, then PATH)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: go run ./bench [flags]\n\nMeasures berth beside the distribution registry in proxy mode and nginx; prints a table.\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if *quick {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		for k, v := range map[string]string{
			"layer-size": "4MiB", "ns": "1,20", "reps": "2", "big": "128MiB", "cpu-clients": "4",
			"rss-clients": "20", "hang-cap": "10s", "lease-ttl": "3s", "prewarm-nodes": "4", "prewarm-scale": "8", "prewarm-small": "256KiB",
		} {
			if !set[k] {
				if err := fs.Set(k, v); err != nil {
					return o, err
				}
			}
		}
	}
	for _, s := range strings.Split(scen, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !slices.Contains(names, s) {
			return o, fmt.Errorf("unknown scenario %q (have %s)", s, strings.Join(names, ", "))
		}
		o.scenarios = append(o.scenarios, s)
	}
	for _, s := range strings.Split(ns, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			return o, fmt.Errorf("-ns: %q is not a positive number", s)
		}
		o.pullNs = append(o.pullNs, n)
	}
	switch {
	case o.layers < 1 || o.layerSize < 1 || o.bigSize < 1:
		return o, errors.New("-layers, -layer-size and -big must be positive")
	case o.wallN < 1 || o.reps < 1 || o.cpuConc < 1 || o.cpuReads < 1 || o.rssConc < 1:
		return o, errors.New("-wall-n, -reps, -cpu-clients, -cpu-reads and -rss-clients must be positive")
	case o.prewarmNodes < 1 || o.prewarmScale < 1 || o.prewarmSmall < 1:
		return o, errors.New("-prewarm-nodes, -prewarm-scale and -prewarm-small must be positive")
	case o.leaseTTL < 3*time.Second:
		return o, errors.New("-lease-ttl must be at least 3s (S3 times come in whole seconds)")
	case o.rate < 0:
		return o, errors.New("-rate must not be negative")
	case o.fleetRate < -1:
		return o, errors.New("-fleet-rate must not be negative")
	}
	if o.fleetRate == -1 {
		o.fleetRate = o.rate / fleetHosts
	}
	return o, nil
}

// bench is one run: the upstream, the link in front of it, the content in it
// and the results so far.
type bench struct {
	opt      options
	root     string // the repository
	work     string
	log      io.Writer
	seq      int
	procs    []*proc
	up       *server
	link     *testsupport.Proxy // the uplink between the mirrors and the upstream: rate-limited, counting, hangable
	image    testImage
	big      *bigBlob
	s3       *s3Env
	table    *table
	started  time.Time
	failures []string
}

// logf may be called from concurrent pulls; the log is written whole lines at a time.
func (b *bench) logf(format string, a ...any) {
	line := fmt.Sprintf("[%6.1fs] %s\n", time.Since(b.started).Seconds(), fmt.Sprintf(format, a...))
	logMu.Lock()
	defer logMu.Unlock()
	io.WriteString(b.log, line)
}

var logMu sync.Mutex

func run(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	opt, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, opt.timeout)
	defer cancel()
	b := &bench{opt: opt, log: stderr, table: newTable(), started: time.Now()}
	if b.root, err = moduleRoot(); err != nil {
		return err
	}
	if opt.workDir == "" {
		if b.work, err = os.MkdirTemp("", "berth-bench-"); err != nil {
			return err
		}
	} else {
		b.work = opt.workDir
		if err := os.MkdirAll(b.work, 0o755); err != nil {
			return err
		}
	}
	defer func() {
		b.stopAll()
		if b.link != nil {
			b.link.Close()
		}
		if b.s3 != nil {
			b.s3.counter.close()
		}
		if opt.keep || err != nil {
			fmt.Fprintf(stderr, "work directory (logs): %s\n", b.work)
		} else if opt.workDir == "" {
			os.RemoveAll(b.work)
		}
	}()
	if err := b.tools(ctx); err != nil {
		return err
	}
	if b.up, err = b.startUpstream(ctx); err != nil {
		return err
	}
	if b.link, err = testsupport.NewProxy(b.up.addr, opt.rate); err != nil {
		return err
	}
	b.logf("upstream %s behind link %s at %s", b.up.addr, b.link.Addr, rateString(opt.rate))
	var scenErr error
	for _, s := range allScenarios {
		if !slices.Contains(opt.scenarios, s.name) {
			continue
		}
		b.logf("scenario %s: %s", s.name, s.help)
		if err := s.run(b, ctx); err != nil {
			scenErr = fmt.Errorf("scenario %s: %w", s.name, err)
			break
		}
	}
	// What was measured before an error or an interrupt is still worth seeing.
	link := rateString(opt.rate)
	if slices.Contains(opt.scenarios, "fleet") && opt.fleetRate != opt.rate {
		link += " (fleet: " + rateString(opt.fleetRate) + ")"
	}
	fmt.Fprintf(stdout, "\nberth benchmark, %s, upstream link %s, %d CPUs, %.0f s\n\n",
		time.Now().Format("2006-01-02 15:04"), link, numCPU(), time.Since(b.started).Seconds())
	b.table.write(stdout)
	if scenErr != nil {
		return scenErr
	}
	if len(b.failures) > 0 {
		fmt.Fprintln(stdout, "\nfailed measurements:")
		for _, f := range b.failures {
			fmt.Fprintln(stdout, "  "+f)
		}
		return fmt.Errorf("%d measurements failed", len(b.failures))
	}
	return nil
}

// tools finds (or builds) the binaries every scenario needs.
func (b *bench) tools(ctx context.Context) error {
	var err error
	if b.opt.registryBin == "" {
		if b.opt.registryBin, err = findTool(b.root, "registry"); err != nil {
			return fmt.Errorf("%w; install it with: GOBIN=$PWD/bin go install github.com/distribution/distribution/v3/cmd/registry@v3.1.2", err)
		}
	}
	if b.opt.nginxBin == "" && slices.Contains(b.opt.scenarios, "cpu") {
		if b.opt.nginxBin, err = findTool(b.root, "nginx"); err != nil {
			return fmt.Errorf("%w; install it with: apt-get install nginx-light", err)
		}
	}
	if b.opt.minioBin == "" && (slices.Contains(b.opt.scenarios, "fleet") || slices.Contains(b.opt.scenarios, "prewarm")) {
		if b.opt.minioBin, err = findTool(b.root, "minio"); err != nil {
			return fmt.Errorf("%w; scripts/test installs it into ./bin", err)
		}
	}
	if b.opt.berthBin == "" {
		b.opt.berthBin = filepath.Join(b.work, "berth")
		b.logf("building berth")
		cmd := exec.CommandContext(ctx, "go", "build", "-o", b.opt.berthBin, "./cmd/berth")
		cmd.Dir = b.root
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("building berth: %v\n%s", err, out)
		}
	}
	return nil
}

// moduleRoot is the berth checkout the benchmark runs from.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.HasPrefix(string(data), "module github.com/berth-dev/berth\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("run the benchmark from inside the berth repository")
		}
		dir = parent
	}
}

func rateString(bps int64) string {
	if bps == 0 {
		return "unlimited"
	}
	return fmt.Sprintf("%.0f MB/s", float64(bps)/1e6)
}

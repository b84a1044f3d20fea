package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/auth"
	"github.com/berth-dev/berth/coordinator"
	"github.com/berth-dev/berth/storage"
)

func init() {
	register("coordinator", "run the pre-warm coordinator: jobs in the bucket, warm on push, warm nodes that join", runCoordinator)
}

type coordinatorOptions struct {
	listen       string
	s3           storage.S3Options
	pathStyle    bool
	nodes        listFlag
	nodesFile    string
	nodesDNS     string
	nodesPort    int
	nodesScheme  string
	dnsServer    string
	interval     time.Duration
	poll         time.Duration
	tokenFile    string
	apiTokenFile string
	leaseTTL     time.Duration
	parallel     int
	pushRegistry string
	pushRules    listFlag
	pushPin      time.Duration
	logLevel     string
	logFormat    string
}

func envOr(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

func coordinatorFlags(o *coordinatorOptions, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("berth coordinator", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.listen, "listen", envOr("BERTH_COORDINATOR_LISTEN", "127.0.0.1:5002"), "`ADDR` of the coordinator's API [$BERTH_COORDINATOR_LISTEN]")
	fs.StringVar(&o.s3.Bucket, "s3-bucket", os.Getenv("BERTH_S3_BUCKET"), "the fleet's S3 `BUCKET`, where jobs and pins are kept (required) [$BERTH_S3_BUCKET]")
	fs.StringVar(&o.s3.Prefix, "s3-prefix", envOr("BERTH_S3_PREFIX", "berth/"), "key `PREFIX` in the bucket, as the nodes' [$BERTH_S3_PREFIX]")
	fs.StringVar(&o.s3.Region, "s3-region", os.Getenv("BERTH_S3_REGION"), "S3 `REGION` (default $AWS_REGION or the shared AWS config, else us-east-1) [$BERTH_S3_REGION]")
	fs.StringVar(&o.s3.Endpoint, "s3-endpoint", os.Getenv("BERTH_S3_ENDPOINT"), "S3 endpoint `URL` (MinIO, Ceph) [$BERTH_S3_ENDPOINT]")
	ps, _ := strconv.ParseBool(os.Getenv("BERTH_S3_PATH_STYLE"))
	fs.BoolVar(&o.pathStyle, "s3-path-style", ps, "path-style S3 addressing [$BERTH_S3_PATH_STYLE]")
	fs.Var(&o.nodes, "nodes", "node API `URLS`, comma-separated (repeatable)")
	fs.StringVar(&o.nodesFile, "nodes-file", "", "`FILE` of node URLs, re-read at every discovery")
	fs.StringVar(&o.nodesDNS, "nodes-dns", os.Getenv("BERTH_COORDINATOR_NODES_DNS"), "DNS `NAME` of the nodes: SRV, or A/AAAA with --nodes-port; re-resolved every --interval [$BERTH_COORDINATOR_NODES_DNS]")
	fs.IntVar(&o.nodesPort, "nodes-port", 0, "`PORT` of the nodes' fleet port for A/AAAA records")
	fs.StringVar(&o.nodesScheme, "nodes-scheme", "http", "`SCHEME` of nodes found by DNS: http or https")
	fs.StringVar(&o.dnsServer, "dns-server", "", "ask this DNS server (`HOST:PORT`) instead of the system's resolver")
	fs.DurationVar(&o.interval, "interval", 30*time.Second, "how often nodes are discovered again and new ones warmed (`DURATION`)")
	fs.DurationVar(&o.poll, "poll", 2*time.Second, "how often the bucket is checked for jobs to run (`DURATION`)")
	fs.StringVar(&o.tokenFile, "token-file", os.Getenv("BERTH_COORDINATOR_TOKEN_FILE"), "`FILE` whose first token is sent to the nodes (their admin_token_file) [$BERTH_COORDINATOR_TOKEN_FILE]")
	fs.StringVar(&o.apiTokenFile, "api-token-file", os.Getenv("BERTH_COORDINATOR_API_TOKEN_FILE"), "`FILE` of tokens the coordinator's API accepts (default: none, loopback only) [$BERTH_COORDINATOR_API_TOKEN_FILE]")
	fs.DurationVar(&o.leaseTTL, "lease-ttl", 30*time.Second, "how long a coordinator that stops keeps its jobs from the others (`DURATION`)")
	fs.IntVar(&o.parallel, "parallel", 4, "at most `N` nodes fill their disks at once, per job")
	fs.StringVar(&o.pushRegistry, "push-registry", "", "registry `NAME` the nodes know the notifying registry by (an upstream of theirs), for warm on push")
	fs.Var(&o.pushRules, "push-rule", "`REPO[:TAG]` globs (* matches anything) of pushes to warm, repeatable (default: every push)")
	fs.DurationVar(&o.pushPin, "push-pin", 24*time.Hour, "pin images warmed on push for `DURATION` (0: no pin)")
	fs.StringVar(&o.logLevel, "log-level", envOr("BERTH_LOG_LEVEL", "info"), "`LEVEL`: debug, info, warn or error [$BERTH_LOG_LEVEL]")
	fs.StringVar(&o.logFormat, "log-format", envOr("BERTH_LOG_FORMAT", "text"), "`FORMAT`: text or json [$BERTH_LOG_FORMAT]")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: berth coordinator [flags]\n\nRuns pre-warm jobs kept in the fleet's bucket (submitted with 'berth prewarm\n--coordinator' or by a registry's push notifications), resumes the jobs of a\ncoordinator that died, and warms every node that joins with the pins in force\n(nodes are known by their node ID: a warm node under a new address is left be).\nServes the fleet page at /ui/ (nodes x pins in force: warm, or the bytes\nmissing) and its JSON at /berth/v1/coordinator/fleet, with the same\ncredential as the API (a browser sends the token as a basic-auth password).\nSee docs/prewarm.md.\n\nFlags:")
		fs.PrintDefaults()
	}
	return fs
}

func runCoordinator(args []string) int {
	var o coordinatorOptions
	fs := coordinatorFlags(&o, os.Stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	usage := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "berth coordinator: "+format+"\n", a...)
		return 2
	}
	if fs.NArg() > 0 {
		return usage("unexpected argument %q", fs.Arg(0))
	}
	if o.s3.Bucket == "" {
		return usage("--s3-bucket is required: jobs and pins live in the fleet's bucket")
	}
	if _, _, err := net.SplitHostPort(o.listen); err != nil {
		return usage("--listen %q is not HOST:PORT", o.listen)
	}
	disc := coordinator.Discovery{Static: o.nodes, File: o.nodesFile, DNSName: o.nodesDNS, Port: o.nodesPort, Scheme: o.nodesScheme}
	if disc.Empty() {
		return usage("no nodes: give --nodes, --nodes-file or --nodes-dns")
	}
	if o.dnsServer != "" {
		disc.Resolver = resolverAt(o.dnsServer)
	}
	var rules []coordinator.PushRule
	for _, r := range o.pushRules {
		pr, err := coordinator.ParsePushRule(r)
		if err != nil {
			return usage("--push-rule: %v", err)
		}
		rules = append(rules, pr)
	}
	if o.leaseTTL < time.Second || o.interval <= 0 || o.poll <= 0 || o.parallel < 1 {
		return usage("--lease-ttl (1s or more), --interval, --poll and --parallel must be positive")
	}
	nodeToken := ""
	if o.tokenFile != "" {
		ts, err := auth.LoadTokens(o.tokenFile)
		if err != nil {
			return usage("--token-file: %v", err)
		}
		nodeToken = ts.Current()
	}
	var apiTokens *auth.Tokens
	if o.apiTokenFile != "" {
		var err error
		if apiTokens, err = auth.LoadTokens(o.apiTokenFile); err != nil {
			return usage("--api-token-file: %v", err)
		}
	}
	log := logrus.New()
	log.SetOutput(os.Stderr)
	if o.logFormat == "json" {
		log.SetFormatter(&logrus.JSONFormatter{})
	} else {
		log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	}
	if lvl, err := logrus.ParseLevel(o.logLevel); err == nil {
		log.SetLevel(lvl)
	}
	host, _ := os.Hostname()
	o.s3.PathStyle = o.pathStyle
	o.s3.Holder = fmt.Sprintf("coordinator %s pid %d", host, os.Getpid())
	bucket, err := storage.NewS3(context.Background(), o.s3)
	if err != nil {
		fmt.Fprintf(os.Stderr, "berth coordinator: %v\n", err)
		return 2
	}
	svc := coordinator.NewService(coordinator.ServiceOptions{
		Store: bucket, Discovery: disc, Interval: o.interval, Poll: o.poll, NodeToken: nodeToken, APITokens: apiTokens,
		LeaseTTL: o.leaseTTL, Parallel: o.parallel, Holder: o.s3.Holder,
		PushRegistry: o.pushRegistry, PushRules: rules, PushPin: o.pushPin, Log: logrus.NewEntry(log),
	})
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "berth coordinator: %v\n", err)
		return 1
	}
	srv := &http.Server{Handler: svc.Handler(), ReadHeaderTimeout: 30 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	done := make(chan struct{})
	go func() {
		defer close(done)
		svc.Run(ctx)
	}()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	log.WithFields(logrus.Fields{"listen": ln.Addr().String(), "bucket": o.s3.Bucket, "api_tokens": apiTokens.Len(), "push_rules": len(rules)}).Info("berth coordinator serving")
	select {
	case err := <-served:
		stop()
		<-done
		fmt.Fprintf(os.Stderr, "berth coordinator: %v\n", err)
		return 1
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	<-done
	log.Info("coordinator stopped")
	return 0
}

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
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/healthcheck"
	"github.com/berth-dev/berth/mirror"
	"github.com/berth-dev/berth/storage"
)

func init() {
	register("serve", "run the pull-through mirror daemon", runServe)
}

// loader rebuilds the configuration the same way at start and on SIGHUP:
// embedded default < --config file < BERTH_* environment < flags.
type loader struct {
	path      string
	overrides config.Overrides
}

func (l *loader) load() (*config.Config, error) {
	cfg := config.Default()
	if l.path != "" {
		var err error
		if cfg, err = config.Load(l.path); err != nil {
			return nil, err
		}
	}
	if err := l.overrides.Apply(cfg); err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := cfg.CheckDataDir(); err != nil {
		return nil, err
	}
	return cfg, nil
}

func serveFlags(l *loader, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&l.path, "config", os.Getenv("BERTH_CONFIG"), "YAML configuration `FILE` (default: the embedded default, see 'berth config default') [$BERTH_CONFIG]")
	l.overrides.BindFlags(fs)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: berth serve [flags]\n\nRuns the pull-through registry mirror. Settings come from the embedded default,\nthen --config FILE, then BERTH_* variables, then these flags.\n\nFlags:")
		fs.PrintDefaults()
	}
	return fs
}

func runServe(args []string) int {
	l := &loader{}
	l.overrides.ReadEnv(os.LookupEnv)
	fs := serveFlags(l, os.Stderr)
	if err := fs.Parse(config.JoinBoolValues(args)); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "berth serve: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	cfg, err := l.load()
	if err != nil {
		fmt.Fprintf(os.Stderr, "berth serve: %v\n", err)
		return 2
	}
	if err := serve(l, cfg); err != nil {
		fmt.Fprintf(os.Stderr, "berth serve: %v\n", err)
		return 1
	}
	return 0
}

func newLogger(cfg *config.Config) *logrus.Logger {
	log := logrus.New()
	log.SetOutput(os.Stderr)
	applyLogConfig(log, cfg)
	return log
}

func applyLogConfig(log *logrus.Logger, cfg *config.Config) {
	if cfg.Log.Format == "json" {
		log.SetFormatter(&logrus.JSONFormatter{})
	} else {
		log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	}
	if lvl, err := logrus.ParseLevel(cfg.Log.Level); err == nil {
		log.SetLevel(lvl)
	}
}

func serve(l *loader, cfg *config.Config) error {
	// First thing: a SIGHUP or SIGTERM that arrives while berth starts
	// (it answers /v2/ before its first health round is done) must be
	// handled, not kill the process.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)

	d, err := newDaemon(cfg)
	if err != nil {
		return err
	}
	return d.run(l, sigs)
}

// daemon is one running berth: its tiers, engine, registry API, health
// checks and listener.
type daemon struct {
	cfg     *config.Config
	log     *logrus.Logger
	local   *storage.Local
	eng     *engine.Engine
	checker *healthcheck.Checker
	ln      net.Listener
	http    *http.Server
}

// newDaemon opens the cache, builds the engine and the registry API over
// it, and listens; nothing is served until run.
func newDaemon(cfg *config.Config) (*daemon, error) {
	d := &daemon{cfg: cfg, log: newLogger(cfg)}
	entry := logrus.NewEntry(d.log)
	var err error
	d.local, err = storage.OpenLocal(cfg.Data, storage.LocalOptions{
		Budget: int64(cfg.Cache.Size), HighWatermark: cfg.Cache.HighWatermark, LowWatermark: cfg.Cache.LowWatermark,
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", cfg.Data, err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	bucket, err := openBucket(cfg, reg)
	if err != nil {
		return nil, err
	}
	d.eng, err = engine.New(engine.Options{
		Config: cfg, Local: d.local, Bucket: bucket, Log: entry, Metrics: reg,
		LeaseTTL: cfg.S3.LeaseTTL.D(), Advertise: cfg.S3.Advertise,
		SourceIdleTimeout: cfg.SourceIdleTimeout.D(),
	})
	if err != nil {
		return nil, err
	}
	if d.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
		d.eng.Close()
		return nil, err
	}
	d.checker = healthcheck.New(reg)
	d.checker.Add("data-dir", healthcheck.Liveness, 10*time.Second, 5*time.Second, healthcheck.DirWritable(filepath.Join(cfg.Data, "tmp")))
	d.checker.Add("listener", healthcheck.Readiness, 5*time.Second, 2*time.Second, healthcheck.TCPDial(d.ln.Addr().String()))
	addUpstreamChecks(d.checker, d.eng, cfg)
	if ping := d.eng.BucketHealth(); ping != nil {
		d.checker.Add("s3", healthcheck.Informational, 5*time.Second, 5*time.Second, ping)
	}

	mux := http.NewServeMux()
	mux.Handle("/v2/", mirror.New(d.eng, reg, entry))
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	for _, p := range []string{"/healthz", "/livez", "/readyz", "/status"} {
		mux.Handle(p, d.checker.Handler())
	}
	d.http = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	return d, nil
}

// openBucket builds the S3 tier when one is configured; nil otherwise.
func openBucket(cfg *config.Config, reg prometheus.Registerer) (storage.Bucket, error) {
	if cfg.S3.Bucket == "" {
		return nil, nil
	}
	return storage.NewS3(context.Background(), storage.S3Options{
		Bucket: cfg.S3.Bucket, Prefix: cfg.S3.Prefix, Region: cfg.S3.Region,
		Endpoint: cfg.S3.Endpoint, PathStyle: cfg.S3.PathStyle,
		OnRequest: engine.CountS3Requests(reg), Holder: cfg.S3.Advertise,
	})
}

// run serves until SIGTERM or SIGINT, reloading on SIGHUP.
func (d *daemon) run(l *loader, sigs <-chan os.Signal) error {
	entry := logrus.NewEntry(d.log)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	served := make(chan error, 1)
	go func() { served <- d.http.Serve(d.ln) }()
	// After Serve: /healthz answers at once, /readyz once the first round is in.
	d.checker.Start(ctx)
	notifier, err := healthcheck.Notify(ctx, d.checker)
	if err != nil {
		entry.WithError(err).Warn("systemd notification")
	}
	entry.WithFields(logrus.Fields{
		"listen": d.ln.Addr().String(), "data": d.cfg.Data, "upstreams": upstreamSummary(d.cfg),
		"default_upstream": d.cfg.DefaultUpstream, "cache_size": int64(d.cfg.Cache.Size), "tag_ttl": d.cfg.TagTTL.String(),
	}).Info("berth serving")

	for {
		select {
		case err := <-served:
			return err
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				if err := notifier.Reload(func() error { return d.reload(l) }); err != nil {
					entry.WithError(err).Error("configuration reload rejected; keeping the running configuration")
				}
				continue
			}
			entry.WithField("signal", sig.String()).Info("shutting down: finishing in-flight pulls")
			notifier.Stopping()
			stop()
			d.shutdown(entry)
			return nil
		}
	}
}

// shutdown lets in-flight pulls finish within shutdown_timeout, then cuts
// the rest and stops the engine's downloads, leaving no partial file.
func (d *daemon) shutdown(entry *logrus.Entry) {
	sctx, cancel := context.WithTimeout(context.Background(), d.cfg.ShutdownTimeout.D())
	err := d.http.Shutdown(sctx)
	cancel()
	if err != nil {
		entry.WithError(err).Warn("shutdown deadline passed; cutting remaining pulls")
		d.http.Close()
	}
	d.eng.Close()
	entry.Info("stopped")
}

// reload applies a new configuration on SIGHUP. The listener and data
// directory stay as they are until a restart.
func (d *daemon) reload(l *loader) error {
	old := d.cfg
	next, err := l.load()
	if err != nil {
		return err
	}
	if next.Listen != old.Listen || next.Data != old.Data || next.S3 != old.S3 {
		return fmt.Errorf("listen, data and s3 settings cannot change without a restart (running: listen %s, data %s, s3 bucket %q)", old.Listen, old.Data, old.S3.Bucket)
	}
	if err := d.eng.Reload(next); err != nil {
		return err
	}
	d.local.SetBudget(int64(next.Cache.Size), next.Cache.HighWatermark, next.Cache.LowWatermark)
	applyLogConfig(d.log, next)
	for _, h := range old.UpstreamHosts() {
		d.checker.Remove("upstream:" + h)
	}
	addUpstreamChecks(d.checker, d.eng, next)
	d.log.WithField("changed", configChanges(old, next)).Info("configuration reloaded")
	d.cfg = next
	return nil
}

func addUpstreamChecks(checker *healthcheck.Checker, eng *engine.Engine, cfg *config.Config) {
	for _, h := range cfg.UpstreamHosts() {
		checker.Add("upstream:"+h, healthcheck.Informational, 30*time.Second, 5*time.Second, eng.PingUpstream(h))
	}
}

func upstreamSummary(cfg *config.Config) string {
	var parts []string
	for _, h := range cfg.UpstreamHosts() {
		parts = append(parts, h+"="+cfg.Upstreams[h].URL)
	}
	return strings.Join(parts, ",")
}

// configChanges names what a reload changed, never showing credentials.
func configChanges(a, b *config.Config) string {
	var out []string
	diff := func(name string, x, y any) {
		if fmt.Sprint(x) != fmt.Sprint(y) {
			out = append(out, fmt.Sprintf("%s: %v -> %v", name, x, y))
		}
	}
	diff("upstreams", upstreamSummary(a), upstreamSummary(b))
	for _, h := range b.UpstreamHosts() {
		if ua, ok := a.Upstreams[h]; ok && (ua.Username != b.Upstreams[h].Username || ua.Password != b.Upstreams[h].Password) {
			out = append(out, "credentials of "+h)
		}
	}
	diff("default_upstream", a.DefaultUpstream, b.DefaultUpstream)
	diff("tag_ttl", a.TagTTL, b.TagTTL)
	diff("stale_timeout", a.StaleTimeout, b.StaleTimeout)
	diff("cache.size", int64(a.Cache.Size), int64(b.Cache.Size))
	diff("log.level", a.Log.Level, b.Log.Level)
	diff("log.format", a.Log.Format, b.Log.Format)
	diff("shutdown_timeout", a.ShutdownTimeout, b.ShutdownTimeout)
	if len(out) == 0 {
		return "nothing"
	}
	return strings.Join(out, "; ")
}

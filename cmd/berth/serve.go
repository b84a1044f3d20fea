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
	if err := fs.Parse(args); err != nil {
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

	var shared *storage.S3
	log := newLogger(cfg)
	entry := logrus.NewEntry(log)

	local, err := storage.OpenLocal(cfg.Data, storage.LocalOptions{
		Budget: int64(cfg.Cache.Size), HighWatermark: cfg.Cache.HighWatermark, LowWatermark: cfg.Cache.LowWatermark,
	})
	if err != nil {
		return fmt.Errorf("%s: %w", cfg.Data, err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	srv, err := mirror.New(cfg, local, reg, entry)
	if err != nil {
		return err
	}

	if cfg.S3.Bucket != "" {
		s3, err := storage.NewS3(context.Background(), storage.S3Options{
			Bucket: cfg.S3.Bucket, Prefix: cfg.S3.Prefix, Region: cfg.S3.Region,
			Endpoint: cfg.S3.Endpoint, PathStyle: cfg.S3.PathStyle,
			OnRequest: srv.S3RequestHook(), Holder: cfg.S3.Advertise,
		})
		if err != nil {
			return err
		}
		srv.SetShared(s3, cfg.S3.LeaseTTL.D())
		srv.Advertise(cfg.S3.Advertise)
		shared = s3
	}

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	checker := healthcheck.New(reg)
	checker.Add("data-dir", healthcheck.Liveness, 10*time.Second, 5*time.Second, healthcheck.DirWritable(filepath.Join(cfg.Data, "tmp")))
	checker.Add("listener", healthcheck.Readiness, 5*time.Second, 2*time.Second, healthcheck.TCPDial(ln.Addr().String()))
	addUpstreamChecks(checker, srv, cfg)
	if shared != nil {
		checker.Add("s3", healthcheck.Informational, 5*time.Second, 5*time.Second, srv.SharedHealth(shared.Ping))
	}

	mux := http.NewServeMux()
	mux.Handle("/v2/", srv)
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	for _, p := range []string{"/healthz", "/livez", "/readyz", "/status"} {
		mux.Handle(p, checker.Handler())
	}

	httpSrv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	served := make(chan error, 1)
	go func() { served <- httpSrv.Serve(ln) }()
	// After Serve: /healthz answers at once, /readyz once the first round is in.
	checker.Start(ctx)

	notifier, err := healthcheck.Notify(ctx, checker)
	if err != nil {
		entry.WithError(err).Warn("systemd notification")
	}
	entry.WithFields(logrus.Fields{
		"listen": ln.Addr().String(), "data": cfg.Data, "upstreams": upstreamSummary(cfg),
		"default_upstream": cfg.DefaultUpstream, "cache_size": int64(cfg.Cache.Size), "tag_ttl": cfg.TagTTL.String(),
	}).Info("berth serving")

	for {
		select {
		case err := <-served:
			return err
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				err := notifier.Reload(func() error {
					next, err := reload(l, cfg, srv, local, checker, log)
					if err == nil {
						cfg = next
					}
					return err
				})
				if err != nil {
					entry.WithError(err).Error("configuration reload rejected; keeping the running configuration")
				}
				continue
			}
			entry.WithField("signal", sig.String()).Info("shutting down: finishing in-flight pulls")
			notifier.Stopping()
			stop()
			sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout.D())
			err := httpSrv.Shutdown(sctx)
			cancel()
			if err != nil {
				entry.WithError(err).Warn("shutdown deadline passed; cutting remaining pulls")
				httpSrv.Close()
			}
			srv.Close()
			entry.Info("stopped")
			return nil
		}
	}
}

// reload applies a new configuration on SIGHUP. The listener and data
// directory stay as they are until a restart.
func reload(l *loader, old *config.Config, srv *mirror.Server, local *storage.Local, checker *healthcheck.Checker, log *logrus.Logger) (*config.Config, error) {
	next, err := l.load()
	if err != nil {
		return nil, err
	}
	if next.Listen != old.Listen || next.Data != old.Data || next.S3 != old.S3 {
		return nil, fmt.Errorf("listen, data and s3 settings cannot change without a restart (running: listen %s, data %s, s3 bucket %q)", old.Listen, old.Data, old.S3.Bucket)
	}
	if err := srv.Reload(next); err != nil {
		return nil, err
	}
	local.SetBudget(int64(next.Cache.Size), next.Cache.HighWatermark, next.Cache.LowWatermark)
	applyLogConfig(log, next)
	for _, h := range old.UpstreamHosts() {
		checker.Remove("upstream:" + h)
	}
	addUpstreamChecks(checker, srv, next)
	log.WithField("changed", configChanges(old, next)).Info("configuration reloaded")
	return next, nil
}

func addUpstreamChecks(checker *healthcheck.Checker, srv *mirror.Server, cfg *config.Config) {
	for _, h := range cfg.UpstreamHosts() {
		checker.Add("upstream:"+h, healthcheck.Informational, 30*time.Second, 5*time.Second, srv.PingUpstream(h))
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

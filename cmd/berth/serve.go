package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"

	"github.com/berth-dev/berth/auth"
	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/coordinator"
	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/healthcheck"
	"github.com/berth-dev/berth/inspector"
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
// checks and listeners: the registry listener (listen) and, when
// configured, the fleet port (fleet_listen).
type daemon struct {
	cfg     *config.Config
	log     *logrus.Logger
	local   *storage.Local
	eng     *engine.Engine
	checker *healthcheck.Checker
	ln      net.Listener
	http    *http.Server

	// The fleet port; nil without fleet_listen.
	fleetLn   net.Listener
	fleetHTTP *http.Server

	activity activity // requests being served, for the lame-duck drain

	// Credentials, re-read on SIGHUP; each nil when not configured.
	tokens    *auth.Tokens        // fleet.token_file: accepted on the fleet port, the first sent to peers
	serverTLS *auth.ServerTLS     // fleet.tls.cert_file, key_file, client_ca_file
	peers     *auth.PeerTransport // how this host calls its peers' fleet ports
	htpasswd  *auth.HTPasswd      // auth.htpasswd on the registry listener
	admin     *auth.Tokens        // admin_token_file: the node API's writes

	ins *inspector.Inspector // nil when disabled; SIGHUP reloads its webhooks and watch list
}

// newCredentials reads the credential files of cfg: the fleet tokens, the
// fleet port's TLS, the transport to peers and the registry listener's
// htpasswd. Config validation has read them already; an error here means a
// file changed in between. Errors name the setting and the file, never a
// secret.
func (d *daemon) newCredentials(cfg *config.Config) error {
	f := cfg.Fleet
	var err error
	if f.TokenFile != "" {
		if d.tokens, err = auth.LoadTokens(f.TokenFile); err != nil {
			return fmt.Errorf("fleet.token_file: %w", err)
		}
	}
	if cfg.FleetListen != "" && f.TLS.Enabled() {
		if d.serverTLS, err = auth.NewServerTLS(f.TLS.CertFile, f.TLS.KeyFile, f.TLS.ClientCAFile); err != nil {
			return fmt.Errorf("fleet.tls: %w", err)
		}
	}
	if d.tokens != nil || f.TLS.CertFile != "" || f.TLS.CAFile != "" || f.TLS.ServerName != "" {
		d.peers, err = auth.NewPeerTransport(auth.PeerOptions{
			Base: engine.NewPeerTransport(), Tokens: d.tokens,
			CAFile: f.TLS.CAFile, CertFile: f.TLS.CertFile, KeyFile: f.TLS.KeyFile, ServerName: f.TLS.ServerName,
		})
		if err != nil {
			return fmt.Errorf("fleet.tls: %w", err)
		}
	}
	if cfg.Auth.HTPasswd != "" {
		if d.htpasswd, err = auth.NewHTPasswd(cfg.Auth.HTPasswd, cfg.Auth.Realm); err != nil {
			return fmt.Errorf("auth.htpasswd: %w", err)
		}
		var mu sync.Mutex
		var last time.Time
		d.htpasswd.OnError = func(err error) {
			mu.Lock()
			defer mu.Unlock()
			if time.Since(last) < time.Minute {
				return
			}
			last = time.Now()
			d.log.WithError(err).Error("auth.htpasswd cannot be read")
		}
	}
	return nil
}

// prepareReload has every part that SIGHUP reloads read and check what it
// would switch to for next (credential files, webhook secrets, upstreams)
// without putting anything in force. It returns the applies, which cannot
// fail, only when every part is ready; otherwise an error naming each part
// that is not and why, so that nothing of a rejected reload takes effect.
func (d *daemon) prepareReload(next *config.Config) ([]func(), error) {
	type part struct {
		name    string // the setting, for the error; never a value
		prepare func() (func(), error)
	}
	var parts []part
	if d.tokens != nil {
		parts = append(parts, part{"fleet.token_file", d.tokens.Prepare})
	}
	if d.serverTLS != nil {
		parts = append(parts, part{"fleet.tls", d.serverTLS.Prepare})
	}
	if d.peers != nil {
		parts = append(parts, part{"fleet.tls", d.peers.Prepare})
	}
	if d.htpasswd != nil {
		parts = append(parts, part{"auth.htpasswd", d.htpasswd.Prepare})
	}
	if d.admin != nil {
		parts = append(parts, part{"admin_token_file", d.admin.Prepare})
	}
	if d.ins != nil {
		parts = append(parts, part{"inspector", func() (func(), error) { return d.ins.Prepare(next) }})
	}
	parts = append(parts, part{"upstreams", func() (func(), error) { return d.eng.Prepare(next) }})

	var applies []func()
	var failed []string
	for _, p := range parts {
		apply, err := p.prepare()
		if err != nil {
			// The fleet's certificate serves both the port and the calls to
			// peers: one bad file, one message.
			if msg := p.name + ": " + err.Error(); !slices.Contains(failed, msg) {
				failed = append(failed, msg)
			}
			continue
		}
		applies = append(applies, apply)
	}
	if len(failed) > 0 {
		return nil, errors.New(strings.Join(failed, "; "))
	}
	return applies, nil
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
	if err := d.newCredentials(cfg); err != nil {
		return nil, err
	}
	opts := engine.Options{
		Config: cfg, Local: d.local, Bucket: bucket, Log: entry, Metrics: reg,
		LeaseTTL: cfg.S3.LeaseTTL.D(), Advertise: cfg.S3.Advertise,
		SourceIdleTimeout: cfg.SourceIdleTimeout.D(),
		PeerIdleTimeout:   cfg.PeerIdleTimeout.D(),
	}
	if d.peers != nil {
		opts.PeerTransport = d.peers
	}
	d.eng, err = engine.New(opts)
	if err != nil {
		return nil, err
	}
	if d.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
		d.eng.Close()
		return nil, err
	}
	if cfg.FleetListen != "" {
		if d.fleetLn, err = net.Listen("tcp", cfg.FleetListen); err != nil {
			d.ln.Close()
			d.eng.Close()
			return nil, fmt.Errorf("fleet_listen: %w", err)
		}
	}
	d.checker = healthcheck.New(reg)
	d.checker.Add("data-dir", healthcheck.Liveness, 10*time.Second, 5*time.Second, healthcheck.DirWritable(filepath.Join(cfg.Data, "tmp")))
	d.checker.Add("listener", healthcheck.Readiness, 5*time.Second, 2*time.Second, healthcheck.TCPDial(d.ln.Addr().String()))
	if d.fleetLn != nil {
		d.checker.Add("fleet-listener", healthcheck.Readiness, 5*time.Second, 2*time.Second, healthcheck.TCPDial(d.fleetLn.Addr().String()))
	}
	addUpstreamChecks(d.checker, d.eng, cfg)
	if ping := d.eng.BucketHealth(); ping != nil {
		d.checker.Add("s3", healthcheck.Informational, 5*time.Second, 5*time.Second, ping)
	}

	registry := mirror.New(d.eng, reg, entry)
	// Pre-warm's node API (docs/prewarm.md), on both listeners; its pins
	// file is re-applied now, in the background.
	if cfg.AdminTokenFile != "" {
		if d.admin, err = auth.LoadTokens(cfg.AdminTokenFile); err != nil {
			d.ln.Close()
			d.eng.Close()
			return nil, fmt.Errorf("admin_token_file: %w", err)
		}
	}
	nodeAPI, err := coordinator.NewNode(coordinator.NodeOptions{
		Engine: d.eng, Local: d.local, DataDir: cfg.Data, Version: version,
		AdminTokens: d.admin, Log: entry.WithField("component", "prewarm"), Upstreams: cfg.UpstreamHosts,
	})
	if err != nil {
		d.ln.Close()
		d.eng.Close()
		return nil, err
	}
	metrics := promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})
	health := d.checker.Handler()
	mux := http.NewServeMux()
	mux.Handle("/v2/", registry)
	mux.Handle(coordinator.APIPrefix, nodeAPI.Handler())
	mux.Handle("/metrics", metrics)
	for _, p := range []string{"/healthz", "/livez", "/readyz", "/status"} {
		mux.Handle(p, health)
	}
	var ins *inspector.Inspector
	if cfg.Inspector.Enabled {
		// The image inspector (docs/inspector.md): background inspection,
		// webhooks, the watch list, the scaler feed; its API and pages on
		// the registry listener only.
		ins, err = inspector.New(inspector.Options{
			Engine: d.eng, Local: d.local, Bucket: bucket, Config: cfg, Metrics: reg,
			Log: entry, Health: d.checker, PrewarmQueue: nodeAPI.Queue,
		})
		if err != nil {
			d.ln.Close()
			if d.fleetLn != nil {
				d.fleetLn.Close()
			}
			d.eng.Close()
			return nil, err
		}
		ins.Start()
		d.ins = ins
		insHandler := ins.Handler()
		for _, p := range inspector.Routes {
			mux.Handle(p, insHandler)
		}
	}
	var handler http.Handler = mux
	if d.htpasswd != nil {
		// Probes stay open; everything else, /metrics and /status
		// included, needs a user and password.
		guarded := auth.RequireHTPasswd(d.htpasswd, mux)
		handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if isProbe(r.URL.Path) {
				mux.ServeHTTP(w, r)
				return
			}
			guarded.ServeHTTP(w, r)
		})
	}
	d.http = &http.Server{
		Handler:           d.activity.track(handler),
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	if ins != nil {
		d.http.RegisterOnShutdown(ins.Close) // stops before the engine does
	}

	if d.fleetLn != nil {
		guard := func(h http.Handler) http.Handler { return auth.RequireFleetCredential(d.tokens, h) }
		fleet := http.NewServeMux()
		fleet.Handle("/v2/", guard(peersOnly(registry)))
		if cfg.Fleet.MetricsAuth {
			fleet.Handle("/metrics", guard(metrics))
		} else {
			fleet.Handle("/metrics", metrics)
		}
		for _, p := range []string{"/healthz", "/livez", "/readyz"} {
			fleet.Handle(p, health)
		}
		fleet.Handle("/status", guard(health))
		fleet.Handle(coordinator.APIPrefix, nodeAPI.FleetHandler(d.tokens))
		fleet.Handle("/", guard(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fleetError(w, errcode.ErrorCodeUnsupported.WithMessage("not served on the fleet port"), http.StatusNotFound)
		})))
		d.fleetHTTP = &http.Server{
			Handler:           d.activity.track(fleet),
			ReadHeaderTimeout: 30 * time.Second,
			IdleTimeout:       2 * time.Minute,
			// Failed TLS handshakes (clients without a certificate, the
			// readiness check's bare TCP dial) are not worth more than debug.
			ErrorLog: log.New(d.log.WriterLevel(logrus.DebugLevel), "fleet port: ", 0),
		}
		if d.serverTLS != nil {
			d.fleetLn = tls.NewListener(d.fleetLn, d.serverTLS.Config())
		}
	}
	return d, nil
}

// isProbe reports whether path is a health probe, which needs no credential.
func isProbe(path string) bool {
	return path == "/healthz" || path == "/livez" || path == "/readyz"
}

// peerBlobPath is a blob GET's path: /v2/<name>/blobs/<digest>.
var peerBlobPath = regexp.MustCompile(`^/v2/.+/blobs/[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$`)

// peersOnly lets through to the registry API only what the fleet port
// serves: blob GETs and HEADs from other berths (the Berth-Peer header),
// which the registry API answers from disk or a download in progress and
// never by contacting an upstream. Anything else gets a registry error and
// starts nothing.
func peersOnly(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if (r.Method == http.MethodGet || r.Method == http.MethodHead) && r.Header.Get(engine.PeerHeader) != "" && peerBlobPath.MatchString(r.URL.Path) {
			next.ServeHTTP(w, r)
			return
		}
		fleetError(w, errcode.ErrorCodeDenied.WithMessage("the fleet port serves blobs to other berths only; pull through the registry listener"), http.StatusForbidden)
	})
}

// fleetError answers with the registry error JSON and status.
func fleetError(w http.ResponseWriter, err errcode.Error, status int) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(errcode.Errors{err})
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
	served := make(chan error, 2)
	go func() { served <- d.http.Serve(d.ln) }()
	if d.fleetHTTP != nil {
		go func() { served <- fmt.Errorf("fleet port: %w", d.fleetHTTP.Serve(d.fleetLn)) }()
	}
	// After Serve: /healthz answers at once, /readyz once the first round is in.
	d.checker.Start(ctx)
	notifier, err := healthcheck.Notify(ctx, d.checker)
	if err != nil {
		entry.WithError(err).Warn("systemd notification")
	}
	fields := logrus.Fields{
		"listen": d.ln.Addr().String(), "data": d.cfg.Data, "upstreams": upstreamSummary(d.cfg),
		"default_upstream": d.cfg.DefaultUpstream, "cache_size": int64(d.cfg.Cache.Size), "tag_ttl": d.cfg.TagTTL.String(),
	}
	if d.fleetLn != nil {
		fields["fleet_listen"] = d.fleetLn.Addr().String()
		fields["fleet_tls"] = map[bool]string{true: "tls", false: "off"}[d.serverTLS != nil]
		if d.serverTLS != nil && d.serverTLS.Mutual() {
			fields["fleet_tls"] = "mutual"
		}
		fields["fleet_tokens"] = d.tokens.Len()
	}
	if d.htpasswd != nil {
		fields["htpasswd"] = d.cfg.Auth.HTPasswd
	}
	entry.WithFields(fields).Info("berth serving")

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
			entry.WithField("signal", sig.String()).Info("shutting down: not ready any more, serving the pulls under way")
			notifier.Stopping()
			cut := d.drain(entry, sigs)
			stop()
			d.shutdown(entry, cut)
			return nil
		}
	}
}

// drainQuiet is how long berth must have served no request before it exits
// on SIGTERM: a pull is a sequence of requests over a few connections, and
// a client that made one in the last few seconds is still pulling.
const drainQuiet = 3 * time.Second

// drain is the lame duck after SIGTERM: berth reports not ready at once,
// so no new work is sent its way, but it keeps accepting requests and
// starting downloads while pulls are under way. It returns once no request
// has come for drainQuiet, and reports cut at shutdown_timeout or on a
// second SIGTERM, when what is left is to be cut.
func (d *daemon) drain(entry *logrus.Entry, sigs <-chan os.Signal) (cut bool) {
	d.checker.Add("shutdown", healthcheck.Readiness, time.Second, time.Second, func(context.Context) error {
		return errors.New("berth is shutting down")
	})
	deadline := time.Now().Add(d.cfg.ShutdownTimeout.D())
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for d.activity.quietFor() < drainQuiet {
		if time.Now().After(deadline) {
			entry.Warn("shutdown_timeout passed with pulls still running; cutting them")
			return true
		}
		select {
		case sig := <-sigs:
			if sig != syscall.SIGHUP {
				entry.WithField("signal", sig.String()).Warn("second signal: cutting the pulls still running")
				return true
			}
		case <-tick.C:
		}
	}
	return false
}

// shutdown stops the listeners (at once when cut, else letting the last
// responses finish) and the engine's downloads, leaving no partial file.
func (d *daemon) shutdown(entry *logrus.Entry, cut bool) {
	wait := 5 * time.Second
	if cut {
		wait = 0
	}
	sctx, cancel := context.WithTimeout(context.Background(), wait)
	var wg sync.WaitGroup
	for _, srv := range []*http.Server{d.http, d.fleetHTTP} {
		if srv == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Shutdown(sctx); err != nil {
				srv.Close()
			}
		}()
	}
	wg.Wait()
	cancel()
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
	if next.FleetListen != old.FleetListen || next.Fleet != old.Fleet || next.Auth != old.Auth {
		return fmt.Errorf("fleet_listen, fleet and auth settings cannot change without a restart; SIGHUP re-reads the files they name (running: fleet_listen %q)", old.FleetListen)
	}
	if next.AdminTokenFile != old.AdminTokenFile {
		return fmt.Errorf("admin_token_file cannot change without a restart; SIGHUP re-reads the file it names (running: %q)", old.AdminTokenFile)
	}
	if next.Inspector.Enabled != old.Inspector.Enabled || next.Inspector.Queue != old.Inspector.Queue {
		return fmt.Errorf("inspector.enabled and inspector.queue cannot change without a restart; SIGHUP reloads webhooks, inspector.watch and inspector.show_env_names")
	}
	// All or nothing: a part that cannot be used rejects the whole reload
	// before anything is applied, and what was in force stays.
	applies, err := d.prepareReload(next)
	if err != nil {
		return err
	}
	for _, apply := range applies {
		apply()
	}
	d.local.SetBudget(int64(next.Cache.Size), next.Cache.HighWatermark, next.Cache.LowWatermark)
	applyLogConfig(d.log, next)
	for _, h := range old.UpstreamHosts() {
		d.checker.Remove("upstream:" + h)
	}
	addUpstreamChecks(d.checker, d.eng, next)
	fields := logrus.Fields{"changed": configChanges(old, next)}
	if d.tokens != nil {
		fields["fleet_tokens"] = d.tokens.Len() // how many, never which
	}
	if d.admin != nil {
		fields["admin_tokens"] = d.admin.Len()
	}
	d.log.WithFields(fields).Info("configuration reloaded")
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
	diff("source_idle_timeout", a.SourceIdleTimeout, b.SourceIdleTimeout)
	diff("peer_idle_timeout", a.PeerIdleTimeout, b.PeerIdleTimeout)
	// Webhook URLs may carry a token in their query: only how many.
	diff("webhooks", len(a.Webhooks), len(b.Webhooks))
	if !reflect.DeepEqual(a.Webhooks, b.Webhooks) && len(a.Webhooks) == len(b.Webhooks) {
		out = append(out, "webhooks")
	}
	watched := func(c *config.Config) []string {
		var r []string
		for _, w := range c.Inspector.Watch {
			r = append(r, fmt.Sprintf("%s%v/%s", w.Repository, w.Tags, w.Interval))
		}
		return r
	}
	diff("inspector.watch", watched(a), watched(b))
	diff("inspector.show_env_names", a.Inspector.ShowEnvNames, b.Inspector.ShowEnvNames)
	if len(out) == 0 {
		return "nothing"
	}
	return strings.Join(out, "; ")
}

// activity counts the requests being served and when the last one was,
// leaving out probes and scrapes, which say nothing about pulls.
type activity struct {
	active atomic.Int64
	last   atomic.Int64 // unix nanoseconds
}

func (a *activity) track(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isProbe(r.URL.Path) || r.URL.Path == "/metrics" || r.URL.Path == "/status" {
			next.ServeHTTP(w, r)
			return
		}
		a.active.Add(1)
		a.last.Store(time.Now().UnixNano())
		defer func() {
			a.last.Store(time.Now().UnixNano())
			a.active.Add(-1)
		}()
		next.ServeHTTP(w, r)
	})
}

// quietFor is how long no request has been served: 0 while one is.
func (a *activity) quietFor() time.Duration {
	if a.active.Load() > 0 {
		return 0
	}
	return time.Since(time.Unix(0, a.last.Load()))
}

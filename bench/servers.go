package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// proc is a daemon the benchmark started. Its output goes to a log file in
// the work directory.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, then kills the process group if the daemon lingers;
// daemons that spawn workers (nginx) go with it.
func (p *proc) stop() {
	if p.exited() {
		_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
	}
	_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
	<-p.done
}

func (b *bench) start(name string, cmd *exec.Cmd) (*proc, error) {
	b.seq++
	logPath := filepath.Join(b.work, "logs", fmt.Sprintf("%02d-%s.log", b.seq, name))
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return nil, err
	}
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = f, f
	// Pdeathsig: an interrupted benchmark must not leave daemons holding
	// ports and gigabytes of page cache.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	b.procs = append(b.procs, p)
	return p, nil
}

// logTail is the end of a daemon's log, for error messages.
func (p *proc) logTail() string {
	data, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return strings.Join(lines, "\n")
}

func (b *bench) stopAll() {
	for i := len(b.procs) - 1; i >= 0; i-- {
		b.procs[i].stop()
	}
	b.procs = nil
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// waitReady polls url until it answers 200, the process dies or time runs out.
func waitReady(ctx context.Context, p *proc, url string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited before answering %s: %v\n%s", p.name, url, p.err, p.logTail())
		case <-ctx.Done():
			return fmt.Errorf("%s did not answer %s: %w\n%s", p.name, url, ctx.Err(), p.logTail())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// server is one HTTP server under test.
type server struct {
	kind string // berth, distribution or nginx
	p    *proc
	addr string // 127.0.0.1:PORT
	dir  string
}

func (s *server) url() string { return "http://" + s.addr }

func (s *server) stop() { s.p.stop() }

// upstreamName is what berth calls the upstream registry; with it as the
// default upstream, berth and the distribution proxy take the same image
// references.
const upstreamName = "upstream.local"

func (b *bench) newDir(kind string) (string, error) {
	b.seq++
	dir := filepath.Join(b.work, fmt.Sprintf("%02d-%s", b.seq, kind))
	return dir, os.MkdirAll(dir, 0o755)
}

// launch starts a server on a free port. cmdFor prepares the command for an
// address (writing any config it needs into dir). The port is picked before
// the daemon binds it, so another process on this shared machine may take
// it first; a daemon that dies before it answers is tried again on another.
func (b *bench) launch(ctx context.Context, kind, readyPath string, cmdFor func(dir, addr string) (*exec.Cmd, error)) (*server, error) {
	dir, err := b.newDir(kind)
	if err != nil {
		return nil, err
	}
	for attempt := 1; ; attempt++ {
		addr, err := freeAddr()
		if err != nil {
			return nil, err
		}
		cmd, err := cmdFor(dir, addr)
		if err != nil {
			return nil, err
		}
		p, err := b.start(kind, cmd)
		if err != nil {
			return nil, err
		}
		s := &server{kind: kind, p: p, addr: addr, dir: dir}
		err = waitReady(ctx, p, s.url()+readyPath)
		if err == nil {
			return s, nil
		}
		p.stop()
		if !p.exited() || attempt == 3 || ctx.Err() != nil {
			return nil, err
		}
		b.logf("%s did not start (retrying on another port): %v", kind, err)
	}
}

// startBerth runs berth with an empty cache, the upstream reached through
// the throttled link.
func (b *bench) startBerth(ctx context.Context, tagTTL time.Duration) (*server, error) {
	return b.startBerthOn(ctx, tagTTL, nil)
}

// startBerthOn runs berth as one host of a fleet on the bucket (nil: none).
func (b *bench) startBerthOn(ctx context.Context, tagTTL time.Duration, fleet *fleetBucket) (*server, error) {
	return b.startBerthVia(ctx, b.link.Addr, tagTTL, fleet)
}

// startBerthVia runs berth with its upstream at upstreamAddr (the link, or
// something in front of it) and extra flags.
func (b *bench) startBerthVia(ctx context.Context, upstreamAddr string, tagTTL time.Duration, fleet *fleetBucket, extra ...string) (*server, error) {
	return b.launch(ctx, "berth", "/v2/", func(dir, addr string) (*exec.Cmd, error) {
		args := []string{"serve",
			"--listen", addr,
			"--data", filepath.Join(dir, "data"),
			"--upstream", upstreamName + "=http://" + upstreamAddr,
			"--default-upstream", upstreamName,
			"--tag-ttl", tagTTL.String(),
			"--cache-size", "64GiB",
			"--log-level", "warn",
		}
		// The benchmark's own BERTH_* and AWS_* settings must not leak into
		// the daemon.
		env := cleanEnv("BERTH_", "AWS_")
		if fleet != nil {
			// A fleet host advertises where the others reach it, so a host
			// waiting on its download streams the blob from it as it arrives.
			args = append(args, "--s3-bucket", fleet.bucket, "--s3-prefix", fleet.prefix,
				"--s3-endpoint", fleet.endpoint, "--s3-path-style=true", "--s3-region", fleet.region,
				"--s3-advertise", "http://"+addr)
			env = append(env, fleet.awsEnv()...)
		}
		cmd := exec.Command(b.opt.berthBin, append(args, extra...)...)
		cmd.Env = env
		return cmd, nil
	})
}

const registryConfig = `version: 0.1
log:
  level: %s
  accesslog:
    disabled: true
storage:
%s
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
%s`

// startRegistry runs a distribution registry. storage is its storage
// section's body; empty means the filesystem in its own directory.
func (b *bench) startRegistry(ctx context.Context, kind, storage, extra string) (*server, error) {
	return b.launch(ctx, kind, "/v2/", func(dir, addr string) (*exec.Cmd, error) {
		level := "warn"
		if b.opt.verbose {
			level = "info"
		}
		st := storage
		if st == "" {
			st = "  filesystem:\n    rootdirectory: " + filepath.Join(dir, "storage")
		}
		cfg := filepath.Join(dir, "config.yml")
		conf := fmt.Sprintf(registryConfig, level, st, addr, extra)
		if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
			return nil, err
		}
		cmd := exec.Command(b.opt.registryBin, "serve", cfg)
		// Otherwise it exports traces to an OTLP collector that is not there.
		cmd.Env = append(cleanEnv("REGISTRY_"), "OTEL_TRACES_EXPORTER=none")
		return cmd, nil
	})
}

// startUpstream runs the registry that plays Docker Hub.
func (b *bench) startUpstream(ctx context.Context) (*server, error) {
	return b.startRegistry(ctx, "upstream", "", "")
}

// startDistribution runs the distribution registry in proxy mode, with an
// empty cache, in front of the same throttled link as berth.
func (b *bench) startDistribution(ctx context.Context) (*server, error) {
	return b.startDistributionOn(ctx, nil)
}

// startDistributionOn runs the distribution proxy with its storage in the
// fleet's bucket (nil: on its own filesystem). Redirects are off: like
// berth, it serves the blobs itself, with S3 behind it.
func (b *bench) startDistributionOn(ctx context.Context, fleet *fleetBucket) (*server, error) {
	storage := ""
	if fleet != nil {
		storage = fmt.Sprintf(`  s3:
    accesskey: %s
    secretkey: %s
    region: %s
    regionendpoint: %s
    forcepathstyle: true
    secure: false
    bucket: %s
    rootdirectory: /%s
  redirect:
    disable: true`, fleet.accessKey, fleet.secretKey, fleet.region, fleet.endpoint, fleet.bucket, strings.TrimSuffix(fleet.prefix, "/"))
	}
	return b.startRegistry(ctx, "distribution", storage, fmt.Sprintf("proxy:\n  remoteurl: http://%s\n", b.link.Addr))
}

const nginxConfig = `daemon off;
master_process on;
worker_processes %d;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log warn;
%[5]s
events { worker_connections 1024; }
http {
  sendfile on;
  sendfile_max_chunk 0;
  access_log off;
  client_body_temp_path %[2]s/body;
  proxy_temp_path %[2]s/proxy;
  fastcgi_temp_path %[2]s/fastcgi;
  uwsgi_temp_path %[2]s/uwsgi;
  scgi_temp_path %[2]s/scgi;
  default_type application/octet-stream;
  server {
    listen %[3]s;
    root %[4]s;
  }
}
`

// startNginx serves root with sendfile: the yardstick for serving hot blobs.
// Its settings are the ones that made it cheapest per byte here, to keep
// the yardstick strict: no sendfile_max_chunk (nginx's default before
// 1.21.4; the 2m default since costs about a third more CPU) and no
// tcp_nopush (Debian's stock configuration turns it on; it costs more too).
func (b *bench) startNginx(ctx context.Context, root string) (*server, error) {
	return b.launch(ctx, "nginx", "/"+bigBlobFile, func(dir, addr string) (*exec.Cmd, error) {
		// As root, nginx's workers switch to an unprivileged user by
		// default; keep them as the benchmark's user so they can read the
		// work directory.
		user := ""
		if os.Geteuid() == 0 {
			user = "user root;"
		}
		conf := fmt.Sprintf(nginxConfig, nginxWorkers(), dir, addr, root, user)
		cfg := filepath.Join(dir, "nginx.conf")
		if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
			return nil, err
		}
		return exec.Command(b.opt.nginxBin, "-e", filepath.Join(dir, "error.log"), "-p", dir, "-c", cfg), nil
	})
}

// nginxWorkers is one worker per core, nginx's "auto".
func nginxWorkers() int {
	n := 0
	if data, err := os.ReadFile("/sys/fs/cgroup/cpu.max"); err == nil {
		var quota, period int
		if _, err := fmt.Sscanf(string(data), "%d %d", &quota, &period); err == nil && period > 0 {
			n = quota / period
		}
	}
	if n <= 0 {
		n = numCPU()
	}
	return n
}

// cleanEnv is this process's environment without the variables that start
// with any of prefixes.
func cleanEnv(prefixes ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		keep := true
		for _, p := range prefixes {
			if strings.HasPrefix(kv, p) {
				keep = false
			}
		}
		if keep {
			env = append(env, kv)
		}
	}
	return env
}

// findTool looks in the project's ./bin first (where scripts/test installs
// the test tools), then PATH, then the sbin directories.
func findTool(root, name string) (string, error) {
	if p := filepath.Join(root, "bin", name); isExecutable(p) {
		return p, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/usr/local/sbin", "/sbin"} {
		if p := filepath.Join(d, name); isExecutable(p) {
			return p, nil
		}
	}
	return "", errors.New(name + " not found in ./bin, PATH or /usr/sbin")
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

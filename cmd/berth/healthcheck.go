package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/healthcheck"
)

func init() {
	register("healthcheck", "probe the berth listening on --listen: exit 0 healthy, 1 not, 2 bad usage (for HEALTHCHECK and exec probes)", runHealthcheck)
}

const defaultHealthcheckListen = "127.0.0.1:5000"

func runHealthcheck(args []string) int {
	return healthcheckMain(args, os.LookupEnv, os.Stdout, os.Stderr)
}

// healthcheckMain exits 0 when the probed endpoint answers 200, 1 when it
// answers anything else or nothing answers, 2 when the command line is
// wrong. It needs no shell, no DNS and no files, so a scratch image's
// HEALTHCHECK and a Kubernetes exec probe can run it as is.
func healthcheckMain(args []string, lookupEnv func(string) (string, bool), stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("berth healthcheck", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "", "`ADDR` berth listens on; 0.0.0.0 and an empty host are probed on 127.0.0.1 (default $BERTH_LISTEN, else the --config file's listen, else "+defaultHealthcheckListen+")")
	configFile := fs.String("config", "", "read the listen address from this berth config `FILE` when neither --listen nor $BERTH_LISTEN is given")
	timeout := fs.Duration("timeout", 3*time.Second, "give up and report unhealthy after this `DURATION`")
	path := fs.String("path", "/readyz", "endpoint `PATH` to probe: /readyz (ready), /healthz or /livez (alive), or /status (200 when ready); any other path that answers 200 counts as healthy")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: berth healthcheck [--listen ADDR | --config FILE] [--timeout 3s] [--path /readyz]")
		fmt.Fprintln(stderr, "\nProbes the berth on this host. Exit status: 0 healthy, 1 unhealthy or not running, 2 bad usage.")
		fmt.Fprintln(stderr, "\nFlags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	fail := func(code int, format string, a ...any) int {
		fmt.Fprintf(stderr, "berth healthcheck: "+format+"\n", a...)
		return code
	}
	if fs.NArg() > 0 {
		return fail(2, "unexpected argument %q", fs.Arg(0))
	}
	if *timeout <= 0 {
		return fail(2, "--timeout must be positive, not %s", *timeout)
	}
	if *path == "" {
		return fail(2, "--path must not be empty")
	}

	addr, origin := *listen, "--listen"
	if addr == "" {
		if v, ok := lookupEnv("BERTH_LISTEN"); ok && v != "" {
			addr, origin = v, "$BERTH_LISTEN"
		}
	}
	if addr == "" && *configFile != "" {
		cfg, err := config.Load(*configFile)
		if err != nil {
			return fail(2, "%v", err)
		}
		addr, origin = cfg.Listen, *configFile
	}
	if addr == "" {
		addr = defaultHealthcheckListen
	}
	if _, err := healthcheck.DialAddr(addr); err != nil {
		return fail(2, "%s: %v", origin, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if err := healthcheck.Probe(ctx, addr, *path); err != nil {
		if ctx.Err() != nil {
			return fail(1, "unhealthy: %v (--timeout %s)", err, *timeout)
		}
		return fail(1, "unhealthy: %v", err)
	}
	u, _ := healthcheck.ProbeURL(addr, *path)
	fmt.Fprintf(stdout, "healthy: %s answered 200\n", u)
	return 0
}

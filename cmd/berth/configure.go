package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/deploy"
)

func init() {
	register("configure", "print or write the config that points containerd, docker or crio at berth", runConfigure)
}

const configureUsage = `Usage: berth configure containerd|docker|crio [flags]

Prints the runtime configuration that makes it pull through berth, or with
--write merges it into the runtime's files, keeping everything else in them.

  containerd  one hosts.toml per upstream registry in --dir (/etc/containerd/certs.d)
  docker      registry-mirrors in --file (/etc/docker/daemon.json); Docker Hub only
  crio        [[registry.mirror]] entries in --file (/etc/containers/registries.conf.d/berth.conf)

The registries come from --upstream, else $BERTH_UPSTREAM, else --config (or
the embedded default config); berth's address likewise from --listen,
$BERTH_LISTEN, the config file.

Flags:
`

// upstreamFlags collects repeated --upstream HOST=URL values.
type upstreamFlags []string

func (u *upstreamFlags) String() string { return strings.Join(*u, ",") }
func (u *upstreamFlags) Set(v string) error {
	host, url, ok := strings.Cut(v, "=")
	if !ok || host == "" || url == "" {
		return fmt.Errorf("%q is not HOST=URL", v)
	}
	*u = append(*u, v)
	return nil
}

func runConfigure(args []string) int {
	fs := flag.NewFlagSet("berth configure", flag.ContinueOnError)
	// flag's own messages span several lines; berth prints one.
	fs.SetOutput(io.Discard)
	configFile := fs.String("config", "", "read berth's listen address and upstreams from this config `FILE`")
	listen := fs.String("listen", "", "`ADDR` berth listens on (default 127.0.0.1:5000) [$BERTH_LISTEN]")
	var upstreams upstreamFlags
	fs.Var(&upstreams, "upstream", "`HOST=URL` upstream registry, repeatable; replaces the configured list [$BERTH_UPSTREAM]")
	write := fs.Bool("write", false, "merge into the runtime's files instead of printing")
	dir := fs.String("dir", "", "containerd: certs.d `DIR` to write hosts.toml files into (default /etc/containerd/certs.d)")
	file := fs.String("file", "", "docker, crio: the `FILE` to write (defaults above)")
	dial := fs.Duration("dial-timeout", deploy.DefaultDialTimeout, "containerd: how long (`DURATION`) to wait to connect to berth before using the upstream")

	fail := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "berth configure: "+format+"\n", a...)
		return 2
	}
	// The runtime may come before, between or after the flags.
	var runtime string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fs.SetOutput(os.Stdout)
				fmt.Print(configureUsage)
				fs.PrintDefaults()
				return 0
			}
			return fail("%v (run 'berth configure --help')", err)
		}
		if fs.NArg() == 0 {
			break
		}
		if runtime != "" {
			return fail("unexpected argument %q", fs.Arg(0))
		}
		runtime, args = fs.Arg(0), fs.Args()[1:]
	}
	if runtime == "" {
		return fail("name a runtime: containerd, docker or crio (run 'berth configure --help')")
	}
	if _, ok := deploy.Runtimes[runtime]; !ok {
		return fail("unknown runtime %q: want containerd, docker or crio", runtime)
	}
	if *dir != "" && runtime != "containerd" {
		return fail("--dir is for containerd; %s writes one file, given with --file", runtime)
	}
	if *file != "" && runtime == "containerd" {
		return fail("--file is for docker and crio; containerd writes a directory, given with --dir")
	}

	cfg := config.Default()
	if *configFile != "" {
		c, err := config.Load(*configFile)
		if err != nil {
			return fail("%v", err)
		}
		cfg = c
	}
	// Only the two settings configure uses are taken from the environment,
	// so an unrelated bad BERTH_* variable cannot stop it.
	var env config.Overrides
	env.ReadEnv(func(k string) (string, bool) {
		if k != "BERTH_LISTEN" && k != "BERTH_UPSTREAM" {
			return "", false
		}
		return os.LookupEnv(k)
	})
	if err := env.Apply(cfg); err != nil {
		return fail("%v", err)
	}
	t := deploy.Target{Listen: cfg.Listen, Upstreams: map[string]string{}, DialTimeout: *dial}
	if *listen != "" {
		t.Listen = *listen
	}
	if len(upstreams) > 0 {
		for _, u := range upstreams {
			host, url, _ := strings.Cut(u, "=")
			t.Upstreams[host] = url
		}
	} else {
		for h, u := range cfg.Upstreams {
			t.Upstreams[h] = u.URL
		}
	}
	path := *dir + *file

	read := deploy.NoFiles
	if *write {
		read = os.ReadFile
	}
	files, notes, err := deploy.Plan(runtime, t, path, read)
	var ioErr *deploy.IOError
	switch {
	case errors.As(err, &ioErr):
		fmt.Fprintf(os.Stderr, "berth configure: %v\n", err)
		return 1
	case err != nil:
		return fail("%v", err)
	}
	if !*write {
		for i, f := range files {
			if i > 0 {
				fmt.Println()
			}
			if runtime == "docker" {
				// JSON has no comments; the path goes to stderr so that
				// stdout stays a valid daemon.json.
				fmt.Fprintf(os.Stderr, "# %s\n", f.Path)
			} else {
				fmt.Printf("# %s\n", f.Path)
			}
			os.Stdout.Write(f.Content)
		}
	} else {
		if err := deploy.Write(files); err != nil {
			fmt.Fprintf(os.Stderr, "berth configure: %v\n", err)
			return 1
		}
		for _, f := range files {
			if f.Changed {
				fmt.Printf("wrote %s\n", f.Path)
			} else {
				fmt.Printf("unchanged %s\n", f.Path)
			}
		}
	}
	for _, n := range notes {
		fmt.Fprintf(os.Stderr, "note: %s\n", n)
	}
	return 0
}

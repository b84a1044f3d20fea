// Command berth is a host-local pull-through registry mirror.
package main

import (
	"fmt"
	"os"
	"sort"
)

// A subcommand gets its arguments (without its own name) and returns the
// process exit code; each lives in a file of its own beside this one.
type subcommand struct {
	summary string
	run     func(args []string) int
}

var subcommands = map[string]subcommand{}

func register(name, summary string, run func(args []string) int) {
	subcommands[name] = subcommand{summary: summary, run: run}
}

func usage() {
	fmt.Fprintln(os.Stderr, "berth: a host-local pull-through container registry mirror")
	fmt.Fprintln(os.Stderr, "\nUsage: berth COMMAND [flags]\n\nCommands:")
	names := make([]string, 0, len(subcommands))
	for n := range subcommands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-12s %s\n", n, subcommands[n].summary)
	}
	fmt.Fprintln(os.Stderr, "\nRun 'berth COMMAND --help' for a command's flags.")
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	name := os.Args[1]
	switch name {
	case "-h", "--help", "help":
		usage()
		os.Exit(0)
	}
	cmd, ok := subcommands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "berth: unknown command %q (run 'berth --help')\n", name)
		os.Exit(2)
	}
	os.Exit(cmd.run(os.Args[2:]))
}

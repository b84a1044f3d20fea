package main

import (
	"fmt"
	"io"
	"os"

	"github.com/berth-dev/berth/config"
)

func init() {
	register("config", "print the embedded default configuration or check a file: config default | config check FILE", runConfig)
}

func runConfig(args []string) int { return configMain(args, os.Stdout, os.Stderr) }

func configMain(args []string, stdout, stderr io.Writer) int {
	usage := func() {
		fmt.Fprintln(stderr, "Usage: berth config default       print the embedded default configuration\n       berth config check FILE    validate FILE without starting berth")
	}
	if len(args) == 0 {
		usage()
		return 2
	}
	switch args[0] {
	case "-h", "--help", "help":
		usage()
		return 0
	case "default":
		if len(args) != 1 {
			usage()
			return 2
		}
		stdout.Write(config.DefaultYAML())
		return 0
	case "check":
		if len(args) != 2 {
			usage()
			return 2
		}
		cfg, err := config.Load(args[1])
		if err == nil {
			err = cfg.Validate()
		}
		if err == nil {
			err = cfg.CheckDataDir()
		}
		if err != nil {
			fmt.Fprintf(stderr, "berth config check: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "%s: ok\n", args[1])
		return 0
	}
	fmt.Fprintf(stderr, "berth config: unknown subcommand %q\n", args[0])
	usage()
	return 2
}

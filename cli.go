package main

import (
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"runtime/debug"
	"strings"
)

// envExample is .env.example: every variable with its default and what it
// means, which the usage prints.
//
//go:embed .env.example
var envExample string

// action is what the command line asks for.
type action int

const (
	actServe action = iota
	actHealthcheck
	actExit // done: exit with the code given
)

// parseCommandLine reads the arguments after the program's name. None
// serves; -healthcheck checks a running server; -h or -help prints the
// usage to stdout and -version the version, each then exiting 0; an
// unknown flag or any argument prints the problem and the usage to stderr
// and exits 2, as the flag package's programs do.
func parseCommandLine(args []string, stdout, stderr io.Writer) (act action, code int) {
	fs := flag.NewFlagSet("analytics", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // the errors are printed here, with the usage
	fs.Usage = func() {}
	health := fs.Bool("healthcheck", false, "request /health from the server at ADDR; exit 0 when it answers 200, 1 otherwise")
	version := fs.Bool("version", false, "print the version and exit")
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		printUsage(stdout, fs)
		return actExit, 0
	case err == nil && fs.NArg() > 0:
		err = fmt.Errorf("unexpected argument %q: the service is configured by environment variables", fs.Arg(0))
	}
	if err != nil {
		fmt.Fprintf(stderr, "analytics: %v\n\n", err)
		printUsage(stderr, fs)
		return actExit, 2
	}
	switch {
	case *version:
		fmt.Fprintln(stdout, versionString())
		return actExit, 0
	case *health:
		return actHealthcheck, 0
	}
	return actServe, 0
}

func printUsage(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprint(w, `Usage: analytics [-healthcheck | -version | -h]

With no flag, analytics serves the metrics API on ADDR (default :8000) until
SIGTERM or Ctrl-C. The flags:

`)
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
	fmt.Fprint(w, `
It is configured by environment variables only. Each, with its default:

`)
	for line := range strings.Lines(envExample) {
		if line != "\n" {
			fmt.Fprint(w, "  ")
		}
		fmt.Fprint(w, line)
	}
	fmt.Fprint(w, `
More in README.md.
`)
}

// versionString is the version the binary was built from, as Go recorded
// it: the module version, or the commit when built from a checkout.
func versionString() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "analytics (unknown version)"
	}
	v := "analytics " + bi.Main.Version
	settings := map[string]string{}
	for _, s := range bi.Settings {
		settings[s.Key] = s.Value
	}
	if rev := settings["vcs.revision"]; rev != "" {
		v += " commit " + rev[:min(12, len(rev))]
		if settings["vcs.modified"] == "true" {
			v += " (modified)"
		}
		if t := settings["vcs.time"]; t != "" {
			v += " of " + t
		}
	}
	return v + ", " + bi.GoVersion
}

package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestCommandLine(t *testing.T) {
	for _, c := range []struct {
		args     []string
		act      action
		code     int
		out, err string // what stdout and stderr hold; "" for nothing
	}{
		{nil, actServe, 0, "", ""},
		{[]string{"-healthcheck"}, actHealthcheck, 0, "", ""},
		{[]string{"-h"}, actExit, 0, "Usage: analytics", ""},
		{[]string{"-help"}, actExit, 0, "REDIS_URL=", ""},
		{[]string{"--help"}, actExit, 0, "-healthcheck", ""},
		{[]string{"-version"}, actExit, 0, "analytics ", ""},
		{[]string{"-nope"}, actExit, 2, "", "flag provided but not defined: -nope"},
		{[]string{"-version=maybe"}, actExit, 2, "", "invalid boolean value"},
		{[]string{"serve"}, actExit, 2, "", `unexpected argument "serve"`},
		{[]string{"-version", "extra"}, actExit, 2, "", `unexpected argument "extra"`},
	} {
		var out, errOut bytes.Buffer
		act, code := parseCommandLine(c.args, &out, &errOut)
		if act != c.act || code != c.code {
			t.Errorf("%q: action %d, code %d; want %d, %d", c.args, act, code, c.act, c.code)
		}
		for _, w := range []struct {
			name, got, want string
		}{{"stdout", out.String(), c.out}, {"stderr", errOut.String(), c.err}} {
			if w.want == "" && w.got != "" || !strings.Contains(w.got, w.want) {
				t.Errorf("%q: %s = %q, want it to hold %q", c.args, w.name, w.got, w.want)
			}
		}
		// A mistake shows the usage too, on stderr.
		if c.code == 2 && !strings.Contains(errOut.String(), "Usage: analytics") {
			t.Errorf("%q: stderr has no usage: %q", c.args, errOut.String())
		}
	}
}

// TestUsageListsEveryVariable: the usage, which is .env.example, names
// every variable the configuration reads.
func TestUsageListsEveryVariable(t *testing.T) {
	var out bytes.Buffer
	parseCommandLine([]string{"-h"}, &out, &out)
	var read []string
	loadConfig(func(name string) string { read = append(read, name); return "" })
	for _, name := range read {
		if !strings.Contains(out.String(), "\n  "+name+"=") {
			t.Errorf("the usage does not list %s", name)
		}
	}
	if len(read) < 20 {
		t.Fatalf("loadConfig read only %d variables: %v", len(read), read)
	}
}

// TestBinaryCommandLine runs the built binary as a user would: -h and
// -version exit 0, a wrong flag or an argument exits 2 at once instead of
// starting a server.
func TestBinaryCommandLine(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "analytics")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"-h"}, 0, "Usage: analytics"},
		{[]string{"-version"}, 0, "analytics "},
		{[]string{"-bogus"}, 2, "flag provided but not defined"},
		{[]string{"serve"}, 2, "unexpected argument"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		cmd := exec.CommandContext(ctx, bin, c.args...)
		cmd.Env = []string{"ADDR=127.0.0.1:0"} // were it to serve, it would not exit
		out, err := cmd.CombinedOutput()
		cancel()
		code := 0
		if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("%q: %v", c.args, err)
		}
		if code != c.code || !strings.Contains(string(out), c.want) {
			t.Errorf("%q: exit %d with %q; want %d with %q", c.args, code, out, c.code, c.want)
		}
	}
}

// TestComposePassesEveryVariable: docker-compose.yml, and the cluster's
// docker-compose.cluster.yml, hand the service every variable of
// .env.example from the shell or a .env file, but for the store and the
// addresses, which they set themselves.
func TestComposePassesEveryVariable(t *testing.T) {
	for _, file := range []string{"docker-compose.yml", "docker-compose.cluster.yml"} {
		compose, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		fixed := map[string]bool{"ADDR": true, "STORE": true, "REDIS_URL": true, "REDIS_HOST": true, "REDIS_PORT": true, "REDIS_CLUSTER": true}
		n := 0
		for line := range strings.Lines(envExample) {
			name, _, ok := strings.Cut(strings.TrimSpace(line), "=")
			if !ok || strings.HasPrefix(name, "#") || fixed[name] {
				continue
			}
			n++
			if want := "      " + name + ": ${" + name + ":-}\n"; !strings.Contains(string(compose), want) {
				t.Errorf("%s does not pass %s (want the line %q)", file, name, want)
			}
		}
		if n < 20 {
			t.Fatalf("only %d variables in .env.example", n)
		}
	}
}

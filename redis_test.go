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
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// sharedRedis is the Redis every Redis-backed test uses, each test under a
// key prefix of its own: a redis-server this binary started, or REDIS_URL.
// Its address is empty when neither is available.
var sharedRedis struct {
	addr string
	url  string // REDIS_URL when that is what the tests use
}

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	// A fuzz worker runs only the fuzz target, which needs no Redis; a
	// redis-server started here would hold the worker's pipes open.
	flag.Parse()
	if f := flag.Lookup("test.fuzzworker"); f != nil && f.Value.String() == "true" {
		return m.Run()
	}
	required := os.Getenv("REQUIRE_REDIS") == "1"
	if u := os.Getenv("REDIS_URL"); u != "" {
		cfg, err := loadConfig(func(k string) string { return map[string]string{"REDIS_URL": u}[k] })
		if err != nil {
			fmt.Fprintln(os.Stderr, "REDIS_URL:", err)
			return 1
		}
		sharedRedis.addr, sharedRedis.url = cfg.RedisAddr, u
	} else if _, err := exec.LookPath("redis-server"); err == nil {
		dir, err := os.MkdirTemp("", "redis-test-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		srv, err := startRedisServer(dir)
		if err != nil {
			fmt.Fprintln(os.Stderr, "starting redis-server:", err)
			return 1
		}
		defer srv.kill()
		sharedRedis.addr = srv.addr
	} else if required {
		fmt.Fprintln(os.Stderr, "REQUIRE_REDIS=1 but redis-server is not on PATH and REDIS_URL is not set")
		return 1
	}
	if _, err := exec.LookPath("redis-server"); err == nil {
		dir, err := os.MkdirTemp("", "redis-cluster-test-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		stop, ok := startSharedCluster(dir)
		if !ok {
			return 1
		}
		defer stop()
	}
	// os/signal starts a goroutine for the life of the process the first
	// time run subscribes to signals; start it now so it is not counted.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR2)
	signal.Stop(sig)
	before := runtime.NumGoroutine()
	code := m.Run()
	if code == 0 {
		code = checkGoroutines(before)
	}
	return code
}

// checkGoroutines fails the run when goroutines started by the tests are
// still alive at the end: a leak in the service or in a test.
func checkGoroutines(before int) int {
	http.DefaultClient.CloseIdleConnections()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			fmt.Fprintf(os.Stderr, "goroutine leak: %d goroutines at the end, %d at the start\n", runtime.NumGoroutine(), before)
			pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
			return 1
		}
		time.Sleep(10 * time.Millisecond) // polling while the last ones exit
	}
	return 0
}

// needRedis skips a Redis test when no Redis is available, unless
// REQUIRE_REDIS=1 makes that a failure (TestMain has already failed then).
func needRedis(t testing.TB) {
	t.Helper()
	if sharedRedis.addr == "" {
		if os.Getenv("REQUIRE_REDIS") == "1" {
			t.Fatal("REQUIRE_REDIS=1 and no Redis is available")
		}
		t.Skip("no redis-server on PATH and no REDIS_URL: Redis half skipped")
	}
}

// redisServer is a redis-server process a test started and owns.
type redisServer struct {
	addr string
	dir  string
	args []string
	cmd  *exec.Cmd
}

// startRedisServer starts redis-server on a free loopback port with its
// files in dir, and waits until it answers PING.
func startRedisServer(dir string, extra ...string) (*redisServer, error) {
	var lastErr error
	for range 5 { // the free port can be taken between probe and start
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		s := &redisServer{addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), dir: dir, args: extra}
		if lastErr = s.start(); lastErr == nil {
			return s, nil
		}
	}
	return nil, lastErr
}

func (s *redisServer) start() error {
	_, port, _ := net.SplitHostPort(s.addr)
	args := append([]string{
		"--port", port, "--bind", "127.0.0.1", "--dir", s.dir,
		"--save", "", "--appendonly", "no", "--protected-mode", "no",
		"--logfile", filepath.Join(s.dir, "redis.log"),
	}, s.args...)
	s.cmd = exec.Command("redis-server", args...)
	if err := s.cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	go func() { s.cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return errors.New("redis-server exited at start (port taken?)")
		default:
		}
		if c, err := redis.Dial("tcp", s.addr, redis.DialConnectTimeout(100*time.Millisecond)); err == nil {
			_, err = c.Do("PING")
			c.Close()
			if err == nil {
				return nil
			}
		}
		time.Sleep(10 * time.Millisecond) // polling for readiness, not for a result
	}
	s.cmd.Process.Kill()
	return errors.New("redis-server did not answer PING within 10s")
}

// kill stops the server at once, as a crash would.
func (s *redisServer) kill() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
		s.cmd.Process.Wait()
	}
}

// restart starts the server again on the same port and directory.
func (s *redisServer) restart(t testing.TB) {
	t.Helper()
	if err := s.start(); err != nil {
		t.Fatalf("restarting redis-server: %v", err)
	}
}

// startRedis starts a redis-server owned by one test and stopped after it.
// REDIS_URL is no substitute: the test kills and restarts its server.
func startRedis(t testing.TB, extra ...string) *redisServer {
	t.Helper()
	needRedis(t)
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("REQUIRE_REDIS") == "1" {
			t.Fatal("REQUIRE_REDIS=1 and redis-server, which this test starts and kills, is not on PATH")
		}
		t.Skip("this test starts and kills its own redis-server, which is not on PATH")
	}
	s, err := startRedisServer(t.TempDir(), extra...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.kill)
	return s
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// hungRedis is a Redis that accepts connections, reads what it is sent and
// never answers, as a stalled one would. It returns its address.
func hungRedis(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns sync.WaitGroup
	t.Cleanup(func() { ln.Close(); conns.Wait() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer conns.Done()
				defer c.Close()
				io.Copy(io.Discard, c) // until the client hangs up
			}()
		}
	}()
	return ln.Addr().String()
}

func TestRedisPoolDeadline(t *testing.T) {
	cfg := testConfig(t)
	cfg.RedisAddr = hungRedis(t)
	cfg.RedisTimeout = 100 * time.Millisecond
	pool := newRedisPool(cfg, nil)
	defer pool.Close()
	start := time.Now()
	err := pool.ping(context.Background())
	if err == nil {
		t.Fatal("ping of a hung Redis succeeded")
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("ping of a hung Redis took %v, want about REDIS_TIMEOUT (100ms)", d)
	}
}

func TestRedisClockOffset(t *testing.T) {
	needRedis(t)
	pool := testPool(t, testConfig(t), testPrefix())
	if err := pool.ping(context.Background()); err != nil { // dials, reading Redis's clock
		t.Fatal(err)
	}
	// The same host's clock: the offset is the measuring error only.
	if off := time.Duration(pool.clockOffset.Load()) * time.Microsecond; off < -50*time.Millisecond || off > 50*time.Millisecond {
		t.Errorf("clock offset to a Redis on this host = %v, want about 0", off)
	}
	// The fence is on Redis's clock: with the offset believed to be an
	// hour behind while it is not, every write is fenced out; with it
	// right, none is.
	b := newRedisBackend(pool, testPrefix(), testConfig(t), time.Now)
	one := sample{typ: "cpu", at: 1, value: 1}
	// The ingest borrows a pooled connection: dialled now, so that its
	// reading of the clock comes before the offset the test sets.
	if err := storeAdd(b, one); err != nil {
		t.Fatal(err)
	}
	pool.clockOffset.Store(-time.Hour.Microseconds())
	if err := storeAdd(b, one); err == nil || !strings.Contains(err.Error(), "FENCED") {
		t.Errorf("add with the offset wrong by an hour = %v, want FENCED", err)
	}
	pool.clockOffset.Store(0)
	if err := storeAdd(b, one); err != nil {
		t.Errorf("add with the offset right = %v, want nil", err)
	}
}

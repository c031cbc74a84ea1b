package main

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// The HTTP benchmarks drive the built service binary and a bare net/http
// handler with wrk (Debian's package), one after the other in the same run,
// and report the service's throughput as a ratio to the bare handler's,
// since absolute numbers depend on the machine and what else it runs:
//
//	go test -run '^$' -bench HTTP -benchtime=1x
//
// BENCH_SECONDS sets each measurement's length (default 5). Each Redis
// scenario starts a redis-server of its own and kills it afterwards.

// benchScenario is one load shape: a wrk Lua script (empty for plain GETs)
// and the path it starts from.
type benchScenario struct {
	name    string
	path    string
	script  string
	samples int // per request, for a samples/s figure; 0 for none
}

// wrkTypes spreads writes over 16 metric types.
const wrkTypes = `local types = {}
for i = 1, 16 do types[i] = "type" .. i end
local n = 0`

var benchScenarios = []benchScenario{
	{name: "ingest", path: "/api/metrics", samples: 1, script: wrkTypes + `
request = function()
  n = n + 1
  local body = '{"timestamp":"2025-01-01T10:00:00Z","value":' .. (n % 1000) .. ',"type":"' .. types[n % 16 + 1] .. '"}'
  return wrk.format("POST", "/api/metrics", {["Content-Type"] = "application/json"}, body)
end`},
	{name: "ingest-4-labels", path: "/api/metrics", samples: 1, script: wrkTypes + `
request = function()
  n = n + 1
  local body = '{"timestamp":"2025-01-01T10:00:00Z","value":' .. (n % 1000) .. ',"type":"' .. types[n % 16 + 1] ..
    '","labels":{"host":"web-' .. (n % 50) .. '","region":"eu","service":"checkout","az":"b"}}'
  return wrk.format("POST", "/api/metrics", {["Content-Type"] = "application/json"}, body)
end`},
	{name: "ingest-8-labels", path: "/api/metrics", samples: 1, script: wrkTypes + `
request = function()
  n = n + 1
  local body = '{"timestamp":"2025-01-01T10:00:00Z","value":' .. (n % 1000) .. ',"type":"' .. types[n % 16 + 1] ..
    '","labels":{"host":"web-' .. (n % 50) .. '","region":"eu","service":"checkout","az":"b","env":"prod","team":"payments","version":"1.4.2","pod":"p-' .. (n % 7) .. '"}}'
  return wrk.format("POST", "/api/metrics", {["Content-Type"] = "application/json"}, body)
end`},
	{name: "summary-hit", path: "/api/metrics/summary?metric_type=type1"},
	{name: "mix", path: "/", script: wrkTypes + `
request = function()
  n = n + 1
  local t = types[n % 16 + 1]
  if n % 10 == 0 then
    local body = '{"timestamp":"2025-01-01T10:00:00Z","value":' .. (n % 1000) .. ',"type":"' .. t .. '"}'
    return wrk.format("POST", "/api/metrics", {["Content-Type"] = "application/json"}, body)
  end
  return wrk.format("GET", "/api/metrics/summary?metric_type=" .. t)
end`},
	{name: "health", path: "/health"},
	{name: "batch-10000-one-type", path: "/api/metrics", samples: 10000, script: `
local items = {}
for i = 1, 10000 do
  items[i] = '{"timestamp":"2025-01-01T10:00:' .. string.format("%02d.%04d", i % 60, i) .. 'Z","value":' .. (i % 500) / 4 .. ',"type":"cpu"}'
end
local body = "[" .. table.concat(items, ",") .. "]"
request = function()
  return wrk.format("POST", "/api/metrics", {["Content-Type"] = "application/json"}, body)
end`},
	{name: "batch-1000", path: "/api/metrics", samples: 1000, script: wrkTypes + `
local items = {}
for i = 1, 1000 do
  items[i] = '{"timestamp":"2025-01-01T10:' .. string.format("%02d:%02d", math.floor(i / 60) % 60, i % 60) .. 'Z","value":' .. i .. ',"type":"' .. types[i % 16 + 1] .. '"}'
end
local body = "[" .. table.concat(items, ",") .. "]"
request = function()
  return wrk.format("POST", "/api/metrics", {["Content-Type"] = "application/json"}, body)
end`},
}

// wrkSetup finds wrk (skipping without it), reads BENCH_SECONDS, builds
// the service and starts the bare handler.
func wrkSetup(b *testing.B) (wrk string, secs int, bin, bare string) {
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		b.Skip("wrk is not on PATH (Debian: apt-get install wrk)")
	}
	secs = 5
	if s, err := strconv.Atoi(os.Getenv("BENCH_SECONDS")); err == nil && s > 0 {
		secs = s
	}
	return wrk, secs, buildService(b), startBare(b)
}

func BenchmarkHTTP(b *testing.B) {
	wrk, secs, bin, bare := wrkSetup(b)
	// redis-pool is Redis with REDIS_PIPELINE=false: every command on a
	// pooled connection of its own, for comparison in the same run.
	for _, store := range []string{"memory", "redis", "redis-pool"} {
		for _, sc := range benchScenarios {
			b.Run(store+"/"+sc.name, func(b *testing.B) {
				env := map[string]string{"STORE": store, "RATE_LIMIT": "1000000000", "LOG_LEVEL": "info"}
				if store == "redis-pool" {
					env["STORE"], env["REDIS_PIPELINE"] = "redis", "false"
				}
				redisCPU := func() float64 { return 0 }
				if env["STORE"] == "redis" {
					// The service writes without a key prefix, so it gets a
					// redis-server of its own, fresh for each scenario,
					// rather than the tests' shared one or REDIS_URL.
					addr := startRedis(b).addr
					env["REDIS_URL"] = "redis://" + addr + "/0"
					redisCPU = func() float64 { return redisCPUSeconds(b, addr) }
				}
				svc := startService(b, bin, env)
				script := writeScript(b, sc.script)
				seed(b, svc.base)
				bareRate, _ := runWrk(b, wrk, bare+sc.path, script, secs)
				cpu0 := redisCPU()
				rate, failed, p99 := runWrkLatency(b, wrk, svc.base+sc.path, script, secs)
				if env["STORE"] == "redis" {
					// Per request answered, the 503s included: they cost
					// Redis too.
					b.ReportMetric((redisCPU()-cpu0)*1e6/(rate*float64(secs)/(1-failed)), "redis-cpu-us/req")
				}
				b.ReportMetric(p99, "p99-ms")
				b.ReportMetric(rate/bareRate, "ratio")
				b.ReportMetric(rate, "req/s")
				b.ReportMetric(bareRate, "bare-req/s")
				b.ReportMetric(failed, "failed-share") // 503s when Redis is saturated
				if sc.samples > 1 {
					b.ReportMetric(rate*float64(sc.samples), "samples/s")
				}
				b.ReportMetric(svc.peakMiB(b), "peak-MiB")
			})
		}
	}
}

// BenchmarkClusterHTTP puts two service instances on one Redis, then on a
// Redis Cluster of three masters, in the same run, and drives both
// instances at once (the connections split between them) against a bare
// handler: the ratio of their combined throughput to the bare handler's,
// and the CPU Redis spent per request, all masters added up.
//
//	go test -run '^$' -bench ClusterHTTP -benchtime=1x
func BenchmarkClusterHTTP(b *testing.B) {
	wrk, secs, bin, bare := wrkSetup(b)
	for _, sc := range benchScenarios {
		if !slices.Contains([]string{"ingest", "summary-hit", "mix", "batch-1000"}, sc.name) {
			continue
		}
		// cluster-1 is one master in cluster mode: what cluster mode itself
		// costs Redis, apart from spreading the keys.
		for _, store := range []string{"redis", "cluster-1", "cluster"} {
			b.Run(sc.name+"/"+store, func(b *testing.B) {
				env := map[string]string{"STORE": "redis", "RATE_LIMIT": "1000000000", "LOG_LEVEL": "warn"}
				var addrs []string
				if store == "redis" {
					addrs = []string{startRedis(b).addr}
					env["REDIS_URL"] = "redis://" + addrs[0] + "/0"
				} else {
					needCluster(b)
					masters := map[string]int{"cluster-1": 1, "cluster": 3}[store]
					c, err := startCluster(b.TempDir(), masters)
					if err != nil {
						b.Fatal(err)
					}
					b.Cleanup(c.kill)
					addrs = c.addrs()
					env["REDIS_CLUSTER"] = strings.Join(addrs, ",")
				}
				svcs := []service{startService(b, bin, env), startService(b, bin, env)}
				script := writeScript(b, sc.script)
				seed(b, svcs[0].base)
				bareRate, _ := runWrk(b, wrk, bare+sc.path, script, secs)
				cpu := func() (s float64) {
					for _, a := range addrs {
						s += redisCPUSeconds(b, a)
					}
					return s
				}
				cpu0 := cpu()
				rate, failed, p99 := runWrkSplit(b, wrk, []string{svcs[0].base + sc.path, svcs[1].base + sc.path}, script, secs)
				b.ReportMetric((cpu()-cpu0)*1e6/(rate*float64(secs)/(1-failed)), "redis-cpu-us/req")
				b.ReportMetric(p99, "p99-ms")
				b.ReportMetric(rate/bareRate, "ratio")
				b.ReportMetric(rate, "req/s")
				b.ReportMetric(failed, "failed-share")
			})
		}
	}
}

// BenchmarkLogging measures the cost of the access log: GET /health with
// LOG_LEVEL=info (one line a request) against LOG_LEVEL=warn (none).
func BenchmarkLogging(b *testing.B) {
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		b.Skip("wrk is not on PATH")
	}
	bin := buildService(b)
	quiet := startService(b, bin, map[string]string{"LOG_LEVEL": "warn"})
	logged := startService(b, bin, map[string]string{"LOG_LEVEL": "info"})
	q, _ := runWrk(b, wrk, quiet.base+"/health", "", 5)
	l, _ := runWrk(b, wrk, logged.base+"/health", "", 5)
	b.ReportMetric(l/q, "logged/quiet")
}

// BenchmarkWindowedSummary is a summary cache miss over the widest window
// retention allows on a year of data: whole days from a year ago up to a
// bound a few seconds into the current minute, so the plan reads every
// kind of bucket (days, then the hours, minutes and seconds of the last
// day), with samples every 10 s for the last day and every 10 min before.
func BenchmarkWindowedSummary(b *testing.B) {
	now := testEpoch.Add(365 * 24 * time.Hour)
	run := func(b *testing.B, bk backend) {
		var batch []sample
		flush := func() {
			if err := storeAdd(bk, batch...); err != nil {
				b.Fatal(err)
			}
			batch = batch[:0]
		}
		for t := testEpoch; t.Before(now); {
			batch = append(batch, sample{typ: "cpu", at: t.UnixMicro(), value: float64(t.Unix() % 100)})
			if len(batch) == 5000 {
				flush()
			}
			if now.Sub(t) > 24*time.Hour {
				t = t.Add(10 * time.Minute)
			} else {
				t = t.Add(10 * time.Second)
			}
		}
		flush()
		w := window{testEpoch.Unix(), now.Unix() - 3600 + 17}
		want := int64(0)
		if v, _, err := summarize(bk, "cpu", w); err != nil || v.Count == 0 {
			b.Fatalf("summarize = %+v, %v", v, err)
		} else {
			want = v.Count
		}
		b.ResetTimer()
		for range b.N {
			if v, _, err := summarize(bk, "cpu", w); err != nil || v.Count != want {
				b.Fatalf("summarize = %d, %v; want %d", v.Count, err, want)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/summary")
	}
	clock := func() time.Time { return now }
	benchBothStores(b, clock, run)
}

// benchBothStores runs run against a memory backend and a Redis one (on
// the tests' Redis, under a prefix of its own), both on clock.
func benchBothStores(b *testing.B, clock func() time.Time, run func(*testing.B, backend)) {
	b.Run("memory", func(b *testing.B) { run(b, newMemoryBackend(testConfig(b), clock)) })
	b.Run("redis", func(b *testing.B) {
		needRedis(b)
		cfg := testConfig(b)
		prefix := testPrefix()
		run(b, newRedisBackend(testPool(b, cfg, prefix), prefix, cfg, clock))
	})
}

// BenchmarkMemoryBound stores BENCH_SAMPLES (default 20 million) samples
// over 16 types, all within one simulated hour, through the built binary,
// then as many again within the same hour, and reports the memory each
// store holds after each round: the service's RSS with STORE=memory, Redis's
// used_memory with STORE=redis. Bucketed storage should hold about the
// same after the second round as after the first. The values are
// latency-like (log-normal around 20, to 0.1), so a second bucket holds a
// few dozen sketch bins.
//
//	go test -run '^$' -bench MemoryBound -benchtime=1x
func BenchmarkMemoryBound(b *testing.B) {
	total := benchSamples()
	bin := buildService(b)
	for _, store := range []string{"memory", "redis"} {
		b.Run(store, func(b *testing.B) {
			env := map[string]string{"STORE": store, "RATE_LIMIT": "1000000000", "LOG_LEVEL": "warn"}
			var rc redis.Conn
			if store == "redis" {
				srv := startRedis(b)
				env["REDIS_URL"] = "redis://" + srv.addr + "/0"
				c, err := redis.Dial("tcp", srv.addr)
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				rc = c
			}
			svc := startService(b, bin, env)
			held := func() float64 {
				if rc == nil {
					return svc.rssMiB(b)
				}
				// What a running service settles at: the background merge
				// of the buckets ingests appended to has caught up.
				for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
					n, err := redis.Int(rc.Do("SCARD", "compact"))
					for i := range 16 {
						z, zerr := redis.Int(rc.Do("SCARD", fmt.Sprintf("{type%d}:z", i)))
						n, err = n+z, cmp.Or(err, zerr)
					}
					if err != nil {
						b.Fatal(err)
					}
					if n == 0 {
						break
					}
					if time.Now().After(deadline) {
						b.Fatalf("%d buckets and types still to merge after 60 s", n)
					}
				}
				info, err := redis.String(rc.Do("INFO", "memory"))
				if err != nil {
					b.Fatal(err)
				}
				m := regexp.MustCompile(`used_memory:(\d+)`).FindStringSubmatch(info)
				n, _ := strconv.ParseFloat(m[1], 64)
				return n / (1 << 20)
			}
			start := time.Now()
			postHour(b, svc.base, total, 1)
			first := held()
			rate := float64(total) / time.Since(start).Seconds()
			postHour(b, svc.base, total, 2)
			second := held()
			b.ReportMetric(first, "MiB-after-first")
			b.ReportMetric(second, "MiB-after-second")
			b.ReportMetric(100*(second-first)/first, "growth-%")
			b.ReportMetric(rate, "samples/s")
		})
	}
}

// benchSamples is BENCH_SAMPLES, 20 million by default.
func benchSamples() int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_SAMPLES")); err == nil && n > 0 {
		return n
	}
	return 20_000_000
}

// benchHour is the simulated hour of BenchmarkMemoryBound.
var benchHour = time.Date(2025, 1, 1, 10, 0, 0, 0, time.UTC)

// hourSample is the i-th of n samples spread evenly over benchHour, with a
// latency-like value (log-normal around 20, to 0.1) and one of 16 types.
func hourSample(rng *rand.Rand, i, n int) sample {
	// In microseconds, so the product stays within int64.
	at := benchHour.Add(time.Duration(int64(i)*int64(time.Hour/time.Microsecond)/int64(n)) * time.Microsecond)
	v := math.Round(math.Exp(3+0.5*rng.NormFloat64())*10) / 10
	return sample{typ: fmt.Sprintf("type%d", rng.IntN(16)), at: at.UnixMicro(), value: v}
}

// postHour posts n samples over 16 types spread evenly over one hour, in
// batches of 10,000 in time order (as an agent flushes what it gathered),
// from two clients at once. A 503 is retried: it stored nothing.
func postHour(b *testing.B, base string, n int, seed uint64) {
	const batch = 10_000
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for w := range 2 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			client := &http.Client{Timeout: 30 * time.Second}
			var body strings.Builder
			for i := w * batch; i < n; i += 2 * batch {
				body.Reset()
				body.WriteByte('[')
				for j := range batch {
					if j > 0 {
						body.WriteByte(',')
					}
					s := hourSample(rng, i+j, n)
					fmt.Fprintf(&body, `{"timestamp":"%s","value":%g,"type":%q}`, time.UnixMicro(s.at).UTC().Format(time.RFC3339Nano), s.value, s.typ)
				}
				body.WriteByte(']')
				for try := 0; ; try++ {
					res, err := client.Post(base+"/api/metrics", "application/json", strings.NewReader(body.String()))
					if err != nil {
						errs <- err
						return
					}
					io.Copy(io.Discard, res.Body)
					res.Body.Close()
					if res.StatusCode == 201 {
						break
					}
					if res.StatusCode != 503 || try == 5 {
						errs <- fmt.Errorf("POST = %d", res.StatusCode)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// buildService builds the binary as a user would run it.
func buildService(b *testing.B) string {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "analytics-bench-")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "analytics")
		out, err := exec.Command("go", "build", "-o", builtBin, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		b.Fatal(buildErr)
	}
	return builtBin
}

type service struct {
	base string
	pid  int
}

// startService runs the binary on a free port and waits until it answers.
func startService(b *testing.B, bin string, env map[string]string) service {
	port, err := freePort()
	if err != nil {
		b.Fatal(err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "ADDR="+addr)
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	go io.Copy(io.Discard, stdout) // the logs, read as a log collector would
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	base := "http://" + addr
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if res, err := http.Get(base + "/health"); err == nil {
			res.Body.Close()
			if res.StatusCode == 200 {
				return service{base: base, pid: cmd.Process.Pid}
			}
		}
		if time.Now().After(deadline) {
			b.Fatal("the service did not answer /health within 10s")
		}
	}
}

// peakMiB is the service's peak resident memory so far (VmHWM).
func (s service) peakMiB(b *testing.B) float64 { return s.statusMiB("VmHWM") }

// rssMiB is the service's resident memory now.
func (s service) rssMiB(b *testing.B) float64 { return s.statusMiB("VmRSS") }

func (s service) statusMiB(field string) float64 {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.pid))
	if err != nil {
		return 0
	}
	m := regexp.MustCompile(field + `:\s+(\d+) kB`).FindSubmatch(status)
	if m == nil {
		return 0
	}
	kb, _ := strconv.ParseFloat(string(m[1]), 64)
	return kb / 1024
}

// startBare serves the bare handler every ratio is measured against: it
// reads the body and writes a small JSON answer, nothing else.
func startBare(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	body := []byte(`{"status":"ok"}` + "\n")
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	})}
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String()
}

// seed stores a sample of each type so summaries have something to say.
func seed(b *testing.B, base string) {
	var items []string
	for i := 1; i <= 16; i++ {
		items = append(items, metricBody(fmt.Sprintf("type%d", i), sampleTime, float64(i)))
	}
	res, err := http.Post(base+"/api/metrics", "application/json", strings.NewReader("["+strings.Join(items, ",")+"]"))
	if err != nil {
		b.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 201 {
		b.Fatalf("seeding: %d", res.StatusCode)
	}
}

func writeScript(b *testing.B, script string) string {
	if script == "" {
		return ""
	}
	f := filepath.Join(b.TempDir(), "scenario.lua")
	if err := os.WriteFile(f, []byte(script), 0o644); err != nil {
		b.Fatal(err)
	}
	return f
}

var (
	wrkTotal  = regexp.MustCompile(`(\d+) requests in ([0-9.]+)(m?s)`)
	wrkFailed = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	wrkP99    = regexp.MustCompile(`99%\s+([0-9.]+)(us|ms|s)`)
)

// runWrk drives url with 64 connections for secs seconds and returns the
// requests per second that got a 2xx answer, and the share that did not.
func runWrk(b *testing.B, wrk, url, script string, secs int) (rate, failed float64) {
	rate, failed, _ = runWrkLatency(b, wrk, url, script, secs)
	return rate, failed
}

// runWrkLatency is runWrk that also reads wrk's 99th percentile latency, in
// milliseconds. BENCH_CONNS sets the connections (default 64).
func runWrkLatency(b *testing.B, wrk, url, script string, secs int) (rate, failed, p99 float64) {
	return runWrkSplit(b, wrk, []string{url}, script, secs)
}

// runWrkSplit drives every url at once, the connections shared out among
// them, and adds up their answers: the rate of 2xx answers, the share of
// others, and the highest 99th percentile.
func runWrkSplit(b *testing.B, wrk string, urls []string, script string, secs int) (rate, failed, p99 float64) {
	conns := 64
	if c, err := strconv.Atoi(os.Getenv("BENCH_CONNS")); err == nil && c > 0 {
		conns = c
	}
	outs := make([][]byte, len(urls))
	errs := make([]error, len(urls))
	var wg sync.WaitGroup
	for i, url := range urls {
		args := []string{"-t2", "-c" + strconv.Itoa(max(1, conns/len(urls))), "-d" + strconv.Itoa(secs) + "s", "--latency"}
		if script != "" {
			args = append(args, "-s", script)
		}
		wg.Go(func() { outs[i], errs[i] = exec.Command(wrk, append(args, url)...).CombinedOutput() })
	}
	wg.Wait()
	var total, bad float64
	for i, out := range outs {
		if errs[i] != nil {
			b.Fatalf("wrk: %v\n%s", errs[i], out)
		}
		m := wrkTotal.FindSubmatch(out)
		if m == nil {
			b.Fatalf("no request count in wrk output:\n%s", out)
		}
		n, _ := strconv.ParseFloat(string(m[1]), 64)
		elapsed, _ := strconv.ParseFloat(string(m[2]), 64)
		if string(m[3]) == "ms" {
			elapsed /= 1000
		}
		var nbad float64
		if f := wrkFailed.FindSubmatch(out); f != nil {
			nbad, _ = strconv.ParseFloat(string(f[1]), 64)
		}
		if l := wrkP99.FindSubmatch(out); l != nil {
			v, _ := strconv.ParseFloat(string(l[1]), 64)
			p99 = max(p99, v*map[string]float64{"us": 0.001, "ms": 1, "s": 1000}[string(l[2])])
		}
		rate += (n - nbad) / elapsed
		total, bad = total+n, bad+nbad
	}
	return rate, bad / total, p99
}

// redisCPUSeconds is the CPU time Redis at addr has used, user and system.
func redisCPUSeconds(b *testing.B, addr string) float64 {
	c, err := redis.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	info, err := redis.String(c.Do("INFO", "cpu"))
	if err != nil {
		b.Fatal(err)
	}
	total := 0.0
	for _, f := range []string{"used_cpu_sys", "used_cpu_user"} {
		if m := regexp.MustCompile(f + `:([0-9.]+)`).FindStringSubmatch(info); m != nil {
			v, _ := strconv.ParseFloat(m[1], 64)
			total += v
		}
	}
	return total
}

// BenchmarkIngestPath is the work of one batch ingest without HTTP: the
// bodies of the batch scenarios of BenchmarkHTTP parsed, aggregated and
// added to the memory store, for CPU profiles of the path.
//
//	go test -run '^$' -bench IngestPath -cpuprofile cpu.out
func BenchmarkIngestPath(b *testing.B) {
	body := func(n int, item func(i int) string) []byte {
		items := make([]string, n)
		for i := range items {
			items[i] = item(i + 1)
		}
		return []byte("[" + strings.Join(items, ",") + "]")
	}
	bodies := []struct {
		name string
		n    int
		body []byte
	}{
		{"10000-one-type", 10000, body(10000, func(i int) string {
			return fmt.Sprintf(`{"timestamp":"2025-01-01T10:00:%02d.%04dZ","value":%g,"type":"cpu"}`, i%60, i, float64(i%500)/4)
		})},
		{"10000-4-labels-20-series", 10000, body(10000, func(i int) string {
			return fmt.Sprintf(`{"timestamp":"2025-01-01T10:00:%02d.%04dZ","value":%g,"type":"cpu","labels":{"host":"web-%d","region":"eu","service":"checkout","az":"b"}}`, i%60, i, float64(i%500)/4, i%20)
		})},
		{"1000-16-types", 1000, body(1000, func(i int) string {
			return fmt.Sprintf(`{"timestamp":"2025-01-01T10:%02d:%02dZ","value":%d,"type":"type%d"}`, i/60%60, i%60, i, i%16+1)
		})},
	}
	cfg := testConfig(b)
	at := time.Date(2025, 1, 1, 11, 0, 0, 0, time.UTC)
	for _, bd := range bodies {
		b.Run(bd.name, func(b *testing.B) {
			s := newMemoryStore(cfg.Retention, cfg.MaxTypes, cfg.MaxSeries)
			b.SetBytes(int64(len(bd.body)))
			for b.Loop() {
				samples, _, err := parseSamples(bd.body, cfg.MaxBatch)
				if err != nil {
					b.Fatal(err)
				}
				if err := s.add(b.Context(), aggregate(samples, cfg.Retention), at); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*bd.n)/b.Elapsed().Seconds(), "samples/s")
		})
	}
}

// BenchmarkLabelledQuery is a cache miss over 1,000 series of one type
// (label host, 1,000 values; label region, two): a summary grouped by host
// and one filtered to region eu (500 series), over a 1-hour window whose
// hour holds a sample every 10 seconds of every series.
//
//	go test -run '^$' -bench LabelledQuery -benchtime=20x
func BenchmarkLabelledQuery(b *testing.B) {
	hour := testEpoch.Add(24 * time.Hour)
	run := func(b *testing.B, bk backend) {
		var batch []sample
		for s := 0; s < 3600; s += 10 {
			for h := range 1000 {
				id := seriesID([]label{{"host", fmt.Sprintf("web-%03d", h)}, {"region", []string{"eu", "us"}[h%2]}})
				batch = append(batch, sample{typ: "cpu", series: id, at: hour.Add(time.Duration(s) * time.Second).UnixMicro(), value: float64(h%97 + s%13)})
			}
			if len(batch) >= 10000 {
				if err := storeAdd(bk, batch...); err != nil {
					b.Fatal(err)
				}
				batch = batch[:0]
			}
		}
		if bk.compact != nil {
			// What the background upkeep of a running service does.
			if err := bk.compact(b.Context()); err != nil {
				b.Fatal(err)
			}
		}
		from, to := hour.Unix(), hour.Add(time.Hour).Unix()
		for _, c := range []struct {
			name   string
			f      labelFilter
			groups int
		}{
			{"group_by=host", labelFilter{groupBy: "host"}, 1000},
			{"label=region:eu", labelFilter{match: []label{{"region", "eu"}}}, 1},
		} {
			b.Run(c.name, func(b *testing.B) {
				for b.Loop() {
					groups, _, err := bk.reader.window(b.Context(), "cpu", &from, &to, c.f)
					if err != nil || len(groups) != c.groups || groups[0].acc.count != 360*int64(1000/c.groups/(1+len(c.f.match))) {
						b.Fatalf("window = %d groups, %v", len(groups), err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/query")
			})
		}
	}
	clock := func() time.Time { return hour.Add(time.Hour) }
	benchBothStores(b, clock, run)
}

// BenchmarkMemoryStoreLiveHeap adds the samples of BenchmarkMemoryBound's
// first round to a memory store in this process and reports the live heap
// after a collection: what the buckets themselves hold, without the
// garbage collector's headroom that the service's RSS includes.
//
//	go test -run '^$' -bench MemoryStoreLiveHeap -benchtime=1x
func BenchmarkMemoryStoreLiveHeap(b *testing.B) {
	total := benchSamples()
	for b.Loop() {
		bk := newMemoryBackend(testConfig(b), func() time.Time { return benchHour.Add(2 * time.Hour) })
		rng := rand.New(rand.NewPCG(1, 0))
		batch := make([]sample, 0, 10_000)
		for i := range total {
			batch = append(batch, hourSample(rng, i, total))
			if len(batch) == cap(batch) {
				if err := storeAdd(bk, batch...); err != nil {
					b.Fatal(err)
				}
				batch = batch[:0]
			}
		}
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		b.ReportMetric(float64(ms.HeapAlloc)/(1<<20), "live-MiB")
		runtime.KeepAlive(bk)
	}
}

// BenchmarkStreams measures what open event streams cost ingest, and how
// soon an event follows its POST. Single-sample POSTs stamped now, over 16
// types, go through the built binary with no stream open, then with 100
// open (each reading every event, as a dashboard does), each measurement
// against the bare handler just before it. While the 100 are open, a probe
// POSTs a sample of a series of its own every 50 ms, and the time from its
// 201 to its event is taken on every stream.
//
//	go test -run '^$' -bench Streams -benchtime=1x
func BenchmarkStreams(b *testing.B) {
	wrk, secs, bin, bare := wrkSetup(b)
	script := writeScript(b, wrkTypes+`
request = function()
  n = n + 1
  local body = '{"timestamp":"' .. os.date("!%Y-%m-%dT%H:%M:%SZ") .. '","value":' .. (n % 1000) .. ',"type":"' .. types[n % 16 + 1] .. '"}'
  return wrk.format("POST", "/api/metrics", {["Content-Type"] = "application/json"}, body)
end`)
	for _, store := range []string{"memory", "redis"} {
		b.Run(store, func(b *testing.B) {
			env := map[string]string{"STORE": store, "RATE_LIMIT": "1000000000", "LOG_LEVEL": "info"}
			if store == "redis" {
				env["REDIS_URL"] = "redis://" + startRedis(b).addr + "/0"
			}
			svc := startService(b, bin, env)
			bareAlone, _ := runWrk(b, wrk, bare+"/api/metrics", script, secs)
			alone, _ := runWrk(b, wrk, svc.base+"/api/metrics", script, secs)

			const n = 100
			arrivals := make([]map[string]time.Time, n)
			var arrived atomic.Int64 // probe events seen, over all streams
			var wg sync.WaitGroup
			var bodies []io.Closer
			for i := range n {
				res, err := http.Get(svc.base + "/api/metrics/stream")
				if err != nil || res.StatusCode != 200 {
					b.Fatalf("stream %d: %v", i, err)
				}
				bodies = append(bodies, res.Body)
				arrivals[i] = map[string]time.Time{}
				wg.Go(func() {
					r := bufio.NewReaderSize(res.Body, 64<<10)
					for {
						line, err := r.ReadSlice('\n')
						if err != nil {
							return
						}
						if bytes.Contains(line, []byte(`"type":"probe"`)) {
							var e metricEventBody
							if json.Unmarshal(bytes.TrimPrefix(line, []byte("data: ")), &e) == nil {
								arrivals[i][e.Labels["p"]] = time.Now()
								arrived.Add(1)
							}
						}
					}
				})
			}
			acked := map[string]time.Time{}
			stop := make(chan struct{})
			probed := make(chan struct{})
			go func() {
				defer close(probed)
				tick := time.NewTicker(50 * time.Millisecond)
				defer tick.Stop()
				for k := 0; ; k++ {
					select {
					case <-stop:
						return
					case <-tick.C:
					}
					id := strconv.Itoa(k)
					body := fmt.Sprintf(`{"timestamp":%q,"value":1,"type":"probe","labels":{"p":%q}}`, time.Now().UTC().Format(time.RFC3339Nano), id)
					res, err := http.Post(svc.base+"/api/metrics", "application/json", strings.NewReader(body))
					if err == nil {
						res.Body.Close()
						if res.StatusCode == 201 {
							acked[id] = time.Now()
						}
					}
				}
			}()
			bareWith, _ := runWrk(b, wrk, bare+"/api/metrics", script, secs)
			with, failed := runWrk(b, wrk, svc.base+"/api/metrics", script, secs)
			close(stop)
			<-probed
			// The last probes' events may still be on their way: until every
			// stream has every probe, or a second, past which they count
			// as lost.
			for deadline := time.Now().Add(time.Second); arrived.Load() < int64(n*len(acked)) && time.Now().Before(deadline); {
				time.Sleep(5 * time.Millisecond) // polling the count
			}
			for _, c := range bodies {
				c.Close()
			}
			wg.Wait()

			var lat []float64
			lost := 0
			for _, a := range arrivals {
				for id, at := range acked {
					if t, ok := a[id]; ok {
						lat = append(lat, max(0, t.Sub(at).Seconds()*1000))
					} else {
						lost++
					}
				}
			}
			slices.Sort(lat)
			pct := func(p float64) float64 {
				if len(lat) == 0 {
					return math.NaN()
				}
				return lat[min(len(lat)-1, int(p*float64(len(lat))))]
			}
			b.ReportMetric(alone/bareAlone, "ratio-no-streams")
			b.ReportMetric(with/bareWith, "ratio-100-streams")
			b.ReportMetric((with/bareWith)/(alone/bareAlone), "kept")
			b.ReportMetric(failed, "failed-share")
			b.ReportMetric(pct(0.5), "event-p50-ms")
			b.ReportMetric(pct(0.99), "event-p99-ms")
			b.ReportMetric(float64(len(acked)), "probes")
			b.ReportMetric(float64(lost), "events-lost")
		})
	}
}

// BenchmarkAnnounce is what the live stream adds to one single-sample
// ingest in process, with 100 streams open: the update made from the
// ingest and handed to the hub, and the hub's frames made and handed to
// every stream (which take them, as their writers would).
func BenchmarkAnnounce(b *testing.B) {
	h := newHub(1000)
	stop := make(chan struct{})
	defer close(stop)
	go h.run(stop)
	for range 100 {
		c, _ := h.join(nil)
		go func() {
			for {
				select {
				case <-stop:
					return
				case <-c.wake:
					c.take()
				}
			}
		}()
	}
	now := time.Now()
	h0 := testConfig(b).Retention
	batches := make([][]typeBatch, 16)
	for i := range batches {
		batches[i] = aggregate([]sample{{typ: fmt.Sprintf("type%d", i), at: now.UnixMicro(), value: 1}}, h0)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		h.publish(updatesOf(batches[i%16], now.Unix(), h0))
	}
}

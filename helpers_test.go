package main

// The helpers every test file shares: one way to serve the handler and
// make requests, one fake clock, one configuration, and forEachStore, which
// runs a test against both stores. The test Redis itself (TestMain,
// redis-server processes) is in redis_test.go.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// response is what a test needs of an HTTP answer.
type response struct {
	status int
	header http.Header
	body   string
}

// json decodes the body, failing the test when it is not a JSON object.
func (r response) json(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(r.body), &m); err != nil {
		t.Fatalf("body %q is not a JSON object: %v", r.body, err)
	}
	return m
}

// send makes one request. contentType "" sends none.
func send(t testing.TB, method, url, contentType, body string) response {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{res.StatusCode, res.Header, string(b)}
}

// sendWith makes one request with the given header pairs (name, value, ...).
func sendWith(t *testing.T, method, url, body string, header ...string) response {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	// Bounded: a stream served where a 401 was due would never end.
	res, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{res.StatusCode, res.Header, string(b)}
}

func post(t testing.TB, base, body string) response {
	t.Helper()
	return send(t, "POST", base+"/api/metrics", "application/json", body)
}

// tryPost is post for a goroutine other than the test's, which must not
// call t.Fatal.
func tryPost(base, body string) (response, error) {
	res, err := http.Post(base+"/api/metrics", "application/json", strings.NewReader(body))
	if err != nil {
		return response{}, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return response{res.StatusCode, res.Header, string(b)}, err
}

// sampleTime is when the tests' samples happen, unless a test is about
// time.
var sampleTime = time.Date(2025, 1, 1, 10, 0, 0, 0, time.UTC)

// metricBody is the JSON of one metric, as a client sends it. Tests of the
// body's format write theirs out in full instead.
func metricBody(typ string, at time.Time, v float64) string {
	b, err := json.Marshal(struct {
		Timestamp time.Time `json:"timestamp"`
		Value     float64   `json:"value"`
		Type      string    `json:"type"`
	}{at, v, typ})
	if err != nil {
		panic(err) // a NaN or an infinity: a mistake in the test
	}
	return string(b)
}

// hostBody is metricBody with one label, host.
func hostBody(typ, host string, at time.Time, v float64) string {
	return fmt.Sprintf(`{"timestamp":%q,"value":%g,"type":%q,"labels":{"host":%q}}`, at.UTC().Format(time.RFC3339Nano), v, typ, host)
}

// comparedStores is the memory store and two Redis instances on one
// prefix (as two service instances share one Redis), for checks that
// ingest alternately through the Redis ones and compare with memory.
func comparedStores(t *testing.T, cfg config, clock *fakeClock) (mem, redisA, redisB backend) {
	t.Helper()
	needRedis(t)
	if len(cfg.RedisCluster) > 0 {
		needCluster(t)
	}
	prefix := testPrefix()
	poolB := newRedisPool(cfg, nil)
	t.Cleanup(func() { poolB.Close() })
	return newMemoryBackend(cfg, clock.now), newRedisBackend(testPool(t, cfg, prefix), prefix, cfg, clock.now),
		newRedisBackend(poolB, prefix, cfg, clock.now)
}

func get(t testing.TB, url string) response {
	t.Helper()
	return send(t, "GET", url, "", "")
}

// serve runs the service's handler over b on a loopback test server.
func serve(t testing.TB, cfg config, b backend) string {
	t.Helper()
	srv := httptest.NewServer(newHandler(discardLogger(), cfg, newTelemetry(), b))
	t.Cleanup(srv.Close)
	return srv.URL
}

// startRun calls run with env and returns the address it listens on, read
// from its "listening" log line, and the channel its result arrives on.
func startRun(t *testing.T, ctx context.Context, env map[string]string) (string, <-chan error) {
	t.Helper()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := run(ctx, func(k string) string { return env[k] }, pw)
		pw.Close()
		done <- err
	}()
	addrc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			var line struct{ Msg, Addr string }
			if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == "listening" {
				addrc <- line.Addr
			}
		}
		io.Copy(io.Discard, pr)
	}()
	select {
	case addr := <-addrc:
		return addr, done
	case err := <-done:
		t.Fatalf("run returned %v before listening", err)
	case <-time.After(10 * time.Second):
		t.Fatal("run did not log its address within 10s")
	}
	return "", nil
}

var prefixSeq atomic.Int64

// testPrefix is a key prefix no other test in this run uses.
func testPrefix() string {
	return fmt.Sprintf("test%d-%d:", os.Getpid(), prefixSeq.Add(1))
}

// testConfig is the default configuration with Redis pointing at the shared
// test server and no effective rate limit.
func testConfig(t testing.TB) config {
	t.Helper()
	cfg, err := loadConfig(func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	cfg.RedisAddr = sharedRedis.addr
	if sharedRedis.url != "" {
		u, _ := loadConfig(func(k string) string { return map[string]string{"REDIS_URL": sharedRedis.url}[k] })
		cfg.RedisDB, cfg.RedisUsername, cfg.RedisPassword = u.RedisDB, u.RedisUsername, u.RedisPassword
	}
	// Generous deadlines: a test that is not about deadlines must not see a
	// 503, or a limiter failing open, because the machine is busy. Tests of
	// deadlines set their own.
	cfg.RedisTimeout = 2 * time.Second
	cfg.LimiterTimeout = 2 * time.Second
	cfg.RateLimit = 1 << 30 // tests of the limiter set their own
	return cfg
}

// testPool opens a pool for cfg, closed and cleaned of prefix's keys after
// the test.
func testPool(t testing.TB, cfg config, prefix string) *redisPool {
	t.Helper()
	pool := newRedisPool(cfg, nil)
	t.Cleanup(func() {
		deleteKeys(pool, prefix)
		pool.Close()
	})
	return pool
}

func deleteKeys(pool *redisPool, prefix string) {
	eachNode(pool, func(c redis.Conn) {
		cursor := "0"
		for {
			reply, err := redis.Values(c.Do("SCAN", cursor, "MATCH", prefix+"*", "COUNT", 1000))
			if err != nil {
				return
			}
			cursor, _ = redis.String(reply[0], nil)
			keys, _ := redis.Strings(reply[1], nil)
			for _, k := range keys { // one by one: on a cluster they are on many slots
				c.Send("UNLINK", k)
			}
			c.Do("")
			if cursor == "0" {
				return
			}
		}
	})
}

// eachNode runs fn with a connection to each master: the one Redis, or
// every master of a cluster.
func eachNode(pool *redisPool, fn func(c redis.Conn)) {
	if pool.cluster == nil {
		c := pool.Get()
		defer c.Close()
		fn(c)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	masters, _ := pool.cluster.masters(ctx)
	for _, addr := range masters {
		c := pool.cluster.node(addr).Get()
		fn(c)
		c.Close()
	}
}

// storeEnv is one store's backend for a test, with the means to open a
// second instance over the same data (Redis only).
type storeEnv struct {
	name   string
	cfg    config
	clock  *fakeClock // every backend of the env reads time from it
	b      backend
	reopen func() backend // nil for memory: its data is the process's own
	pool   *redisPool     // nil for memory
	prefix string
}

// fakeClock is a clock that moves only when a test moves it.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock(t time.Time) *fakeClock { return &fakeClock{t: t} }

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// testEpoch is where fake clocks start: the start of a rate-limit window
// for any window length that divides a day.
var testEpoch = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

// storeEpoch is where a store test's clock starts: a day after testEpoch,
// so the samples the tests post on 2025-01-01 are in the past, within
// MAX_FUTURE, and still kept by every resolution.
var storeEpoch = testEpoch.Add(24 * time.Hour)

// forEachStore runs fn as a subtest against the memory store and against
// Redis. mutate adjusts the configuration both get. A test of what only one
// store has is not a forEachStore test: a half that skipped itself in every
// run would hide a real skip among them.
func forEachStore(t *testing.T, mutate func(*config), fn func(t *testing.T, e storeEnv)) {
	t.Helper()
	t.Run("memory", func(t *testing.T) {
		cfg := testConfig(t)
		if mutate != nil {
			mutate(&cfg)
		}
		clock := newFakeClock(storeEpoch)
		fn(t, storeEnv{name: "memory", cfg: cfg, clock: clock, b: newMemoryBackend(cfg, clock.now)})
	})
	t.Run("redis", func(t *testing.T) {
		fn(t, redisStoreEnv(t, mutate))
	})
	t.Run("cluster", func(t *testing.T) {
		fn(t, clusterStoreEnv(t, mutate))
	})
}

// onEachRedis runs fn as a subtest with the test configuration on the
// one Redis and on the cluster, for the tests that compare them with the
// memory store.
func onEachRedis(t *testing.T, fn func(t *testing.T, cfg config)) {
	t.Run("redis", func(t *testing.T) { fn(t, testConfig(t)) })
	t.Run("cluster", func(t *testing.T) {
		needCluster(t)
		cfg := testConfig(t)
		cfg.RedisCluster = sharedCluster.addrs
		fn(t, cfg)
	})
}

// redisStoreEnv is the Redis half of forEachStore, for a test of Redis
// alone: a backend on the shared test Redis under a prefix of its own.
func redisStoreEnv(t *testing.T, mutate func(*config)) storeEnv {
	t.Helper()
	needRedis(t)
	cfg := testConfig(t)
	if mutate != nil {
		mutate(&cfg)
	}
	return sharedStoreEnv(t, "redis", cfg)
}

// sharedStoreEnv is a backend on cfg's Redis, one or a cluster, under a
// prefix of its own, which can be opened again as a second instance.
func sharedStoreEnv(t *testing.T, name string, cfg config) storeEnv {
	t.Helper()
	prefix := testPrefix()
	pool := testPool(t, cfg, prefix)
	clock := newFakeClock(storeEpoch)
	e := storeEnv{name: name, cfg: cfg, clock: clock, pool: pool, prefix: prefix}
	e.b = newRedisBackend(pool, prefix, cfg, clock.now)
	e.reopen = func() backend {
		p := newRedisPool(cfg, nil)
		t.Cleanup(func() { p.Close() })
		return newRedisBackend(p, prefix, cfg, clock.now)
	}
	return e
}

func discardLogger() *slog.Logger {
	return slog.New(slog.NewJSONHandler(io.Discard, nil))
}

// window names a summary's bounds in Unix seconds, math.MinInt64 and
// math.MaxInt64 for an open end; allTime has neither bound.
type window struct{ from, to int64 }

var allTime = window{math.MinInt64, math.MaxInt64}

func (w window) bounds() (from, to *int64) {
	if w.from != math.MinInt64 {
		from = &w.from
	}
	if w.to != math.MaxInt64 {
		to = &w.to
	}
	return from, to
}

// summarize is b's answer for typ over w and the version it reflects, as
// a summary computes it, without the cache.
func summarize(b backend, typ string, w window) (aggregateValues, uint64, error) {
	from, to := w.bounds()
	groups, v, err := b.reader.window(context.Background(), typ, from, to, labelFilter{})
	return onlyGroup(groups), v, err
}

// onlyGroup is the values of an ungrouped window.
func onlyGroup(groups []seriesGroup) aggregateValues {
	if len(groups) == 0 {
		return aggregateValues{}
	}
	return groups[0].acc.values()
}

// storeAdd ingests samples into b's store as the ingest handler does.
func storeAdd(b backend, samples ...sample) error {
	return b.store.add(context.Background(), aggregate(samples, b.reader.horizon), b.now())
}

// count is the all-time sample count of typ, read from the store itself.
func count(t testing.TB, b backend, typ string) int64 {
	t.Helper()
	v, _, err := summarize(b, typ, allTime)
	if err != nil {
		t.Fatalf("summarize(%s): %v", typ, err)
	}
	return v.Count
}

// redisCount is how many samples of typ Redis holds under prefix, read
// from the type's running total, independently of the store's code.
func redisCount(t testing.TB, c redis.Conn, prefix, typ string) int {
	t.Helper()
	v, err := redis.Bytes(c.Do("GET", keys{prefix}.bucket(typ, resAll, 0)))
	if err == redis.ErrNil {
		return 0
	}
	if err != nil {
		t.Fatalf("reading %s's total: %v", typ, err)
	}
	b, err := parseBucket(v)
	if err != nil {
		t.Fatalf("%s's total: %v", typ, err)
	}
	return int(b.count)
}

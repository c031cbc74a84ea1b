package main

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// forEachLimiter runs fn against a memory and a Redis limiter with the
// given limit and window.
func forEachLimiter(t *testing.T, limit int, window time.Duration, fn func(t *testing.T, lim limiter)) {
	forEachStore(t, func(c *config) {
		c.RateLimit, c.RateWindow = limit, window
	}, func(t *testing.T, e storeEnv) {
		fn(t, e.b.limiter)
	})
}

func TestLimiterSteps(t *testing.T) {
	t0 := testEpoch
	ms := time.Millisecond
	steps := []struct {
		t         time.Time
		client    string
		allowed   bool
		remaining int
		reset     time.Duration
	}{
		{t0, "a", true, 2, 60 * time.Second},
		{t0.Add(1 * time.Second), "a", true, 1, 59 * time.Second},
		{t0.Add(2 * time.Second), "a", true, 0, 58 * time.Second},
		{t0.Add(3 * time.Second), "a", false, 0, 57 * time.Second},
		{t0.Add(3 * time.Second), "b", true, 2, 57 * time.Second}, // clients are independent
		{t0.Add(59999 * ms), "a", false, 0, ms},
		{t0.Add(60 * time.Second), "a", true, 2, 60 * time.Second}, // next window
		{t0.Add(61 * time.Second), "a", true, 1, 59 * time.Second},
		{t0.Add(61 * time.Second), "b", true, 2, 59 * time.Second},
		{t0.Add(180500 * ms), "a", true, 2, 59500 * ms}, // windows skipped entirely
	}
	forEachLimiter(t, 3, time.Minute, func(t *testing.T, lim limiter) {
		for i, s := range steps {
			d, err := lim.allow(context.Background(), s.client, s.t)
			if err != nil {
				t.Fatalf("step %d: %v", i, err)
			}
			want := decision{allowed: s.allowed, limit: 3, remaining: s.remaining, reset: s.reset}
			if d != want {
				t.Errorf("step %d: allow(%s, t0+%v) = %+v, want %+v", i, s.client, s.t.Sub(t0), d, want)
			}
		}
	})
}

func TestLimiterHeaders(t *testing.T) {
	forEachStore(t, func(c *config) { c.RateLimit, c.RateWindow = 2, time.Minute }, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		e.clock.advance(20*time.Second + 300*time.Millisecond)
		good := metricBody("cpu", sampleTime, 1)
		for i, s := range []struct {
			body       string
			status     int
			remaining  string
			retryAfter string
		}{
			{good, 201, "1", ""},
			{`{"bad":`, 422, "0", ""}, // an invalid POST counts too
			{good, 429, "0", "40"},
			{`{"bad":`, 429, "0", "40"},
		} {
			r := post(t, base, s.body)
			if r.status != s.status {
				t.Errorf("request %d: status %d %s, want %d", i, r.status, r.body, s.status)
			}
			for h, want := range map[string]string{
				"X-RateLimit-Limit":     "2",
				"X-RateLimit-Remaining": s.remaining,
				"X-RateLimit-Reset":     "40", // 39.7 s rounded up
				"Retry-After":           s.retryAfter,
			} {
				if got := r.header.Get(h); got != want {
					t.Errorf("request %d: %s = %q, want %q", i, h, got, want)
				}
			}
			if s.status == 429 && strings.TrimSpace(r.body) != `{"detail":"Too many requests"}` {
				t.Errorf("request %d: 429 body %s", i, r.body)
			}
		}
		e.clock.advance(40 * time.Second)
		if r := post(t, base, good); r.status != 201 || r.header.Get("X-RateLimit-Remaining") != "1" {
			t.Errorf("next window: %d remaining %s, want 201 remaining 1", r.status, r.header.Get("X-RateLimit-Remaining"))
		}
		if n := count(t, e.b, "cpu"); n != 2 {
			t.Errorf("%d samples stored, want 2: a 429 must store nothing", n)
		}
	})
}

func TestLimiterExactUnderConcurrency(t *testing.T) {
	forEachStore(t, func(c *config) {
		c.RateLimit, c.RateWindow = 50, time.Hour
		// This test is about atomic counting: it must not fail open because
		// 200 requests queued for the pool on a busy machine.
		c.LimiterTimeout, c.RedisTimeout = 5*time.Second, 5*time.Second
	}, func(t *testing.T, e storeEnv) {
		instances := []string{serve(t, e.cfg, e.b)}
		if e.reopen != nil {
			instances = append(instances, serve(t, e.cfg, e.reopen()))
		}
		const requests = 200
		statuses := make(chan int, requests)
		var wg sync.WaitGroup
		for i := range requests {
			wg.Add(1)
			go func() {
				defer wg.Done()
				base := instances[i%len(instances)]
				r, err := tryPost(base, metricBody("cpu", sampleTime, 1))
				if err != nil {
					t.Error(err)
					return
				}
				statuses <- r.status
			}()
		}
		wg.Wait()
		close(statuses)
		byStatus := map[int]int{}
		for s := range statuses {
			byStatus[s]++
		}
		if byStatus[201] != 50 || byStatus[429] != 150 {
			t.Errorf("%d concurrent POSTs over %d instance(s), limit 50: %v, want 50 201s and 150 429s",
				requests, len(instances), byStatus)
		}
		if n := count(t, e.b, "cpu"); n != 50 {
			t.Errorf("%d samples stored, want 50", n)
		}
	})
}

func TestRedisLimiterKeysExpire(t *testing.T) {
	needRedis(t)
	cfg := testConfig(t)
	prefix := testPrefix()
	pool := testPool(t, cfg, prefix)
	lim := newRedisLimiter(pool, prefix, 5, time.Minute, cfg.LimiterTimeout)
	now := time.Now()
	for _, client := range []string{"1.2.3.4", "2001:db8::/64"} {
		if _, err := lim.allow(context.Background(), client, now); err != nil {
			t.Fatal(err)
		}
	}
	c := pool.Get()
	defer c.Close()
	keys, err := redis.Strings(c.Do("KEYS", prefix+"rl:*"))
	if err != nil || len(keys) != 2 {
		t.Fatalf("limiter keys = %v, %v; want 2", keys, err)
	}
	for _, k := range keys {
		pttl, err := redis.Int64(c.Do("PTTL", k))
		if err != nil || pttl <= 0 || pttl > (time.Minute+limiterClockSkew).Milliseconds() {
			t.Errorf("PTTL %s = %d, %v; want within (0, 61000]", k, pttl, err)
		}
	}
	// A counter that lost its expiry gets it back on the next request.
	idx, _ := windowOf(now, time.Minute)
	key := lim.key("1.2.3.4", idx)
	c.Do("PERSIST", key)
	if _, err := lim.allow(context.Background(), "1.2.3.4", now); err != nil {
		t.Fatal(err)
	}
	if pttl, _ := redis.Int64(c.Do("PTTL", key)); pttl <= 0 {
		t.Errorf("PTTL %s = %d after a request, want > 0", key, pttl)
	}
}

// counters is how many counters lim holds, of every window.
func counters(lim *memoryLimiter) int {
	n := 0
	lim.counts.Range(func(any, any) bool { n++; return true })
	return n
}

func TestMemoryLimiterDropsPastWindows(t *testing.T) {
	lim := newMemoryLimiter(5, time.Minute)
	ctx := context.Background()
	for i := range 1000 {
		lim.allow(ctx, fmt.Sprintf("10.0.%d.%d", i/256, i%256), testEpoch)
	}
	lim.allow(ctx, "10.9.9.9", testEpoch.Add(time.Minute))
	for _, step := range []struct {
		at   time.Duration // of the sweep, after testEpoch
		want int
	}{
		{59 * time.Second, 1001}, // the first window is the current one
		{time.Minute, 1001},      // the first window is the previous one: kept
		{2 * time.Minute, 1},     // the first window's 1000 go; the second's stays
		{2*time.Minute + time.Second, 1},
		{3 * time.Minute, 0},
	} {
		lim.sweep(testEpoch.Add(step.at))
		if n := counters(lim); n != step.want {
			t.Errorf("after sweep(t0+%v): %d counters, want %d", step.at, n, step.want)
		}
	}
}

// TestMemoryLimiterAllowDoesNotSweep: a request never pays for dropping
// past windows' counters; they stay until sweep runs.
func TestMemoryLimiterAllowDoesNotSweep(t *testing.T) {
	lim := newMemoryLimiter(5, time.Minute)
	ctx := context.Background()
	for i := range 1000 {
		lim.allow(ctx, fmt.Sprintf("10.0.%d.%d", i/256, i%256), testEpoch)
	}
	lim.allow(ctx, "10.9.9.9", testEpoch.Add(2*time.Minute))
	lim.allow(ctx, "10.9.9.9", testEpoch.Add(5*time.Minute))
	if n := counters(lim); n != 1002 {
		t.Errorf("%d counters after requests five windows later, want all 1002: allow must not sweep", n)
	}
	lim.sweep(testEpoch.Add(5 * time.Minute))
	if n := counters(lim); n != 1 {
		t.Errorf("%d counters after the sweep, want 1 (this window's)", n)
	}
}

func postFrom(t *testing.T, base, xff string) int {
	t.Helper()
	req, _ := http.NewRequest("POST", base+"/api/metrics", strings.NewReader(metricBody("cpu", sampleTime, 1)))
	req.Header.Set("X-Forwarded-For", xff)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	return res.StatusCode
}

func TestLimiterIgnoresSpoofedForwardedFor(t *testing.T) {
	forEachStore(t, func(c *config) { c.RateLimit = 5 }, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		admitted := 0
		for i := range 1000 {
			if postFrom(t, base, fmt.Sprintf("203.0.%d.%d", i/256, i%256)) == 201 {
				admitted++
			}
		}
		if admitted != 5 {
			t.Errorf("1000 POSTs with rotating X-Forwarded-For from an untrusted peer: %d admitted, want 5", admitted)
		}
	})
}

func TestLimiterTrustedProxySplitsClients(t *testing.T) {
	forEachStore(t, func(c *config) {
		c.RateLimit = 2
		c.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	}, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		for _, tc := range []struct {
			xff  string
			want int
		}{
			{"198.51.100.1", 201},
			{"198.51.100.1", 201},
			{"198.51.100.1", 429},
			{"198.51.100.2", 201}, // another client behind the same proxy
			{"2001:db8:0:1::1", 201},
			{"2001:db8:0:1::2", 201}, // same /64
			{"2001:db8:0:1::3", 429},
			{"::ffff:198.51.100.1", 429}, // the same client as 198.51.100.1
		} {
			if got := postFrom(t, base, tc.xff); got != tc.want {
				t.Errorf("POST via trusted proxy for %s = %d, want %d", tc.xff, got, tc.want)
			}
		}
	})
}

// TestLimiterStoreDown kills the limiter's Redis. The store of samples is
// in memory here, so the limiter's own failure policy is what shows.
func TestLimiterStoreDown(t *testing.T) {
	srv := startRedis(t)
	for _, failClosed := range []bool{false, true} {
		t.Run(fmt.Sprintf("fail closed %v", failClosed), func(t *testing.T) {
			cfg := testConfig(t)
			cfg.RedisAddr = srv.addr
			cfg.RateLimit = 100
			cfg.RateLimitFailClosed = failClosed
			prefix := testPrefix()
			b := newMemoryBackend(cfg, time.Now)
			b.limiter = newRedisLimiter(testPool(t, cfg, prefix), prefix, cfg.RateLimit, cfg.RateWindow, cfg.LimiterTimeout)
			base := serve(t, cfg, b)
			if r := post(t, base, metricBody("cpu", sampleTime, 1)); r.status != 201 || r.header.Get("X-RateLimit-Remaining") != "99" {
				t.Fatalf("with Redis up: %d remaining %s", r.status, r.header.Get("X-RateLimit-Remaining"))
			}
			srv.kill()
			defer srv.restart(t)
			for _, tc := range []struct {
				body     string
				openWant int
			}{
				{metricBody("cpu", sampleTime, 1), 201},
				{`{"bad":`, 422}, // fail-open lets it through to validation
			} {
				r := post(t, base, tc.body)
				want := tc.openWant
				if failClosed {
					want = 503
				}
				if r.status != want {
					t.Errorf("POST %s with the limiter's Redis down = %d %s, want %d", tc.body, r.status, r.body, want)
				}
				if r.header.Get("X-RateLimit-Limit") != "100" || r.header.Get("X-RateLimit-Reset") == "" {
					t.Errorf("POST with the limiter's Redis down: headers %v, want X-RateLimit-*", r.header)
				}
				if failClosed && (r.header.Get("Retry-After") == "" || r.json(t)["detail"] == nil) {
					t.Errorf("fail-closed 503: %v %s, want Retry-After and a detail", r.header, r.body)
				}
			}
		})
	}
}

// TestLimiterHungStoreAddsOnlyItsDeadline puts the limiter on a Redis that
// accepts and never answers, with a long REDIS_TIMEOUT: the request still
// proceeds after the limiter's own short deadline.
func TestLimiterHungStoreAddsOnlyItsDeadline(t *testing.T) {
	cfg := testConfig(t)
	cfg.RedisAddr = hungRedis(t)
	cfg.RedisTimeout = 3 * time.Second
	cfg.LimiterTimeout = 100 * time.Millisecond // the default
	pool := newRedisPool(cfg, nil)
	t.Cleanup(func() { pool.Close() })
	b := newMemoryBackend(cfg, time.Now)
	b.limiter = newRedisLimiter(pool, "", cfg.RateLimit, cfg.RateWindow, cfg.LimiterTimeout)
	base := serve(t, cfg, b)
	start := time.Now()
	r := post(t, base, metricBody("cpu", sampleTime, 1))
	if d := time.Since(start); d > time.Second {
		t.Errorf("POST with a hung limiter store took %v, want about the limiter's %v deadline", d, cfg.LimiterTimeout)
	}
	if r.status != 201 {
		t.Errorf("POST with a hung limiter store = %d %s, want 201 (fail open)", r.status, r.body)
	}
}

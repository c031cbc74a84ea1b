package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

func TestCacheServesRepeatsWithoutRecomputing(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		post(t, base, metricBody("cpu", sampleTime, 7))
		for _, q := range []string{"", "&from=2025-01-01T00:00:00&to=2025-01-02T00:00:00"} {
			before := e.b.summaries.misses.Load()
			var first string
			for i := range 5 {
				r := get(t, base+"/api/metrics/summary?metric_type=cpu"+q)
				if i == 0 {
					first = r.body
				} else if r.body != first {
					t.Errorf("repeat %d = %s, want %s", i, r.body, first)
				}
			}
			if n := e.b.summaries.misses.Load() - before; n != 1 {
				t.Errorf("5 GETs of summary%s computed %d times, want 1", q, n)
			}
		}
	})
}

func TestCacheReadYourWrites(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		writer := serve(t, e.cfg, e.b)
		readers := []string{writer}
		if e.reopen != nil {
			readers = append(readers, serve(t, e.cfg, e.reopen()))
		}
		var sum int
		for i := 1; i <= 50; i++ {
			if r := post(t, writer, metricBody("cpu", sampleTime.Add(time.Duration(i%60)*time.Second), float64(i))); r.status != 201 {
				t.Fatalf("post %d: %d %s", i, r.status, r.body)
			}
			sum += i
			for _, reader := range readers {
				for _, q := range []string{"", "&from=2025-01-01T10:00:00"} {
					r := get(t, reader+"/api/metrics/summary?metric_type=cpu"+q)
					// The window leaves out second 0, which i=60 would use.
					if want := fmt.Sprintf(`"count":%d,"average":%g,"sum":%d,`, i, float64(sum)/float64(i), sum); !strings.Contains(r.body, want) {
						t.Fatalf("round %d, summary%s = %s, want %s", i, q, r.body, want)
					}
				}
			}
		}
	})
}

// gatedStore lets a test hold a summary computation after it has read the
// store and before the cache stores it: the slow reader of the original
// service's race.
type gatedStore struct {
	metricStore
	computed chan struct{}
	release  chan struct{}
}

func (g *gatedStore) summarize(ctx context.Context, typ string, w window) (stats, uint64, error) {
	st, v, err := g.metricStore.summarize(ctx, typ, w)
	g.computed <- struct{}{}
	<-g.release
	return st, v, err
}

func TestCacheSlowReaderCannotServeStale(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		ctx := context.Background()
		gated := &gatedStore{metricStore: e.b.store, computed: make(chan struct{}), release: make(chan struct{})}
		slow := newSummaryCache(gated, e.b.summaries.entries)
		if err := e.b.store.add(ctx, []sample{{typ: "cpu", at: 1, value: 1}}); err != nil {
			t.Fatal(err)
		}
		got := make(chan string, 1)
		go func() {
			body, err := slow.get(ctx, "cpu", allTime)
			if err != nil {
				t.Error(err)
			}
			got <- string(body)
		}()
		<-gated.computed // the slow reader has read count 1 ...
		if err := e.b.store.add(ctx, []sample{{typ: "cpu", at: 2, value: 1}}); err != nil {
			t.Fatal(err) // ... a write is acknowledged ...
		}
		close(gated.release) // ... and only then does the slow reader cache its summary.
		if body := <-got; !strings.Contains(body, `"count":1,`) {
			t.Fatalf("slow reader = %s, want count 1", body)
		}
		body, err := e.b.summaries.get(ctx, "cpu", allTime)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(body), `"count":2,`) {
			t.Errorf("summary after an acknowledged write = %s, want count 2", body)
		}
	})
}

func TestCacheConcurrentMissesComputeOnce(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		ctx := context.Background()
		if err := e.b.store.add(ctx, []sample{{typ: "cpu", at: 1, value: 5}}); err != nil {
			t.Fatal(err)
		}
		gated := &gatedStore{metricStore: e.b.store, computed: make(chan struct{}, 1), release: make(chan struct{})}
		c := newSummaryCache(gated, e.b.summaries.entries)
		const callers = 20
		var wg sync.WaitGroup
		bodies := make([]string, callers)
		for i := range callers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b, err := c.get(ctx, "cpu", allTime)
				if err != nil {
					t.Error(err)
				}
				bodies[i] = string(b)
			}()
		}
		<-gated.computed
		key := flightKey("cpu", allTime, 1) // the version after the one add
		for deadline := time.Now().Add(5 * time.Second); c.flight.waiting(key) < callers-1; {
			if time.Now().After(deadline) {
				t.Fatalf("%d callers joined the computation, want %d", c.flight.waiting(key), callers-1)
			}
			time.Sleep(time.Millisecond) // polling interval
		}
		close(gated.release)
		wg.Wait()
		if n := c.misses.Load(); n != 1 {
			t.Errorf("%d concurrent misses computed %d times, want 1", callers, n)
		}
		for i, b := range bodies {
			if !strings.Contains(b, `"count":1,`) {
				t.Errorf("caller %d got %q, want count 1", i, b)
			}
		}
	})
}

func TestCacheExpiresAfterTTL(t *testing.T) {
	t.Run("memory", func(t *testing.T) {
		now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
		clock := func() time.Time { return now }
		cfg := testConfig(t)
		cfg.CacheTTL = time.Minute
		b := newMemoryBackend(cfg, clock)
		ctx := context.Background()
		for _, step := range []struct {
			advance    time.Duration
			wantMisses uint64
		}{
			{0, 1},                // first read computes
			{59 * time.Second, 1}, // within the TTL: served from the cache
			{time.Second, 2},      // at the TTL: recomputed
			{30 * time.Second, 2},
		} {
			now = now.Add(step.advance)
			if _, err := b.summaries.get(ctx, "cpu", allTime); err != nil {
				t.Fatal(err)
			}
			if got := b.summaries.misses.Load(); got != step.wantMisses {
				t.Errorf("after +%v: misses = %d, want %d", step.advance, got, step.wantMisses)
			}
		}
	})
	t.Run("memory sweeps", func(t *testing.T) {
		now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
		cfg := testConfig(t)
		cfg.CacheTTL = time.Minute
		b := newMemoryBackend(cfg, func() time.Time { return now })
		entries := b.summaries.entries.(*memoryCacheStore)
		ctx := context.Background()
		for i := range 100 {
			b.summaries.get(ctx, "cpu", window{int64(i), int64(i + 1)})
		}
		now = now.Add(2 * time.Minute)
		b.summaries.get(ctx, "cpu", allTime) // a put after the TTL sweeps
		n := 0
		entries.entries.Range(func(any, any) bool { n++; return true })
		if n != 1 {
			t.Errorf("%d cache entries after the TTL passed, want 1 (the fresh one)", n)
		}
	})
	t.Run("redis", func(t *testing.T) {
		needRedis(t)
		cfg := testConfig(t)
		cfg.CacheTTL = time.Minute
		prefix := testPrefix()
		pool := testPool(t, cfg, prefix)
		b := newRedisBackend(pool, prefix, cfg, time.Now)
		if _, err := b.summaries.get(context.Background(), "cpu", allTime); err != nil {
			t.Fatal(err)
		}
		c := pool.Get()
		defer c.Close()
		key := b.summaries.entries.(*redisCacheStore).key("cpu", allTime)
		pttl, err := redis.Int64(c.Do("PTTL", key))
		if err != nil || pttl <= 0 || pttl > time.Minute.Milliseconds() {
			t.Errorf("PTTL %s = %d, %v; want within (0, 60000]", key, pttl, err)
		}
	})
}

// TestCacheLatePutKeepsNewerEntry: a slow reader that puts a summary of
// an older version after a newer one was cached must not replace it.
func TestCacheLatePutKeepsNewerEntry(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		ctx := context.Background()
		if err := e.b.store.add(ctx, []sample{{typ: "cpu", at: 1, value: 1}, {typ: "cpu", at: 2, value: 1}}); err != nil {
			t.Fatal(err)
		}
		entries := e.b.summaries.entries
		for _, put := range []cacheEntry{{version: 2, body: []byte("new")}, {version: 1, body: []byte("old")}} {
			if err := entries.put(ctx, "cpu", allTime, put); err != nil {
				t.Fatal(err)
			}
		}
		_, got, ok, err := entries.get(ctx, "cpu", allTime)
		if err != nil || !ok || got.version != 2 || string(got.body) != "new" {
			t.Errorf("after puts of versions 2 then 1, get = %d %q (ok %v, %v), want version 2 %q", got.version, got.body, ok, err, "new")
		}
		// A later version does replace it.
		entries.put(ctx, "cpu", allTime, cacheEntry{version: 3, body: []byte("newer")})
		if _, got, _, _ := entries.get(ctx, "cpu", allTime); got.version != 3 {
			t.Errorf("after a put of version 3, get = version %d, want 3", got.version)
		}
	})
}

package main

import (
	"context"
	"encoding/json"
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
			before := e.b.reader.cache.misses.Load()
			var first string
			for i := range 5 {
				r := get(t, base+"/api/metrics/summary?metric_type=cpu"+q)
				if i == 0 {
					first = r.body
				} else if r.body != first {
					t.Errorf("repeat %d = %s, want %s", i, r.body, first)
				}
			}
			if n := e.b.reader.cache.misses.Load() - before; n != 1 {
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

func (g *gatedStore) read(ctx context.Context, typ string, series []string, spans []span) (typeMeta, [][]storedBucket, error) {
	m, b, err := g.metricStore.read(ctx, typ, series, spans)
	g.computed <- struct{}{}
	<-g.release
	return m, b, err
}

// gatedReader is e's reader over a gated store, sharing e's cache entries.
func gatedReader(e storeEnv, g *gatedStore) *reader {
	return &reader{store: g, cache: newReadCache(e.b.reader.cache.entries), horizon: e.cfg.Retention, now: e.b.now}
}

// allTimeSummary is r's all-time summary of cpu, as the handler writes it.
func allTimeSummary(t testing.TB, r *reader) string {
	body, err := r.summary(context.Background(), "cpu", nil, nil)
	if err != nil {
		t.Error(err)
	}
	out, _ := json.Marshal(body)
	return string(out)
}

func TestCacheSlowReaderCannotServeStale(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		gated := &gatedStore{metricStore: e.b.store, computed: make(chan struct{}), release: make(chan struct{})}
		slow := gatedReader(e, gated)
		if err := storeAdd(e.b, sample{typ: "cpu", at: 1, value: 1}); err != nil {
			t.Fatal(err)
		}
		got := make(chan string, 1)
		go func() { got <- allTimeSummary(t, slow) }()
		<-gated.computed // the slow reader has read count 1 ...
		if err := storeAdd(e.b, sample{typ: "cpu", at: 2, value: 1}); err != nil {
			t.Fatal(err) // ... a write is acknowledged ...
		}
		close(gated.release) // ... and only then does the slow reader cache its summary.
		if body := <-got; !strings.Contains(body, `"count":1,`) {
			t.Fatalf("slow reader = %s, want count 1", body)
		}
		if body := allTimeSummary(t, e.b.reader); !strings.Contains(body, `"count":2,`) {
			t.Errorf("summary after an acknowledged write = %s, want count 2", body)
		}
	})
}

func TestCacheConcurrentMissesComputeOnce(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		if err := storeAdd(e.b, sample{typ: "cpu", at: 1, value: 5}); err != nil {
			t.Fatal(err)
		}
		gated := &gatedStore{metricStore: e.b.store, computed: make(chan struct{}, 1), release: make(chan struct{})}
		r := gatedReader(e, gated)
		c := r.cache
		const callers = 20
		var wg sync.WaitGroup
		bodies := make([]string, callers)
		for i := range callers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				bodies[i] = allTimeSummary(t, r)
			}()
		}
		<-gated.computed
		key := "cpu|s|||1" // the all-time summary at the version after the one add
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
			if _, err := b.reader.summary(ctx, "cpu", nil, nil); err != nil {
				t.Fatal(err)
			}
			if got := b.reader.cache.misses.Load(); got != step.wantMisses {
				t.Errorf("after +%v: misses = %d, want %d", step.advance, got, step.wantMisses)
			}
		}
	})
	t.Run("memory sweeps", func(t *testing.T) {
		now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
		cfg := testConfig(t)
		cfg.CacheTTL = time.Minute
		b := newMemoryBackend(cfg, func() time.Time { return now })
		entries := b.reader.cache.entries.(*memoryCacheStore)
		ctx := context.Background()
		for i := range 100 {
			from, to := int64(i), int64(i+1)
			b.reader.summary(ctx, "cpu", &from, &to)
		}
		now = now.Add(2 * time.Minute)
		b.reader.summary(ctx, "cpu", nil, nil)
		b.sweep(now) // the background loop's sweep, which no request waits for
		if n := cacheLen(entries); n != 1 {
			t.Errorf("%d cache entries after the TTL passed and a sweep, want 1 (the fresh one)", n)
		}
	})
	t.Run("redis", func(t *testing.T) {
		needRedis(t)
		cfg := testConfig(t)
		cfg.CacheTTL = time.Minute
		prefix := testPrefix()
		pool := testPool(t, cfg, prefix)
		b := newRedisBackend(pool, prefix, cfg, time.Now)
		if _, err := b.reader.summary(context.Background(), "cpu", nil, nil); err != nil {
			t.Fatal(err)
		}
		c := pool.Get()
		defer c.Close()
		key := keys{prefix}.cacheEntry("cpu", "s||")
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
		if err := storeAdd(e.b, sample{typ: "cpu", at: 1, value: 1}, sample{typ: "cpu", at: 2, value: 1}); err != nil {
			t.Fatal(err)
		}
		entries := e.b.reader.cache.entries
		for _, put := range []cacheEntry{{version: 2, value: "new"}, {version: 1, value: "old"}} {
			if err := entries.put(ctx, "cpu", "k", put); err != nil {
				t.Fatal(err)
			}
		}
		_, got, ok, err := entries.get(ctx, "cpu", "k")
		if err != nil || !ok || got.version != 2 || entryText(got) != "new" {
			t.Errorf("after puts of versions 2 then 1, get = %d %q (ok %v, %v), want version 2 %q", got.version, entryText(got), ok, err, "new")
		}
		// A later version does replace it.
		entries.put(ctx, "cpu", "k", cacheEntry{version: 3, value: "newer"})
		if _, got, _, _ := entries.get(ctx, "cpu", "k"); got.version != 3 {
			t.Errorf("after a put of version 3, get = version %d, want 3", got.version)
		}
	})
}

// entryText is a cached string, as either store gives it back.
func entryText(e cacheEntry) string {
	if s, ok := e.value.(string); ok {
		return s
	}
	var s string
	json.Unmarshal(e.raw, &s)
	return s
}

func cacheLen(m *memoryCacheStore) int {
	n := 0
	m.entries.Range(func(any, any) bool { n++; return true })
	return n
}

// TestCacheFloodBounded reproduces the unbounded cache: 30 s of GETs of
// distinct windows took the memory store from 15 to 899 MiB, and on Redis
// filled a 20 MB maxmemory so that every POST got 503. Now the cache holds
// at most CACHE_MAX_ENTRIES, and a hot entry survives the flood.
func TestCacheFloodBounded(t *testing.T) {
	forEachStore(t, func(c *config) { c.CacheMaxEntries = 50 }, func(t *testing.T, e storeEnv) {
		ctx := context.Background()
		if err := storeAdd(e.b, sample{typ: "cpu", at: testEpoch.UnixMicro(), value: 1}); err != nil {
			t.Fatal(err)
		}
		base := testEpoch.Unix()
		for i := range 1000 {
			from, to := base-int64(i), base+1
			if _, err := e.b.reader.summary(ctx, "cpu", &from, &to); err != nil {
				t.Fatal(err)
			}
			if i%10 == 0 { // the dashboard's all-time summary, read throughout
				if _, err := e.b.reader.summary(ctx, "cpu", nil, nil); err != nil {
					t.Fatal(err)
				}
			}
		}
		n := 0
		switch c := e.b.reader.cache.entries.(type) {
		case *memoryCacheStore:
			n = cacheLen(c)
		case *redisCacheStore:
			conn := e.pool.Get()
			defer conn.Close()
			ks, err := redis.Strings(conn.Do("KEYS", e.prefix+"{cache}:e:*"))
			if err != nil {
				t.Fatal(err)
			}
			n = len(ks)
			if z, _ := redis.Int(conn.Do("ZCARD", keys{e.prefix}.cacheIndex())); z > 50 {
				t.Errorf("cache index holds %d entries, more than CACHE_MAX_ENTRIES=50", z)
			}
		}
		if n > 50 {
			t.Errorf("after 1,000 distinct windows the cache holds %d entries, more than CACHE_MAX_ENTRIES=50", n)
		}
		if _, ok := e.b.reader.cache.entries.(*memoryCacheStore); ok {
			before := e.b.reader.cache.misses.Load()
			e.b.reader.summary(ctx, "cpu", nil, nil)
			if e.b.reader.cache.misses.Load() != before {
				t.Error("the hot all-time summary was evicted by the flood of one-off windows")
			}
		}
	})
}

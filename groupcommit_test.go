package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// queued is an ingest of samples as add queues it, arrived now.
func queued(ctx context.Context, h retention, now time.Time, samples ...sample) *queuedIngest {
	n := len(samples)
	return &queuedIngest{ctx: ctx, batches: aggregate(samples, h), now: now, arrived: time.Now(), samples: n}
}

// settleGroup applies a group as add does, the ingests that are to run
// again alone run one after the other, in arrival order.
func settleGroup(rs *redisStore, group []*queuedIngest) []error {
	errs := rs.commitEach(group)
	for i, in := range group {
		errs[i] = rs.settle(in, errs[i])
	}
	return errs
}

// groupWindows is the windows the group tests compare: all time, and
// whole seconds, minutes and hours around the samples.
func groupWindows(rng *rand.Rand, span int64) []window {
	out := []window{allTime}
	base := testEpoch.Unix()
	for range 200 {
		f := base - 60 + rng.Int64N(span+120)
		l := []int64{1, 59, 61, 3599, 3601, span}[rng.IntN(6)]
		out = append(out, window{f, f + rng.Int64N(l+1)})
	}
	return out
}

// TestRedisGroupMatchesOneByOne applies random groups of small ingests,
// of several types with and without labels, each group in one run of the
// script, and the same ingests one by one to the memory store: every
// window, of the type and of each host, agrees to the bit, and with a
// recomputation from the raw samples. On a cluster, where a run is one
// type's, each ingest holds one type, and a group is a run per type.
func TestRedisGroupMatchesOneByOne(t *testing.T) { onEachRedis(t, testGroupMatchesOneByOne) }

func testGroupMatchesOneByOne(t *testing.T, cfg config) {
	cfg.Retention = retention{} // everything kept: every window is answerable
	clock := newFakeClock(testEpoch.Add(10 * 24 * time.Hour))
	mem, rb, _ := comparedStores(t, cfg, clock)
	rs := rb.store.(*redisStore)
	ctx := context.Background()

	rng := rand.New(rand.NewPCG(3, 4))
	span := int64(2 * 3600)
	types := []string{"cpu", "mem", "disk"}
	hosts := []string{"", "a", "b"}
	raw := map[string][]rawSample{} // by type, and by type and host
	var ingests [][]sample
	for range 400 {
		var in []sample
		one := types[rng.IntN(len(types))]
		for range 1 + rng.IntN(6) {
			typ, host := types[rng.IntN(len(types))], hosts[rng.IntN(len(hosts))]
			if len(cfg.RedisCluster) > 0 {
				typ = one
			}
			id := ""
			if host != "" {
				id = seriesID([]label{{"host", host}})
			}
			// A few seconds, so the ingests of a group share buckets.
			at := testEpoch.Add(time.Duration(rng.Int64N(4)*rng.Int64N(span/4))*time.Second).UnixMicro() + rng.Int64N(1_000_000)
			// Not dyadic: sums round, so the order they are added in
			// shows in their last bits.
			v := float64(rng.IntN(4001)-2000) / 10
			in = append(in, sample{typ: typ, series: id, at: at, value: v})
			raw[typ] = append(raw[typ], rawSample{at, v})
			if host != "" {
				raw[typ+"/"+host] = append(raw[typ+"/"+host], rawSample{at, v})
			}
		}
		ingests = append(ingests, in)
	}
	groups := 0
	for len(ingests) > 0 {
		n := min(len(ingests), 1+rng.IntN(24))
		var group []*queuedIngest
		for _, in := range ingests[:n] {
			addSamples(t, mem.store, cfg.Retention, in, clock.now())
			group = append(group, queued(ctx, cfg.Retention, clock.now(), in...))
		}
		for i, err := range settleGroup(rs, group) {
			if err != nil {
				t.Fatalf("group %d, ingest %d: %v", groups, i, err)
			}
		}
		ingests = ingests[n:]
		groups++
	}
	for _, typ := range types {
		for _, w := range groupWindows(rng, span) {
			from, to := w.bounds()
			for _, host := range hosts {
				f := labelFilter{}
				key := typ
				if host != "" {
					f.match = []label{{"host", host}}
					key = typ + "/" + host
				}
				checkStoresAgree(t, fmt.Sprintf("%s, %d groups", key, groups), mem, rb, typ, from, to, f, raw[key])
			}
		}
		mm, _ := mem.store.meta(ctx, typ)
		rm, _ := rb.store.meta(ctx, typ)
		if mm.version != rm.version || mm.first != rm.first || mm.newest != rm.newest {
			t.Fatalf("%s meta: memory %+v, redis %+v", typ, mm, rm)
		}
	}
}

// TestRedisGroupRefusalAnswersEachIngest: a group refused as a whole (one
// of its ingests brings a type past MAX_TYPES, one a series past
// MAX_SERIES, one samples too old) runs again one ingest at a time, so
// each gets its own answer, as one by one.
func TestRedisGroupRefusalAnswersEachIngest(t *testing.T) {
	e := redisStoreEnv(t, func(c *config) {
		c.MaxTypes, c.MaxSeries = 3, 2
		c.Retention = retention{res1s: 3600, res1m: 86400, res1h: 86400, res1d: 86400}
	})
	rs := e.b.store.(*redisStore)
	ctx, now, h := context.Background(), e.clock.now(), e.cfg.Retention
	at := now.UnixMicro()
	host := func(v string) string { return seriesID([]label{{"host", v}}) }
	group := []*queuedIngest{
		queued(ctx, h, now, sample{typ: "a", at: at, value: 1}),
		queued(ctx, h, now, sample{typ: "b", at: at, value: 2}, sample{typ: "a", series: host("x"), at: at, value: 3}),
		queued(ctx, h, now, sample{typ: "c", at: at, value: 4}),
		queued(ctx, h, now, sample{typ: "d", at: at, value: 5}),                     // a fourth type
		queued(ctx, h, now, sample{typ: "a", series: host("y"), at: at, value: 6}),  // a third series of a
		queued(ctx, h, now, sample{typ: "b", at: at - 3*86400*1_000_000, value: 7}), // past every resolution
		queued(ctx, h, now, sample{typ: "c", at: at, value: 8}),
	}
	errs := settleGroup(rs, group)
	var tt *tooManyTypesError
	var ts *tooManySeriesError
	var to *tooOldError
	for i, ok := range []bool{
		errs[0] == nil, errs[1] == nil, errs[2] == nil,
		errors.As(errs[3], &tt) && tt.typ == "d",
		errors.As(errs[4], &ts) && ts.typ == "a" && ts.id == host("y"),
		errors.As(errs[5], &to) && to.typ == "b",
		errs[6] == nil,
	} {
		if !ok {
			t.Fatalf("ingest %d of the group: %v", i, errs[i])
		}
	}
	for typ, want := range map[string]int64{"a": 2, "b": 1, "c": 2, "d": 0} {
		if got := count(t, e.b, typ); got != want {
			t.Errorf("%s holds %d samples, want %d", typ, got, want)
		}
	}
}

// TestRedisGroupDropsIngestsPastTheirDeadline: an ingest that queued past
// its fence, or whose request ended, is answered without being sent, and
// the rest of its group is stored.
func TestRedisGroupDropsIngestsPastTheirDeadline(t *testing.T) {
	e := redisStoreEnv(t, nil)
	rs := e.b.store.(*redisStore)
	now, h := e.clock.now(), e.cfg.Retention
	at := now.UnixMicro()
	ended, cancel := context.WithCancel(context.Background())
	cancel()
	late := queued(context.Background(), h, now, sample{typ: "late", at: at, value: 1})
	late.arrived = time.Now().Add(-e.cfg.RedisTimeout / 2)
	group := []*queuedIngest{
		queued(context.Background(), h, now, sample{typ: "kept", at: at, value: 1}),
		late,
		queued(ended, h, now, sample{typ: "gone", at: at, value: 1}),
	}
	errs := settleGroup(rs, group)
	if errs[0] != nil || !errors.Is(errs[1], errQueuedPastFence) || !errors.Is(errs[2], context.Canceled) {
		t.Fatalf("answers %v; want nil, %v, %v", errs, errQueuedPastFence, context.Canceled)
	}
	for typ, want := range map[string]int64{"kept": 1, "late": 0, "gone": 0} {
		if got := count(t, e.b, typ); got != want {
			t.Errorf("%s holds %d samples, want %d", typ, got, want)
		}
	}
}

// ownRedis is a backend on a redis-server of its own, for tests that pause
// it, and a connection to it.
func ownRedis(t *testing.T, tel *telemetry) (config, backend, redis.Conn) {
	srv := startRedis(t)
	cfg := testConfig(t)
	cfg.RedisAddr = srv.addr
	pool := newRedisPool(cfg, tel)
	t.Cleanup(func() { pool.Close() })
	c := pool.Get()
	t.Cleanup(func() { c.Close() })
	return cfg, newRedisBackend(pool, "", cfg, time.Now), c
}

// TestRedisConcurrentIngestsShareRuns: ingests that arrive while the runs
// in flight wait on Redis are applied together in one run when it frees
// up, and each is stored once.
func TestRedisConcurrentIngestsShareRuns(t *testing.T) {
	tel := newTelemetry()
	_, b, c := ownRedis(t, tel)
	rs := b.store.(*redisStore)
	// Writes wait while Redis is paused, the ingest script among them.
	if _, err := c.Do("CLIENT", "PAUSE", "10000", "WRITE"); err != nil {
		t.Fatal(err)
	}
	const n = 200
	var wg sync.WaitGroup
	errs := make([]error, n)
	ingest := func(i int) {
		wg.Go(func() {
			errs[i] = storeAdd(b, sample{typ: fmt.Sprintf("t%d", i%8), at: storeEpoch.UnixMicro(), value: float64(i)})
		})
	}
	queue := func(running, waiting int) func() bool {
		return func() bool {
			rs.queue.mu.Lock()
			defer rs.queue.mu.Unlock()
			return rs.queue.running == running && len(rs.queue.waiting) == waiting
		}
	}
	// One at a time, the first ingests each take a drainer, alone; the
	// rest queue behind them.
	for i := range maxCommits {
		ingest(i)
		waitFor(t, queue(i+1, 0), fmt.Sprintf("ingest %d taken by a drainer", i))
	}
	for i := maxCommits; i < n; i++ {
		ingest(i)
	}
	waitFor(t, queue(maxCommits, n-maxCommits), "the other ingests queued")
	if _, err := c.Do("CLIENT", "UNPAUSE"); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("ingest %d: %v", i, err)
		}
	}
	var total int64
	for i := range 8 {
		total += count(t, b, fmt.Sprintf("t%d", i))
	}
	var runs uint64
	for i := range tel.ingestGroups.counts {
		runs += tel.ingestGroups.counts[i].Load()
	}
	if total != n || tel.ingestGroups.sum.Load() != n || runs != maxCommits+1 {
		t.Fatalf("%d samples stored by %d ingests in %d runs; want %d in %d runs", total, tel.ingestGroups.sum.Load(), runs, n, maxCommits+1)
	}
}

// TestRedisGroupRetriesWithinTheirFences: a group whose earliest ingest's
// fence passes while Redis is paused is fenced as a whole, storing
// nothing; its other ingests then run alone within their own fences, and
// the late one is not sent again.
func TestRedisGroupRetriesWithinTheirFences(t *testing.T) {
	cfg, b, c := ownRedis(t, nil)
	rs := b.store.(*redisStore)
	ctx, now, h := context.Background(), time.Now(), cfg.Retention
	at := storeEpoch.UnixMicro()
	late := queued(ctx, h, now, sample{typ: "late", at: at, value: 1})
	late.arrived = time.Now().Add(100*time.Millisecond - cfg.RedisTimeout/2)
	group := []*queuedIngest{queued(ctx, h, now, sample{typ: "first", at: at, value: 1}), late,
		queued(ctx, h, now, sample{typ: "third", at: at, value: 1})}
	// Writes wait 300 ms, past the late ingest's fence, and the pause
	// ends by itself.
	if _, err := c.Do("CLIENT", "PAUSE", "300", "WRITE"); err != nil {
		t.Fatal(err)
	}
	errs := settleGroup(rs, group)
	if errs[0] != nil || !errors.Is(errs[1], errQueuedPastFence) || errs[2] != nil {
		t.Fatalf("answers %v; want nil, %v, nil", errs, errQueuedPastFence)
	}
	for typ, want := range map[string]int64{"first": 1, "late": 0, "third": 1} {
		if got := count(t, b, typ); got != want {
			t.Errorf("%s holds %d samples, want %d", typ, got, want)
		}
	}
}

// TestRedisGroupBadKeyFailsOnlyItsIngest: a key of the wrong type fails
// the ingest that writes it, not the others of its group.
func TestRedisGroupBadKeyFailsOnlyItsIngest(t *testing.T) {
	e := redisStoreEnv(t, nil)
	rs := e.b.store.(*redisStore)
	c := e.pool.Get()
	defer c.Close()
	if _, err := c.Do("SET", rs.keys.meta("bad"), "x"); err != nil {
		t.Fatal(err)
	}
	ctx, now, h := context.Background(), e.clock.now(), e.cfg.Retention
	at := now.UnixMicro()
	errs := settleGroup(rs, []*queuedIngest{queued(ctx, h, now, sample{typ: "good", at: at, value: 1}),
		queued(ctx, h, now, sample{typ: "bad", at: at, value: 1}), queued(ctx, h, now, sample{typ: "good", at: at, value: 2})})
	if errs[0] != nil || errs[1] == nil || refused(errs[1]) || errs[2] != nil {
		t.Fatalf("answers %v; want nil, a store error, nil", errs)
	}
	if got := count(t, e.b, "good"); got != 2 {
		t.Errorf("good holds %d samples, want 2", got)
	}
}

// TestRedisGroupKeepsEachSeriesUntil: the anchor from which each series
// holds no data, which retention and MAX_SERIES go by, is the same after
// random groups as after the same ingests one by one, for samples before
// 1970 (negative) as after.
func TestRedisGroupKeepsEachSeriesUntil(t *testing.T) {
	finite := func(c *config) {
		c.Retention = retention{res1s: 3600, res1m: 86400, res1h: 30 * 86400, res1d: 400 * 86400}
	}
	grouped, alone := redisStoreEnv(t, finite), redisStoreEnv(t, finite)
	scores := func(e storeEnv) map[string]string {
		c := e.pool.Get()
		defer c.Close()
		m, err := redis.StringMap(c.Do("ZRANGE", keys{e.prefix}.seriesUntil("cpu"), 0, -1, "WITHSCORES"))
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	rng := rand.New(rand.NewPCG(5, 6))
	ctx, h := context.Background(), grouped.cfg.Retention
	for _, base := range []time.Time{time.Date(1950, 3, 1, 0, 0, 0, 0, time.UTC), storeEpoch} {
		var group []*queuedIngest
		for i := range 60 {
			host := fmt.Sprint("h", rng.IntN(5))
			s := sample{typ: "cpu", series: seriesID([]label{{"host", host}}), value: 1,
				at: base.Add(time.Duration(rng.IntN(3*86400)) * time.Second).UnixMicro()}
			if err := storeAdd(alone.b, s); err != nil {
				t.Fatal(err)
			}
			group = append(group, queued(ctx, h, grouped.clock.now(), s))
			if i%20 == 19 {
				for _, err := range settleGroup(grouped.b.store.(*redisStore), group) {
					if err != nil {
						t.Fatal(err)
					}
				}
				group = nil
			}
		}
		if g, a := scores(grouped), scores(alone); !maps.Equal(g, a) || len(a) != 5 {
			t.Fatalf("after samples from %s, until of each series: grouped %v, one by one %v", base.Format("2006"), g, a)
		}
	}
}

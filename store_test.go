package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// rawSample is what a brute-force check keeps of each sample it stored.
type rawSample struct {
	at    int64 // Unix microseconds
	value float64
}

// bruteForce recomputes a window's answer from the raw samples:
// count, sum (added in no particular order: the values are dyadic, so any
// order is exact), min, max and the exact nearest-rank percentiles.
func bruteForce(raw []rawSample, from, to *int64) (st stats, pct []float64) {
	var vals []float64
	for _, r := range raw {
		sec := floorDiv(r.at, 1_000_000)
		if (from == nil || sec >= *from) && (to == nil || sec < *to) {
			st.add(r.value)
			vals = append(vals, r.value)
		}
	}
	slices.Sort(vals)
	for _, p := range percentilesReported {
		if len(vals) > 0 {
			rank := int(math.Ceil(p / 100 * float64(len(vals))))
			pct = append(pct, vals[max(rank, 1)-1])
		}
	}
	return st, pct
}

// randomIngests makes n samples of typ spread over span seconds from start
// (clustered, so window edges fall among samples), with dyadic values of
// both signs and zero, cut into batches of random sizes.
func randomIngests(rng *rand.Rand, typ string, start time.Time, span int64, n int) ([][]sample, []rawSample) {
	var batches [][]sample
	var raw []rawSample
	centers := []int64{0, span / 3, span / 2, span - 1}
	for len(raw) < n {
		size := 1 + rng.IntN(50)
		var b []sample
		for range size {
			c := centers[rng.IntN(len(centers))]
			off := c + rng.Int64N(7200) - 3600
			off = min(max(off, 0), span-1)
			at := start.Add(time.Duration(off)*time.Second).UnixMicro() + rng.Int64N(1_000_000)
			v := float64(rng.IntN(4001)-2000) / 4
			if rng.IntN(10) == 0 {
				v *= 1 << 20 // a wide spread of magnitudes
			}
			b = append(b, sample{typ: typ, at: at, value: v})
			raw = append(raw, rawSample{at, v})
		}
		batches = append(batches, b)
	}
	return batches, raw
}

func addSamples(t *testing.T, s metricStore, h retention, samples []sample, now time.Time) {
	t.Helper()
	if err := s.add(context.Background(), aggregate(samples, h), now); err != nil {
		t.Fatalf("add: %v", err)
	}
}

// sameValues reports whether two answers agree to the bit.
func sameValues(a, b aggregateValues) bool {
	bits := func(p *float64) uint64 {
		if p == nil {
			return 1<<64 - 1
		}
		return math.Float64bits(*p)
	}
	return a.Count == b.Count && math.Float64bits(a.Sum) == math.Float64bits(b.Sum) &&
		math.Float64bits(a.Average) == math.Float64bits(b.Average) &&
		bits(a.Min) == bits(b.Min) && bits(a.Max) == bits(b.Max) && bits(a.P50) == bits(b.P50) &&
		bits(a.P90) == bits(b.P90) && bits(a.P95) == bits(b.P95) && bits(a.P99) == bits(b.P99)
}

// checkStoresAgree reads typ's window [from, to) with filter f from the
// memory backend and a Redis one: they agree to the bit, and with a
// recomputation from raw, whose sum is added in another order: the sum to
// rounding, the rest exactly.
func checkStoresAgree(t *testing.T, name string, mem, rb backend, typ string, from, to *int64, f labelFilter, raw []rawSample) {
	t.Helper()
	ctx := context.Background()
	m, _, err := mem.reader.window(ctx, typ, from, to, f)
	if err != nil {
		t.Fatal(err)
	}
	r, _, err := rb.reader.window(ctx, typ, from, to, f)
	if err != nil {
		t.Fatal(err)
	}
	mv, rv := onlyGroup(m), onlyGroup(r)
	name = fmt.Sprintf("%s over [%s, %s)", name, optBound(from), optBound(to))
	if !sameValues(mv, rv) {
		t.Fatalf("%s: memory %+v, redis %+v", name, mv, rv)
	}
	if st, _ := bruteForce(raw, from, to); math.Abs(rv.Sum-st.sum) > 1e-9*float64(st.count)*200 {
		t.Fatalf("%s: sum %v, want %v", name, rv.Sum, st.sum)
	} else {
		rv.Sum = st.sum
	}
	checkAgainstBruteForce(t, name, rv, raw, from, to)
}

func checkAgainstBruteForce(t *testing.T, name string, got aggregateValues, raw []rawSample, from, to *int64) {
	t.Helper()
	st, pct := bruteForce(raw, from, to)
	if got.Count != st.count || got.Sum != st.sum {
		t.Fatalf("%s window [%s, %s): count, sum = %d, %v; want %d, %v", name, optBound(from), optBound(to), got.Count, got.Sum, st.count, st.sum)
	}
	if st.count == 0 {
		if got.Min != nil || got.P50 != nil {
			t.Fatalf("%s empty window has min or percentiles: %+v", name, got)
		}
		return
	}
	if *got.Min != st.min || *got.Max != st.max {
		t.Fatalf("%s window [%s, %s): min, max = %v, %v; want %v, %v", name, optBound(from), optBound(to), *got.Min, *got.Max, st.min, st.max)
	}
	for i, p := range []*float64{got.P50, got.P90, got.P95, got.P99} {
		want := pct[i]
		if p == nil || math.Abs(*p-want) > 0.01*math.Abs(want) || *p < st.min || *p > st.max {
			t.Fatalf("%s window [%s, %s): p%v = %v, want within 1%% of %v", name, optBound(from), optBound(to), percentilesReported[i], p, want)
		}
	}
}

// TestWindowsMatchBruteForce stores the same random samples in the memory
// store and in Redis (through two instances, alternately), then checks
// 1,000 random whole-second windows against a recomputation from the raw
// samples, and the two stores against each other, to the bit.
func TestWindowsMatchBruteForce(t *testing.T) { onEachRedis(t, testWindowsMatchBruteForce) }

func testWindowsMatchBruteForce(t *testing.T, cfg config) {
	cfg.Retention = retention{} // everything kept: every window is answerable
	clock := newFakeClock(testEpoch.Add(10 * 24 * time.Hour))
	mem, redisA, redisB := comparedStores(t, cfg, clock)

	rng := rand.New(rand.NewPCG(7, 8))
	span := int64(3 * 86400)
	batches, raw := randomIngests(rng, "cpu", testEpoch, span, 3000)
	other, _ := randomIngests(rng, "mem", testEpoch, span, 200) // must not leak into cpu
	for i, b := range append(batches, other...) {
		addSamples(t, mem.store, cfg.Retention, b, clock.now())
		r := redisA
		if i%2 == 1 {
			r = redisB
		}
		addSamples(t, r.store, cfg.Retention, b, clock.now())
	}
	ctx := context.Background()
	base := testEpoch.Unix()
	for i := range 1000 {
		var from, to *int64
		if i%50 != 0 {
			f := base - 600 + rng.Int64N(span+1200)
			l := []int64{1, 59, 61, 3599, 3601, 86399, 86401, span}[rng.IntN(8)]
			e := f + rng.Int64N(l+1)
			from, to = &f, &e
			if i%50 == 7 {
				from = nil
			}
			if i%50 == 9 {
				to = nil
			}
		}
		m, _, err := mem.reader.window(ctx, "cpu", from, to, labelFilter{})
		if err != nil {
			t.Fatal(err)
		}
		rd, _, err := redisA.reader.window(ctx, "cpu", from, to, labelFilter{})
		if err != nil {
			t.Fatal(err)
		}
		mv, rv := onlyGroup(m), onlyGroup(rd)
		checkAgainstBruteForce(t, "memory", mv, raw, from, to)
		checkAgainstBruteForce(t, "redis", rv, raw, from, to)
		if !sameValues(mv, rv) {
			t.Fatalf("window [%s, %s): memory %+v and redis %+v differ", optBound(from), optBound(to), mv, rv)
		}
	}
}

// TestRedisIngestAllOrNothing reproduces a partial write: with one key of
// the wrong type, a batch of two types used to store the first and fail on
// the second, and each retry added the first again.
func TestRedisIngestAllOrNothing(t *testing.T) {
	needRedis(t)
	cfg := testConfig(t)
	prefix := testPrefix()
	pool := testPool(t, cfg, prefix)
	b := newRedisBackend(pool, prefix, cfg, time.Now)
	k := keys{prefix}
	c := pool.Get()
	defer c.Close()
	at := testEpoch.UnixMicro()
	batch := []sample{{typ: "aaa", at: at, value: 1}, {typ: "bbb", at: at, value: 2}}
	for _, bad := range []string{k.meta("bbb"), k.bucket("bbb", res1m, floorTo(testEpoch.Unix(), 60)), k.index("bbb", res1s), k.types()} {
		if _, err := c.Do("SET", bad, "x"); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if err := b.store.add(context.Background(), aggregate(batch, cfg.Retention), time.Now()); err == nil {
				t.Fatalf("add with %s of the wrong type = nil, want an error", bad)
			}
		}
		if m, err := b.store.meta(context.Background(), "aaa"); err != nil || m.version != 0 {
			t.Fatalf("with %s of the wrong type, aaa = %+v, %v; want nothing stored", bad, m, err)
		}
		if n, _ := c.Do("EXISTS", k.bucket("aaa", resAll, 0), k.bucket("aaa", res1s, testEpoch.Unix())); n != int64(0) {
			t.Fatalf("with %s of the wrong type, %v of aaa's buckets exist", bad, n)
		}
		c.Do("DEL", bad)
	}
	// A bucket is a string: a hash there is of the wrong type too.
	if _, err := c.Do("HSET", k.bucket("bbb", res1s, testEpoch.Unix()), "f", "v"); err != nil {
		t.Fatal(err)
	}
	if err := b.store.add(context.Background(), aggregate(batch, cfg.Retention), time.Now()); err == nil {
		t.Fatal("add with a bucket of the wrong type = nil, want an error")
	}
	if m, _ := b.store.meta(context.Background(), "aaa"); m.version != 0 {
		t.Fatalf("with a bucket of the wrong type, aaa = %+v; want nothing stored", m)
	}
}

// TestRedisOutOfMemoryStoresNothing: a Redis at its memory limit refuses
// the ingest script at its first write, so nothing of it is stored.
func TestRedisOutOfMemoryStoresNothing(t *testing.T) {
	srv := startRedis(t, "--maxmemory-policy", "noeviction")
	cfg := testConfig(t)
	cfg.RedisAddr = srv.addr
	pool := newRedisPool(cfg, nil)
	defer pool.Close()
	b := newRedisBackend(pool, "", cfg, time.Now)
	c := pool.Get()
	defer c.Close()
	if _, err := c.Do("CONFIG", "SET", "maxmemory", "1"); err != nil {
		t.Fatal(err)
	}
	var batch []sample
	for i := range 100 {
		batch = append(batch, sample{typ: fmt.Sprintf("t%d", i), at: testEpoch.UnixMicro(), value: 1})
	}
	if err := b.store.add(context.Background(), aggregate(batch, cfg.Retention), time.Now()); err == nil {
		t.Fatal("add with Redis out of memory = nil, want an error")
	}
	c.Do("CONFIG", "SET", "maxmemory", "0")
	if n, err := c.Do("DBSIZE"); err != nil || n != int64(0) {
		t.Fatalf("after a refused ingest Redis holds %v keys (%v), want 0", n, err)
	}
}

// TestRedisLargestBatchIsHonest reproduces "503 yet stored": the largest
// batch the limits allow (MAX_BATCH samples of distinct types) ran past the
// fence's budget, so the service answered 503 for samples that were
// stored. Now its answer is the truth: stored and acknowledged, or refused
// and absent, also at a tight REDIS_TIMEOUT and after Redis was busy.
func TestRedisLargestBatchIsHonest(t *testing.T) {
	needRedis(t)
	for _, c := range []struct {
		name    string
		timeout time.Duration
		busy    string // seconds Redis is kept busy just before
	}{{"default timeout", 500 * time.Millisecond, ""}, {"tight timeout", 150 * time.Millisecond, ""}, {"busy redis", 500 * time.Millisecond, "0.45"}} {
		t.Run(c.name, func(t *testing.T) {
			cfg := testConfig(t)
			cfg.RedisTimeout = c.timeout
			prefix := testPrefix()
			pool := testPool(t, cfg, prefix)
			b := newRedisBackend(pool, prefix, cfg, time.Now)
			var batch []sample
			for i := range cfg.MaxBatch {
				batch = append(batch, sample{typ: fmt.Sprintf("t%05d", i), at: testEpoch.UnixMicro() + int64(i), value: 1})
			}
			batches := aggregate(batch, cfg.Retention)
			if c.busy != "" {
				// Sent, not awaited: whether Redis sleeps before or after the
				// ingest arrives, the answer must be the truth.
				busy := pool.Get()
				defer busy.Close()
				busy.Send("DEBUG", "SLEEP", c.busy)
				busy.Flush()
			}
			start := time.Now()
			err := b.store.add(context.Background(), batches, time.Now())
			t.Logf("add took %v", time.Since(start))
			side := pool.Get()
			defer side.Close()
			n, serr := side.Do("SCARD", keys{prefix}.types())
			if serr != nil {
				t.Fatal(serr)
			}
			if err == nil && n != int64(cfg.MaxBatch) || err != nil && n != int64(0) {
				t.Fatalf("add = %v with %v types stored; want nil with %d, or an error with none", err, n, cfg.MaxBatch)
			}
			t.Logf("add = %v, %v types stored", err, n)
		})
	}
}

// storedBucketExists reports whether e's store holds typ's bucket of r at
// start, looked up in the store's own structures.
func storedBucketExists(t *testing.T, e storeEnv, typ string, r resolution, start int64) bool {
	t.Helper()
	if e.pool != nil {
		c := e.pool.Get()
		defer c.Close()
		n, err := c.Do("EXISTS", keys{e.prefix}.bucket(typ, r, start))
		if err != nil {
			t.Fatal(err)
		}
		return n == int64(1)
	}
	mt := e.b.store.(*memoryStore).lookup(typ)
	mt.mu.RLock()
	defer mt.mu.RUnlock()
	for _, b := range mt.buckets[r] {
		if b.start == start {
			return true
		}
	}
	return false
}

// TestRetentionDropsBuckets: with a fake clock, a bucket goes once the
// anchor passes its end plus its horizon (memory: by the background
// sweep; Redis: by the next ingest that moves the anchor), coarser ones
// stay, and a window that would need the dropped detail is refused.
func TestRetentionDropsBuckets(t *testing.T) {
	forEachStore(t, func(c *config) { c.Retention = retention{60, 3600, 86400, 0} }, func(t *testing.T, e storeEnv) {
		ctx := context.Background()
		t0 := e.clock.now().Unix()
		if err := storeAdd(e.b, sample{typ: "cpu", at: t0 * 1_000_000, value: 1}); err != nil {
			t.Fatal(err)
		}
		e.clock.advance(2 * time.Minute)
		if err := storeAdd(e.b, sample{typ: "cpu", at: e.clock.now().UnixMicro(), value: 2}); err != nil {
			t.Fatal(err)
		}
		if e.b.sweep != nil {
			e.b.sweep(e.clock.now())
		}
		for _, c := range []struct {
			r    resolution
			want bool
		}{{res1s, false}, {res1m, true}, {res1h, true}, {res1d, true}} {
			if got := storedBucketExists(t, e, "cpu", c.r, floorTo(t0, c.r.seconds())); got != c.want {
				t.Errorf("bucket %s of the first sample exists = %v, want %v", c.r, got, c.want)
			}
		}
		from, to := t0+1, e.clock.now().Unix()+1
		if _, _, err := e.b.reader.window(ctx, "cpu", &from, &to, labelFilter{}); err == nil || !strings.Contains(err.Error(), "kept per minute") {
			t.Errorf("a window from a second whose detail aged out = %v, want 422 saying it is kept per minute", err)
		}
		from = floorTo(t0, 60)
		if v, _, err := summarize(e.b, "cpu", window{from, to}); err != nil || v.Count != 2 {
			t.Errorf("the minute-aligned window = %+v, %v; want both samples", v, err)
		}
		// A series at seconds from there is refused the same way, and says
		// how to move it.
		plan, err := planSeries(t0, to, 1)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := e.b.reader.series(ctx, "cpu", plan, labelFilter{}, false); err == nil || !strings.Contains(err.Error(), "kept per minute") ||
			!strings.Contains(err.Error(), "use a step of whole minutes") {
			t.Errorf("a per-second series from a second whose detail aged out = %v, want 422 saying it is kept per minute", err)
		}
	})
}

// TestRedisBucketsPastTheNewestExpireByThemselves: when the type's newest
// sample is ahead of the clock, a bucket whose horizon that sample has
// passed goes on the clock alone, so Redis expires it: PTTL is the
// bucket's end plus the horizon, less now.
func TestRedisBucketsPastTheNewestExpireByThemselves(t *testing.T) {
	e := redisStoreEnv(t, func(c *config) { c.Retention = retention{60, 3600, 86400, 0} })
	now := e.clock.now()
	if err := storeAdd(e.b, sample{typ: "cpu", at: now.Add(30 * time.Minute).UnixMicro(), value: 1},
		sample{typ: "cpu", at: now.UnixMicro(), value: 1}); err != nil {
		t.Fatal(err)
	}
	c := e.pool.Get()
	defer c.Close()
	k := keys{e.prefix}
	for _, x := range []struct {
		r    resolution
		want time.Duration // end + horizon - now; 0: no expiry
	}{{res1s, 61 * time.Second}, {res1m, 0}} {
		start := floorTo(now.Unix(), x.r.seconds())
		pttl, err := redis.Int64(c.Do("PTTL", k.bucket("cpu", x.r, start)))
		if err != nil {
			t.Fatal(err)
		}
		want := x.want.Milliseconds() - (now.UnixMilli() - start*1000)
		if x.want == 0 {
			want = -1
		}
		if pttl < want-1000 || pttl > want+1000 || x.want == 0 && pttl != -1 {
			t.Errorf("PTTL of the %s bucket = %d ms, want %d within 1 s", x.r, pttl, want)
		}
	}
}

// TestBinsBoundedAlikeInBothStores drives one bucket past the sketch's
// bound with values over 300 orders of magnitude, in many ingests of
// both signs, and checks that Redis (whose script applies the bound) and
// the memory store (sketch.go) keep the same bins: their answers agree to
// the bit, and no Redis bucket holds more than the bound.
func TestBinsBoundedAlikeInBothStores(t *testing.T) {
	needRedis(t)
	cfg := testConfig(t)
	clock := newFakeClock(storeEpoch)
	mem := newMemoryBackend(cfg, clock.now)
	prefix := testPrefix()
	pool := testPool(t, cfg, prefix)
	rb := newRedisBackend(pool, prefix, cfg, clock.now)
	rng := rand.New(rand.NewPCG(5, 6))
	at := sampleTime.UnixMicro()
	for range 40 {
		var batch []sample
		for range 1 + rng.IntN(300) {
			v := math.Pow(10, rng.Float64()*300-150)
			if rng.IntN(3) == 0 {
				v = -v
			}
			batch = append(batch, sample{typ: "wide", at: at, value: v})
		}
		addSamples(t, mem.store, cfg.Retention, batch, clock.now())
		addSamples(t, rb.store, cfg.Retention, batch, clock.now())
		if err := rb.compact(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	for _, w := range []window{allTime, {sampleTime.Unix(), sampleTime.Unix() + 1}, {floorTo(sampleTime.Unix(), 3600), sampleTime.Unix() + 3600}} {
		m, _, err1 := summarize(mem, "wide", w)
		r, _, err2 := summarize(rb, "wide", w)
		if err1 != nil || err2 != nil || !sameValues(m, r) {
			t.Fatalf("window %v: memory %+v (%v) and redis %+v (%v) differ", w, m, err1, r, err2)
		}
	}
	c := pool.Get()
	defer c.Close()
	for _, r := range []resolution{res1s, res1m, resAll} {
		v, err := redis.Bytes(c.Do("GET", keys{prefix}.bucket("wide", r, floorTo(sampleTime.Unix(), r.secondsOr1()))))
		if err != nil {
			t.Fatal(err)
		}
		if b, err := parseBucket(v); err != nil || len(b.bins) > 2*maxBinsPerSign {
			t.Errorf("bucket %s holds %d bins (%v), want at most the bound %d per sign", r, len(b.bins), err, maxBinsPerSign)
		}
	}
}

// TestRedisBucketSizeFollowsBins: an ingest appends its record to a Redis
// bucket without reading it, and notes a bucket that has grown; the
// background compaction merges its records, so 1,000 ingests of one value
// into one second leave a bucket of a few records, not of 1,000 appends,
// with every sample still counted.
func TestRedisBucketSizeFollowsBins(t *testing.T) {
	e := redisStoreEnv(t, nil)
	for i := range 1000 {
		if err := storeAdd(e.b, sample{typ: "cpu", at: sampleTime.UnixMicro() + int64(i), value: 42}); err != nil {
			t.Fatal(err)
		}
		if i%100 == 99 { // as the background loop would, now and then
			if err := e.b.compact(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
	}
	c := e.pool.Get()
	defer c.Close()
	for _, r := range []resolution{res1s, res1d, resAll} {
		key := keys{e.prefix}.bucket("cpu", r, floorTo(sampleTime.Unix(), r.secondsOr1()))
		n, err := redis.Int(c.Do("STRLEN", key))
		// At most twice the merged size and 64 bytes, plus what the last
		// hundred ingests appended since.
		if err != nil || n > 100*40 {
			t.Errorf("STRLEN %s = %d (%v) after 1,000 ingests of one value, want a few records (at most %d)", key, n, err, 100*40)
		}
	}
	if v, _, err := summarize(e.b, "cpu", allTime); err != nil || v.Count != 1000 || *v.P99 != 42 {
		t.Errorf("summary = %+v, %v; want 1,000 samples of 42", v, err)
	}
}

// TestRedisCompactionKeepsLaterRecords: a compaction merges what it read;
// records appended after that read survive it, and a compaction of a
// version another one already replaced changes nothing.
func TestRedisCompactionKeepsLaterRecords(t *testing.T) {
	e := redisStoreEnv(t, nil)
	c := e.pool.Get()
	defer c.Close()
	key := keys{e.prefix}.bucket("cpu", res1s, sampleTime.Unix())
	at := sampleTime.UnixMicro()
	for _, v := range []float64{1, 2} {
		if err := storeAdd(e.b, sample{typ: "cpu", at: at, value: v}); err != nil {
			t.Fatal(err)
		}
	}
	read, err := redis.Bytes(c.Do("GET", key))
	if err != nil {
		t.Fatal(err)
	}
	if err := storeAdd(e.b, sample{typ: "cpu", at: at, value: 4}); err != nil { // after the read
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Second)
	if err := compactBucket(c, deadline, key, read); err != nil {
		t.Fatal(err)
	}
	if err := compactBucket(c, deadline, key, read); err != nil { // stale: no effect
		t.Fatal(err)
	}
	v, err := redis.Bytes(c.Do("GET", key))
	if err != nil {
		t.Fatal(err)
	}
	b, err := parseBucket(v)
	if err != nil || b.count != 3 || b.sum != 7 || b.min != 1 || b.max != 4 {
		t.Errorf("bucket after compactions = %+v, %v; want 3 samples summing to 7 from 1 to 4", b.stats, err)
	}
}

// TestRefusedIngestTakesNoTypeRoom: a batch refused because one of its
// samples is too old stores nothing, and the new types in it take no room
// under MAX_TYPES.
func TestRefusedIngestTakesNoTypeRoom(t *testing.T) {
	forEachStore(t, func(c *config) {
		c.MaxTypes = 2
		c.Retention = retention{3600, 7 * 86400, 90 * 86400, 400 * 86400}
	}, func(t *testing.T, e storeEnv) {
		now := e.clock.now().UnixMicro()
		if err := storeAdd(e.b, sample{typ: "old", at: now, value: 1}); err != nil {
			t.Fatal(err)
		}
		var to *tooOldError
		err := storeAdd(e.b, sample{typ: "new1", at: now, value: 1}, sample{typ: "old", at: now - 500*86400*1_000_000, value: 1})
		if !errors.As(err, &to) {
			t.Fatalf("a batch with a sample older than every horizon = %v, want a tooOldError", err)
		}
		if err := storeAdd(e.b, sample{typ: "new2", at: now, value: 1}); err != nil {
			t.Errorf("a new type after the refused batch = %v, want room for it", err)
		}
	})
}

// countKeys is how many of e's Redis keys match pattern (after the prefix).
func countKeys(t *testing.T, e storeEnv, pattern string) int {
	t.Helper()
	c := e.pool.Get()
	defer c.Close()
	ks, err := redis.Strings(c.Do("KEYS", e.prefix+pattern))
	if err != nil {
		t.Fatal(err)
	}
	return len(ks)
}

// TestRedisRetentionKeepsUp reproduces two ways Redis kept buckets past
// their horizon forever: samples stamped ahead of the server's clock (the
// anchor then moves with the clock, not with the samples), and ingests
// that each create more chunks of buckets than one ingest used to delete.
func TestRedisRetentionKeepsUp(t *testing.T) {
	t.Run("clock behind the samples", func(t *testing.T) {
		e := redisStoreEnv(t, func(c *config) { c.Retention = retention{60, 3600, 86400, 0} })
		for range 600 { // ten minutes, one sample a second, stamped 2 s ahead
			if err := storeAdd(e.b, sample{typ: "fut", at: e.clock.now().Add(2 * time.Second).UnixMicro(), value: 1}); err != nil {
				t.Fatal(err)
			}
			e.clock.advance(time.Second)
		}
		// A minute kept, plus the chunk in progress and the one the anchor
		// has not quite passed: at most three minutes of seconds.
		if n := countKeys(t, e, "{fut}:b:1s:*"); n > 180 {
			t.Errorf("%d second buckets after ten minutes with RETENTION_1S=60s, want at most 180", n)
		}
	})
	t.Run("batches of five minutes", func(t *testing.T) {
		e := redisStoreEnv(t, func(c *config) { c.Retention = retention{600, 3600, 86400, 0} })
		for range 30 { // two and a half hours, flushed every five minutes
			var batch []sample
			for s := range 300 {
				batch = append(batch, sample{typ: "agent", at: e.clock.now().Add(time.Duration(s) * time.Second).UnixMicro(), value: 1})
			}
			if err := storeAdd(e.b, batch...); err != nil {
				t.Fatal(err)
			}
			e.clock.advance(5 * time.Minute)
		}
		if n := countKeys(t, e, "{agent}:b:1s:*"); n > 600+300+120 {
			t.Errorf("%d second buckets with RETENTION_1S=10m, want about 900 (ten minutes and the last batch)", n)
		}
	})
}

// TestRedisSweepChecksIndexesFirst: when an ingest will run retention, a
// retention index of the wrong type fails it before its first write (it
// used to fail it after, a 503 for samples that were stored).
func TestRedisSweepChecksIndexesFirst(t *testing.T) {
	e := redisStoreEnv(t, nil)
	now := e.clock.now()
	if err := storeAdd(e.b, sample{typ: "cpu", at: now.UnixMicro(), value: 1}); err != nil {
		t.Fatal(err)
	}
	c := e.pool.Get()
	defer c.Close()
	if _, err := c.Do("SET", keys{e.prefix}.index("cpu", res1m), "x"); err != nil {
		t.Fatal(err)
	}
	e.clock.advance(time.Second) // same minute: only the sweep touches the minute index
	if err := storeAdd(e.b, sample{typ: "cpu", at: e.clock.now().UnixMicro(), value: 1}); err == nil {
		t.Fatal("an ingest whose sweep meets an index of the wrong type = nil, want an error")
	}
	if m, err := e.b.store.meta(context.Background(), "cpu"); err != nil || m.version != 1 {
		t.Errorf("after the refused ingest, version = %d (%v), want 1: nothing stored", m.version, err)
	}
	if n, _ := redis.Int(c.Do("EXISTS", keys{e.prefix}.bucket("cpu", res1s, e.clock.now().Unix()))); n != 0 {
		t.Error("after the refused ingest, its second's bucket exists: it was partly applied")
	}
}

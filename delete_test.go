package main

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

const deleteToken = "delete-token-0123456789"

// deleteWith sends DELETE /api/metrics with query q and the token.
func deleteWith(t *testing.T, base, q, token string) response {
	t.Helper()
	var header []string
	if token != "" {
		header = []string{"Authorization", "Bearer " + token}
	}
	return sendWith(t, "DELETE", base+"/api/metrics?"+q, "", header...)
}

// TestDelete: a delete of some series or of a type is gone from the
// summary (cached before it, too), series, types and labels, on every
// instance; it frees its MAX_SERIES and MAX_TYPES room; a type made again
// holds only its new data; it needs a right token.
func TestDelete(t *testing.T) {
	forEachStore(t, func(c *config) {
		c.AuthTokens = []string{deleteToken}
		c.MaxTypes, c.MaxSeries = 2, 3
	}, func(t *testing.T, e storeEnv) {
		bases := []string{serve(t, e.cfg, e.b)}
		if e.reopen != nil {
			bases = append(bases, serve(t, e.cfg, e.reopen()))
		}
		auth := []string{"Authorization", "Bearer " + deleteToken}
		write := func(base, body string, want int) {
			t.Helper()
			if r := sendWith(t, "POST", base+"/api/metrics", body, auth...); r.status != want {
				t.Fatalf("post %s: %d %s, want %d", body, r.status, r.body, want)
			}
		}
		write(bases[0], "["+metricBody("cpu", sampleTime, 1)+","+hostBody("cpu", "a", sampleTime, 10)+","+
			hostBody("cpu", "a", sampleTime.Add(time.Minute), 20)+","+hostBody("cpu", "b", sampleTime, 100)+","+
			metricBody("mem", sampleTime, 7)+"]", 201)
		summary := func(base, q string) map[string]any {
			t.Helper()
			r := sendWith(t, "GET", base+"/api/metrics/summary?"+q, "")
			if r.status != 200 {
				t.Fatalf("summary %s: %d %s", q, r.status, r.body)
			}
			return r.json(t)
		}
		for _, base := range bases { // cached on every instance
			if got := summary(base, "metric_type=cpu")["count"]; got != 4.0 {
				t.Fatalf("cpu count %v, want 4", got)
			}
		}
		write(bases[0], hostBody("cpu", "c", sampleTime, 1), 422)      // MAX_SERIES
		write(bases[0], metricBody("disk", sampleTime, 1), 422)        // MAX_TYPES
		for _, token := range []string{"", "wrong-token-0123456789"} { // refused, nothing deleted
			r := deleteWith(t, bases[0], "metric_type=cpu", token)
			if r.status != 401 || r.header.Get("WWW-Authenticate") != "Bearer" {
				t.Fatalf("delete with token %q: %d %v %s, want 401", token, r.status, r.header, r.body)
			}
		}

		r := deleteWith(t, bases[len(bases)-1], "metric_type=cpu&label=host:a", deleteToken)
		if r.status != 200 || r.body != `{"message":"deleted","type":"cpu","series":1}`+"\n" {
			t.Fatalf("delete host a: %d %s", r.status, r.body)
		}
		for _, base := range bases {
			s := summary(base, "metric_type=cpu")
			if s["count"] != 2.0 || s["sum"] != 101.0 || s["max"] != 100.0 {
				t.Fatalf("cpu after deleting host a, at %s: %v, want count 2 sum 101 max 100", base, s)
			}
			if s := summary(base, "metric_type=cpu&label=host:a"); s["count"] != 0.0 {
				t.Fatalf("host a after its delete: %v", s)
			}
			labels := sendWith(t, "GET", base+"/api/metrics/labels?metric_type=cpu", "")
			if !strings.Contains(labels.body, `"host":["b"]`) {
				t.Fatalf("labels after deleting host a: %s", labels.body)
			}
			series := sendWith(t, "GET", base+"/api/metrics/series?metric_type=cpu&from=2025-01-01T10:00:00Z&to=2025-01-01T10:02:00Z&step=1m", "")
			if !strings.Contains(series.body, `"count":2,`) || strings.Contains(series.body, `"sum":20`) {
				t.Fatalf("series after deleting host a: %s", series.body)
			}
		}
		write(bases[0], hostBody("cpu", "c", sampleTime, 1), 201) // its room is free

		// Nothing matches: nothing deleted; unknown type: the same.
		for _, q := range []string{"metric_type=cpu&label=host:zz", "metric_type=nope"} {
			if r := deleteWith(t, bases[0], q, deleteToken); r.status != 200 || !strings.Contains(r.body, `"series":0`) {
				t.Fatalf("delete %s: %d %s", q, r.status, r.body)
			}
		}
		for _, q := range []string{"", "metric_type=bad%20type", "metric_type=cpu&label=host", "metric_type=cpu&label=9x:y",
			"metric_type=cpu&from=2025-01-01T10:00:00Z", "metric_type=cpu&metric_type=mem", "metric_type=cpu&group_by=host"} {
			if r := deleteWith(t, bases[0], q, deleteToken); r.status != 422 {
				t.Fatalf("delete %q: %d %s, want 422", q, r.status, r.body)
			}
		}

		// The whole type: gone from types, its room free, and made again
		// it holds only what comes after.
		if got := summary(bases[0], "metric_type=mem")["count"]; got != 1.0 {
			t.Fatalf("mem count %v", got)
		}
		if got := summary(bases[0], "metric_type=cpu")["count"]; got != 3.0 {
			t.Fatalf("cpu count %v after refused deletes, want 3", got)
		}
		if r := deleteWith(t, bases[0], "metric_type=mem", deleteToken); r.status != 200 || !strings.Contains(r.body, `"series":1`) {
			t.Fatalf("delete mem: %d %s", r.status, r.body)
		}
		for _, base := range bases {
			if got := summary(base, "metric_type=mem")["count"]; got != 0.0 {
				t.Fatalf("mem after its delete, at %s: count %v", base, got)
			}
			if types := sendWith(t, "GET", base+"/api/metrics/types", ""); strings.Contains(types.body, `"mem"`) {
				t.Fatalf("types after deleting mem: %s", types.body)
			}
		}
		write(bases[0], metricBody("disk", sampleTime, 1), 201)
		if r := deleteWith(t, bases[0], "metric_type=disk", deleteToken); r.status != 200 {
			t.Fatalf("delete disk: %d %s", r.status, r.body)
		}
		write(bases[len(bases)-1], metricBody("mem", sampleTime, 3), 201)
		for _, base := range bases {
			s := summary(base, "metric_type=mem")
			if s["count"] != 1.0 || s["sum"] != 3.0 {
				t.Fatalf("mem made again, at %s: %v, want count 1 sum 3", base, s)
			}
		}
		types := sendWith(t, "GET", bases[0]+"/api/metrics/types", "")
		if !strings.Contains(types.body, `{"type":"cpu","count":3,`) || !strings.Contains(types.body, `{"type":"mem","count":1,`) {
			t.Fatalf("types: %s", types.body)
		}
	})
}

// TestDeleteNeedsTokens: without AUTH_TOKENS every delete is 403.
func TestDeleteNeedsTokens(t *testing.T) {
	cfg := testConfig(t)
	cfg.RateLimit = 3
	b := newMemoryBackend(cfg, time.Now)
	base := serve(t, cfg, b)
	if r := post(t, base, metricBody("cpu", sampleTime, 1)); r.status != 201 {
		t.Fatalf("post: %d", r.status)
	}
	for _, token := range []string{"", "any-token-0123456789"} {
		r := deleteWith(t, base, "metric_type=cpu", token)
		if r.status != 403 || r.body != `{"detail":"deleting needs AUTH_TOKENS"}`+"\n" {
			t.Fatalf("delete without AUTH_TOKENS: %d %s", r.status, r.body)
		}
	}
	// Refused, a delete still counts against the address's rate limit.
	if r := deleteWith(t, base, "metric_type=cpu", ""); r.status != 429 {
		t.Fatalf("the fourth request of a limit of 3: %d %s, want 429", r.status, r.body)
	}
	if n := count(t, b, "cpu"); n != 1 {
		t.Fatalf("%d samples after refused deletes", n)
	}
}

// holds reports whether the sample's labels include every pair in match.
func (r labelledRaw) holds(match []label) bool {
	return !slices.ContainsFunc(match, func(l label) bool { v, ok := r.labels[l.name]; return !ok || v != l.value })
}

// TestDeleteMatchesRecomputation deletes random sets of series and whole
// types from the memory store and from Redis, through two instances, after
// random ingests: every window, of the type and of each label, agrees
// between the stores to the bit, and with a recomputation from the samples
// that remain; so do the types' metas and listing. With retention kept
// forever a delete finds buckets at every start, without indexes; with
// the default retention, by the indexes.
func TestDeleteMatchesRecomputation(t *testing.T) {
	def := testConfig(t).Retention
	for _, tc := range []struct {
		name  string
		h     retention
		clock time.Duration
	}{{"forever", retention{}, 10 * 24 * time.Hour}, {"default", def, 3 * time.Hour}} {
		t.Run(tc.name, func(t *testing.T) {
			onEachRedis(t, func(t *testing.T, cfg config) { testDeleteMatchesRecomputation(t, cfg, tc.h, tc.clock) })
		})
	}
}

func testDeleteMatchesRecomputation(t *testing.T, cfg config, h retention, at time.Duration) {
	cfg.Retention = h
	clock := newFakeClock(testEpoch.Add(at))
	mem, ra, rb := comparedStores(t, cfg, clock)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(5, 6))
	span := int64(3600)
	types := []string{"cpu", "mem", "disk"}
	hosts, regions := []string{"", "a", "b", "c", "d"}, []string{"", "x", "y"}
	raw := map[string][]labelledRaw{}
	ingest := func(n int) {
		for i := range n {
			var in []sample
			for range 1 + rng.IntN(6) {
				typ := types[rng.IntN(len(types))]
				r := labelledRaw{labels: map[string]string{}}
				var ls []label
				if h := hosts[rng.IntN(len(hosts))]; h != "" {
					ls, r.labels["host"] = append(ls, label{"host", h}), h
				}
				if g := regions[rng.IntN(len(regions))]; g != "" {
					ls, r.labels["region"] = append(ls, label{"region", g}), g
				}
				r.at = testEpoch.Add(time.Duration(rng.Int64N(span))*time.Second).UnixMicro() + rng.Int64N(1_000_000)
				r.value = float64(rng.IntN(4001)-2000) / 10
				in = append(in, sample{typ: typ, series: seriesID(ls), at: r.at, value: r.value})
				raw[typ] = append(raw[typ], r)
			}
			addSamples(t, mem.store, cfg.Retention, in, clock.now())
			addSamples(t, []backend{ra, rb}[i%2].store, cfg.Retention, in, clock.now())
		}
	}
	compare := func(step string) {
		t.Helper()
		windows := []window{allTime}
		if h == (retention{}) {
			windows = groupWindows(rng, span)[:60]
		}
		for _, typ := range types {
			filters := [][]label{nil}
			for _, h := range hosts[1:] {
				filters = append(filters, []label{{"host", h}})
			}
			for _, r := range regions[1:] {
				filters = append(filters, []label{{"region", r}})
			}
			for _, match := range filters {
				var kept []rawSample
				for _, r := range raw[typ] {
					if r.holds(match) {
						kept = append(kept, r.rawSample)
					}
				}
				for _, w := range windows {
					from, to := w.bounds()
					checkStoresAgree(t, fmt.Sprintf("%s: %s %v", step, typ, match), mem, rb, typ, from, to, labelFilter{match: match}, kept)
				}
			}
			mm, _ := mem.store.meta(ctx, typ)
			rm, _ := rb.store.meta(ctx, typ)
			if mm.version != rm.version || mm.first != rm.first || mm.newest != rm.newest {
				t.Fatalf("%s: %s meta: memory %+v, redis %+v", step, typ, mm, rm)
			}
		}
		mt, err := mem.store.types(ctx, clock.now())
		if err != nil {
			t.Fatal(err)
		}
		rt, err := ra.store.types(ctx, clock.now())
		if err != nil {
			t.Fatal(err)
		}
		describe := func(ms []typeMeta) string {
			var out []string
			for _, m := range ms {
				c := int64(0)
				if h.forever() {
					c = m.total.count
				}
				out = append(out, fmt.Sprintf("%s v%d n%d s%d", m.name, m.version, c, m.series))
			}
			return strings.Join(out, ", ")
		}
		if describe(mt) != describe(rt) {
			t.Fatalf("%s: types: memory %s, redis %s", step, describe(mt), describe(rt))
		}
	}

	ingest(300)
	compare("after the ingests")
	deletes := []struct {
		typ   string
		match []label
	}{
		{"cpu", []label{{"host", "a"}}},
		{"cpu", []label{{"region", "x"}}},
		{"mem", []label{{"host", "b"}, {"region", "y"}}},
		{"cpu", []label{{"host", "zz"}}},
		{"disk", nil},
		{"mem", []label{{"host", "c"}}},
		{"cpu", nil},
	}
	for i, d := range deletes {
		if i == 5 {
			ingest(100) // disk made again, the others grown
			compare("after more ingests")
		}
		step := fmt.Sprintf("delete %d (%s %v)", i, d.typ, d.match)
		n, err := mem.store.remove(ctx, d.typ, d.match, clock.now())
		if err != nil {
			t.Fatal(err)
		}
		rs := []backend{ra, rb}[i%2].store.(*redisStore)
		rn, err := rs.remove(ctx, d.typ, d.match, clock.now())
		if err != nil {
			t.Fatalf("%s: redis: %v", step, err)
		}
		// Reclaimed to the end, however long the machine takes:
		// until then sums agree to rounding only.
		if _, err := rs.reclaimType(ctx, d.typ); err != nil {
			t.Fatalf("%s: reclaim: %v", step, err)
		}
		if n != rn {
			t.Fatalf("%s: memory deleted %d series, redis %d", step, n, rn)
		}
		if want := i != 3; (n > 0) != want {
			t.Fatalf("%s: %d series deleted", step, n)
		}
		raw[d.typ] = slices.DeleteFunc(raw[d.typ], func(r labelledRaw) bool { return r.holds(d.match) })
		compare(step)
	}
}

// TestRedisDeleteRedisDown: with Redis gone a delete is 503 with
// Retry-After, within the time bound.
func TestRedisDeleteRedisDown(t *testing.T) {
	srv := startRedis(t)
	cfg := testConfig(t)
	cfg.RedisAddr, cfg.AuthTokens = srv.addr, []string{deleteToken}
	cfg.RedisTimeout, cfg.LimiterTimeout = 300*time.Millisecond, 100*time.Millisecond
	prefix := testPrefix()
	b := newRedisBackend(testPool(t, cfg, prefix), prefix, cfg, time.Now)
	base := serve(t, cfg, b)
	if r := sendWith(t, "POST", base+"/api/metrics", metricBody("cpu", sampleTime, 1), "Authorization", "Bearer "+deleteToken); r.status != 201 {
		t.Fatalf("post: %d %s", r.status, r.body)
	}
	srv.kill()
	start := time.Now()
	r := deleteWith(t, base, "metric_type=cpu", deleteToken)
	if r.status != 503 || r.header.Get("Retry-After") == "" || time.Since(start) > 2*time.Second {
		t.Fatalf("delete with Redis gone: %d %v %s after %v, want 503 with Retry-After within 2 s", r.status, r.header, r.body, time.Since(start))
	}
}

// TestRedisDeleteReclaimsInSteps deletes series of a type with many
// buckets, and then the whole of another, and reclaims their keys a few
// at a time: after every step each window of the type and of each label
// agrees with a recomputation, reads of the whole type going to its
// series while its type-wide buckets are added up again; an ingest into
// a series or type still being reclaimed is refused with 503 and stores
// nothing, one into a remaining series is stored; once reclaimed, the
// stores agree to the bit, and no key of the deleted series is left.
func TestRedisDeleteReclaimsInSteps(t *testing.T) {
	cfg := testConfig(t)
	cfg.Retention = retention{res1s: 3600, res1m: 7 * 86400, res1h: 90 * 86400}
	clock := newFakeClock(testEpoch.Add(time.Hour))
	mem, ra, rb := comparedStores(t, cfg, clock)
	ctx := context.Background()
	rs := ra.store.(*redisStore)
	rs.stepBudget, rs.reclaimWait = 40, 0
	var raw []labelledRaw
	var in []sample
	for i := range 600 {
		host := []string{"a", "b", "c"}[i%3]
		at := testEpoch.Add(time.Duration(i*5)*time.Second).UnixMicro() + int64(i)
		v := float64(i%97) / 10
		in = append(in, sample{typ: "cpu", series: seriesID([]label{{"host", host}}), at: at, value: v}, sample{typ: "mem", at: at, value: v})
		raw = append(raw, labelledRaw{labels: map[string]string{"host": host}, rawSample: rawSample{at, v}})
	}
	addSamples(t, mem.store, cfg.Retention, in, clock.now())
	addSamples(t, rb.store, cfg.Retention, in, clock.now())
	check := func(step string, exact bool) {
		t.Helper()
		if n := count(t, rb, "mem"); n != 0 {
			t.Fatalf("%s: the deleted type mem holds %d samples", step, n)
		}
		for _, match := range [][]label{nil, {{"host", "a"}}, {{"host", "b"}}, {{"host", "c"}}} {
			var kept []rawSample
			for _, r := range raw {
				if r.holds(match) {
					kept = append(kept, r.rawSample)
				}
			}
			name := fmt.Sprintf("%s: cpu %v", step, match)
			f := labelFilter{match: match}
			if exact {
				checkStoresAgree(t, name, mem, rb, "cpu", nil, nil, f, kept)
				continue
			}
			g, _, err := rb.reader.window(ctx, "cpu", nil, nil, f)
			if err != nil {
				t.Fatal(err)
			}
			got := onlyGroup(g)
			st, _ := bruteForce(kept, nil, nil)
			if math.Abs(got.Sum-st.sum) > 1e-9*float64(st.count)*100 {
				t.Fatalf("%s: sum %v, want %v", name, got.Sum, st.sum)
			}
			got.Sum = st.sum
			checkAgainstBruteForce(t, name, got, kept, nil, nil)
		}
	}
	for _, d := range [][]label{{{"host", "a"}}} {
		if _, err := mem.store.remove(ctx, "cpu", d, clock.now()); err != nil {
			t.Fatal(err)
		}
		n, err := rs.remove(ctx, "cpu", d, clock.now())
		if err != nil || n != 1 {
			t.Fatalf("remove: %d %v", n, err)
		}
		raw = slices.DeleteFunc(raw, func(r labelledRaw) bool { return r.holds(d) })
	}
	if _, err := rs.remove(ctx, "mem", nil, clock.now()); err != nil {
		t.Fatal(err)
	}
	if _, err := mem.store.remove(ctx, "mem", nil, clock.now()); err != nil {
		t.Fatal(err)
	}
	base := serve(t, cfg, rb)
	// One step of typ at a time, its series read before each.
	step := func(typ string) (bool, error) {
		hashes, err := rs.seriesHashes(ctx, typ)
		if err != nil {
			return false, err
		}
		return rs.reclaimStep(ctx, typ, hashes)
	}
	steps := 0
	for cpuDone, memDone := false, false; !cpuDone || !memDone; steps++ {
		check(fmt.Sprintf("step %d", steps), false)
		if steps == 2 {
			for _, body := range []string{hostBody("cpu", "a", testEpoch.Add(20*time.Second), 1), metricBody("mem", testEpoch.Add(20*time.Second), 1)} {
				if r := post(t, base, body); r.status != 503 || r.header.Get("Retry-After") == "" || !strings.Contains(r.body, "being deleted") {
					t.Fatalf("post %s while reclaiming: %d %s, want 503", body, r.status, r.body)
				}
			}
			at := testEpoch.Add(10 * time.Second)
			if r := post(t, base, hostBody("cpu", "b", at, 4.5)); r.status != 201 {
				t.Fatalf("post into a remaining series while reclaiming: %d %s", r.status, r.body)
			}
			addSamples(t, mem.store, cfg.Retention, []sample{{typ: "cpu", series: seriesID([]label{{"host", "b"}}), at: at.UnixMicro(), value: 4.5}}, clock.now())
			raw = append(raw, labelledRaw{labels: map[string]string{"host": "b"}, rawSample: rawSample{at.UnixMicro(), 4.5}})
		}
		var err error
		if !cpuDone {
			if cpuDone, err = step("cpu"); err != nil {
				t.Fatal(err)
			}
		}
		if !memDone {
			if memDone, err = step("mem"); err != nil {
				t.Fatal(err)
			}
		}
		if steps > 10000 {
			t.Fatal("reclaiming does not end")
		}
	}
	if steps < 10 {
		t.Fatalf("reclaimed in %d steps of 40 keys: the steps are not bounded", steps)
	}
	check("reclaimed", true)
	c := rs.pool.Get()
	defer c.Close()
	left, err := redis.Strings(c.Do("KEYS", rs.keys.tag("cpu")+"s:"+seriesHash(seriesID([]label{{"host", "a"}}))+"*"))
	if err != nil || len(left) > 0 {
		t.Fatalf("keys of the deleted series left: %v %v", left, err)
	}
	left, err = redis.Strings(c.Do("KEYS", rs.keys.tag("mem")+"*"))
	if err != nil || len(left) != 1 || left[0] != rs.keys.meta("mem") {
		t.Fatalf("keys of the deleted type left: %v %v, want its meta alone", left, err)
	}
	if r := post(t, base, metricBody("mem", testEpoch.Add(20*time.Second), 2)); r.status != 201 {
		t.Fatalf("mem made again once reclaimed: %d %s", r.status, r.body)
	}
	if r := post(t, base, hostBody("cpu", "a", testEpoch.Add(20*time.Second), 3)); r.status != 201 {
		t.Fatalf("host a made again once reclaimed: %d %s", r.status, r.body)
	}
}

// TestRedisCompactionAfterDelete: a background merge that read a bucket
// before its type was deleted and written again changes nothing, though
// the new bucket's merge count is the one it read.
func TestRedisCompactionAfterDelete(t *testing.T) {
	e := redisStoreEnv(t, nil)
	rs := e.b.store.(*redisStore)
	for range 5 {
		if err := storeAdd(e.b, sample{typ: "cpu", at: sampleTime.UnixMicro(), value: 1000}); err != nil {
			t.Fatal(err)
		}
	}
	key := rs.keys.bucket("cpu", res1s, sampleTime.Unix())
	c := rs.pool.Get()
	defer c.Close()
	old, err := redis.Bytes(c.Do("GET", key))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rs.remove(t.Context(), "cpu", nil, e.clock.now()); err != nil {
		t.Fatal(err)
	}
	if err := storeAdd(e.b, sample{typ: "cpu", at: sampleTime.UnixMicro(), value: 1}); err != nil {
		t.Fatal(err)
	}
	if err := compactBucket(c, time.Now().Add(time.Second), key, old); err != nil {
		t.Fatal(err)
	}
	got, err := redis.Bytes(c.Do("GET", key))
	if err != nil {
		t.Fatal(err)
	}
	if b, err := parseBucket(got); err != nil || b.count != 1 || b.sum != 1 {
		t.Fatalf("the bucket after a stale merge: %+v %v, want the one new sample", b, err)
	}
}

// TestRedisReclaimLeavesSweptBucketsAlone: where retention has already
// removed a type-wide bucket but not yet an idle deleted series' own,
// reclaiming does not write the type-wide bucket again, so nothing is
// left for a later delete to miss, or for the type written again to
// find.
func TestRedisReclaimLeavesSweptBucketsAlone(t *testing.T) {
	e := redisStoreEnv(t, func(c *config) { c.Retention = retention{res1s: 3600, res1m: 7 * 86400, res1h: 90 * 86400} })
	rs := e.b.store.(*redisStore)
	ctx := context.Background()
	at := e.clock.now().Add(-10 * time.Second).Truncate(time.Second)
	for _, h := range []string{"a", "b"} {
		if err := storeAdd(e.b, sample{typ: "cpu", series: seriesID([]label{{"host", h}}), at: at.UnixMicro(), value: 1}); err != nil {
			t.Fatal(err)
		}
	}
	// The type's seconds at at are swept by the next ingest's anchor; the
	// idle series a and b keep theirs until they are written again.
	e.clock.advance(3 * time.Hour)
	if err := storeAdd(e.b, sample{typ: "cpu", series: seriesID([]label{{"host", "c"}}), at: e.clock.now().UnixMicro(), value: 1}); err != nil {
		t.Fatal(err)
	}
	reclaimAll := func() {
		t.Helper()
		if _, err := rs.reclaimType(ctx, "cpu"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := rs.remove(ctx, "cpu", []label{{"host", "a"}}, e.clock.now()); err != nil {
		t.Fatal(err)
	}
	reclaimAll()
	c := rs.pool.Get()
	defer c.Close()
	if n, err := redis.Int(c.Do("EXISTS", rs.keys.bucket("cpu", res1s, at.Unix()))); err != nil || n != 0 {
		t.Fatalf("the swept type-wide second written again: exists %d %v", n, err)
	}
	if _, err := rs.remove(ctx, "cpu", nil, e.clock.now()); err != nil {
		t.Fatal(err)
	}
	reclaimAll()
	if left, err := redis.Strings(c.Do("KEYS", rs.keys.tag("cpu")+"*")); err != nil || len(left) != 1 {
		t.Fatalf("keys of the deleted type left: %v %v, want its meta alone", left, err)
	}
	if err := storeAdd(e.b, sample{typ: "cpu", at: at.UnixMicro(), value: 5}); err != nil {
		t.Fatal(err)
	}
	from, to := at.Unix(), at.Unix()+1
	g, _, err := e.b.reader.window(ctx, "cpu", &from, &to, labelFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if v := onlyGroup(g); v.Count != 1 || v.Sum != 5 {
		t.Fatalf("the type written again, at %s: count %d sum %v, want 1 and 5", at.Format(time.RFC3339), v.Count, v.Sum)
	}
}

// listHookStore runs then after it lists a type's series, once.
type listHookStore struct {
	metricStore
	then func()
}

func (h *listHookStore) series(ctx context.Context, typ string, match []label) (uint64, []string, error) {
	v, ids, err := h.metricStore.series(ctx, typ, match)
	if h.then != nil {
		h.then()
		h.then = nil
	}
	return v, ids, err
}

// TestRedisReadWhileReclaimingCachesAsListed: a read of a whole type whose
// type-wide buckets are being added up again reads the series it listed;
// when a delete lands between the list and the read, the answer is cached
// as of the list, so it is not served after the delete.
func TestRedisReadWhileReclaimingCachesAsListed(t *testing.T) {
	e := redisStoreEnv(t, nil)
	rs := e.b.store.(*redisStore)
	rs.reclaimWait = 0 // the type-wide buckets stay to be added up again
	for i, h := range []string{"a", "b", "c"} {
		if err := storeAdd(e.b, sample{typ: "cpu", series: seriesID([]label{{"host", h}}), at: sampleTime.UnixMicro(), value: float64(1 + 10*i)}); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	if _, err := rs.remove(ctx, "cpu", []label{{"host", "a"}}, e.clock.now()); err != nil {
		t.Fatal(err)
	}
	hooked := &listHookStore{metricStore: rs, then: func() {
		if _, err := rs.remove(ctx, "cpu", []label{{"host", "b"}}, e.clock.now()); err != nil {
			t.Error(err)
		}
	}}
	r := &reader{store: hooked, cache: newReadCache(e.b.reader.cache.entries), horizon: e.cfg.Retention, now: e.b.now}
	allTimeSummary(t, r) // lists b, which is deleted before it is read
	if got := allTimeSummary(t, e.b.reader); !strings.Contains(got, `"count":1,`) {
		t.Fatalf("summary after both deletes: %s, want host c alone", got)
	}
}

// TestRedisReclaimFindsUnindexedDays: days an earlier version wrote
// without an index (days are kept forever) are found by looking at every
// day of the type's span, and deleted.
func TestRedisReclaimFindsUnindexedDays(t *testing.T) {
	e := redisStoreEnv(t, nil)
	rs := e.b.store.(*redisStore)
	ctx := context.Background()
	a, b := seriesID([]label{{"host", "a"}}), seriesID([]label{{"host", "b"}})
	for d := range 3 {
		at := sampleTime.Add(-time.Duration(d) * 24 * time.Hour).UnixMicro()
		if err := storeAdd(e.b, sample{typ: "cpu", series: a, at: at, value: 1}, sample{typ: "cpu", series: b, at: at, value: 2}); err != nil {
			t.Fatal(err)
		}
	}
	c := rs.pool.Get()
	defer c.Close()
	unit := rs.keys.unit("cpu", a)
	if _, err := c.Do("DEL", indexKey(unit, res1d)); err != nil {
		t.Fatal(err)
	}
	if _, err := rs.remove(ctx, "cpu", []label{{"host", "a"}}, e.clock.now()); err != nil {
		t.Fatal(err)
	}
	if _, err := rs.reclaimType(ctx, "cpu"); err != nil {
		t.Fatal(err)
	}
	if left, err := redis.Strings(c.Do("KEYS", unit+"*")); err != nil || len(left) > 0 {
		t.Fatalf("keys of the deleted series left: %v %v", left, err)
	}
	if got := allTimeSummary(t, e.b.reader); !strings.Contains(got, `"count":3,"average":2,`) {
		t.Fatalf("summary after the delete: %s, want host b's 3 samples", got)
	}
}

// TestRedisReclaimReadsSeriesAgain: a step given series that are no longer
// the registry's changes nothing (CHANGED), and reclaiming that started
// from them reads them again and finishes.
func TestRedisReclaimReadsSeriesAgain(t *testing.T) {
	e := redisStoreEnv(t, nil)
	rs := e.b.store.(*redisStore)
	rs.reclaimWait = 0
	ctx := context.Background()
	for _, h := range []string{"a", "b"} {
		if err := storeAdd(e.b, sample{typ: "cpu", series: seriesID([]label{{"host", h}}), at: sampleTime.UnixMicro(), value: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := rs.remove(ctx, "cpu", []label{{"host", "a"}}, e.clock.now()); err != nil {
		t.Fatal(err)
	}
	stale, err := rs.seriesHashes(ctx, "cpu")
	if err != nil {
		t.Fatal(err)
	}
	if err := storeAdd(e.b, sample{typ: "cpu", series: seriesID([]label{{"host", "c"}}), at: sampleTime.UnixMicro(), value: 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := rs.reclaimStep(ctx, "cpu", stale); err == nil || !strings.HasPrefix(err.Error(), "CHANGED") {
		t.Fatalf("a step with the series as they were: %v, want CHANGED", err)
	}
	if done, err := rs.reclaimFrom(ctx, "cpu", stale); !done || err != nil {
		t.Fatalf("reclaiming: done %v, %v", done, err)
	}
	if got := allTimeSummary(t, e.b.reader); !strings.Contains(got, `"count":2,"average":1.5,`) {
		t.Fatalf("summary after reclaiming: %s, want hosts b and c", got)
	}
}

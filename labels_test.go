package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http/httptest"

	"github.com/gomodule/redigo/redis"
	"slices"
	"strings"
	"testing"
	"time"
)

// labelledRaw is a brute-force check's copy of a labelled sample.
type labelledRaw struct {
	labels map[string]string
	rawSample
}

// TestLabelsMatchBruteForce stores random samples over 200 series with
// three label names in the memory store and in Redis (through two
// instances, alternately), then checks random filters, group-bys, windows
// and series against a recomputation from the raw samples, and the stores
// against each other, to the bit.
func TestLabelsMatchBruteForce(t *testing.T) { onEachRedis(t, testLabelsMatchBruteForce) }

func testLabelsMatchBruteForce(t *testing.T, cfg config) {
	cfg.Retention = retention{}
	clock := newFakeClock(testEpoch.Add(10 * 24 * time.Hour))
	mem, redisA, redisB := comparedStores(t, cfg, clock)

	rng := rand.New(rand.NewPCG(11, 12))
	values := map[string][]string{
		"host":   {"web-1", "web-2", "web-3", "db-1", "db-2", "a,b", `q"x`, "x=y", "é", "z"},
		"region": {"eu", "us", "ap"},
		"svc":    {"api", "checkout", "auth", "search"},
	}
	names := slices.Sorted(maps.Keys(values))
	var sets []map[string]string
	seen := map[string]bool{}
	for len(sets) < 200 {
		set := map[string]string{}
		for _, n := range names {
			if rng.IntN(5) > 0 {
				set[n] = values[n][rng.IntN(len(values[n]))]
			}
		}
		if id := seriesID(labelsOf(set)); !seen[id] {
			seen[id] = true
			sets = append(sets, set)
		}
	}
	span := int64(2 * 86400)
	var raw []labelledRaw
	for i := 0; len(raw) < 6000; i++ {
		var batch []sample
		for range 1 + rng.IntN(60) {
			set := sets[rng.IntN(len(sets))]
			off := []int64{0, span / 2, span - 1}[rng.IntN(3)] + rng.Int64N(7200) - 3600
			at := testEpoch.Add(time.Duration(min(max(off, 0), span-1))*time.Second).UnixMicro() + rng.Int64N(1_000_000)
			v := float64(rng.IntN(4001)-2000) / 4
			batch = append(batch, sample{typ: "cpu", series: seriesID(labelsOf(set)), at: at, value: v})
			raw = append(raw, labelledRaw{set, rawSample{at, v}})
		}
		addSamples(t, mem.store, cfg.Retention, batch, clock.now())
		r := redisA
		if i%2 == 1 {
			r = redisB
		}
		addSamples(t, r.store, cfg.Retention, batch, clock.now())
	}
	ctx := context.Background()
	randomFilter := func() labelFilter {
		var pairs []string
		for range rng.IntN(3) {
			n := names[rng.IntN(len(names))]
			pairs = append(pairs, n+":"+values[n][rng.IntN(len(values[n]))])
		}
		var group []string
		if rng.IntN(2) == 0 {
			group = []string{names[rng.IntN(len(names))]}
		}
		f, err := parseLabelFilter(pairs, group)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	// want groups the raw samples as the filter does: the series without
	// the group_by label first, then by value.
	want := func(f labelFilter) (keys []string, groups map[string][]rawSample) {
		groups = map[string][]rawSample{}
		for _, r := range raw {
			if !r.holds(f.match) {
				continue
			}
			key := ""
			if v, ok := r.labels[f.groupBy]; ok && f.groupBy != "" {
				key = "=" + v
			}
			groups[key] = append(groups[key], r.rawSample)
		}
		return slices.Sorted(maps.Keys(groups)), groups
	}
	for i := range 300 {
		f := randomFilter()
		f0 := testEpoch.Unix() - 600 + rng.Int64N(span+1200)
		e0 := f0 + rng.Int64N([]int64{61, 3601, 86401, span}[rng.IntN(4)])
		from, to := &f0, &e0
		if i%10 == 0 {
			from, to = nil, nil
		}
		m, _, err := mem.reader.window(ctx, "cpu", from, to, f)
		if err != nil {
			t.Fatal(err)
		}
		rd, _, err := redisA.reader.window(ctx, "cpu", from, to, f)
		if err != nil {
			t.Fatal(err)
		}
		keys, groups := want(f)
		if len(m) != len(keys) || len(rd) != len(keys) {
			t.Fatalf("filter %+v: %d groups in memory, %d in Redis, want %d", f, len(m), len(rd), len(keys))
		}
		for j, key := range keys {
			if got := groupKey(m[j].labels, f.groupBy); got != key {
				t.Fatalf("filter %+v: group %d is %q, want %q", f, j, got, key)
			}
			mv, rv := m[j].acc.values(), rd[j].acc.values()
			checkAgainstBruteForce(t, fmt.Sprintf("memory %+v group %q", f, key), mv, groups[key], from, to)
			if !sameValues(mv, rv) || groupKey(rd[j].labels, f.groupBy) != key {
				t.Fatalf("filter %+v group %q: memory %+v, Redis %+v", f, key, mv, rv)
			}
		}
		if i%3 != 0 {
			continue
		}
		step := []int64{60, 300, 3600, 86400}[rng.IntN(4)]
		p, err := planSeries(f0, e0, step)
		if err != nil {
			continue // a step the window does not allow
		}
		mp, _, err := mem.reader.seriesPoints(ctx, "cpu", p, f)
		if re := (*requestError)(nil); errors.As(err, &re) && strings.Contains(re.detail, "buckets, more than") {
			continue // too many buckets over these series
		}
		if err != nil {
			t.Fatal(err)
		}
		rp, _, err := redisA.reader.seriesPoints(ctx, "cpu", p, f)
		if err != nil {
			t.Fatal(err)
		}
		if len(mp) != len(keys) || len(rp) != len(keys) {
			t.Fatalf("series %+v: %d groups in memory, %d in Redis, want %d", f, len(mp), len(rp), len(keys))
		}
		for j, key := range keys {
			for k, pt := range mp[j].points {
				lo := p.from + int64(k)*p.step
				hi := lo + p.step
				checkAgainstBruteForce(t, fmt.Sprintf("series %+v group %q point %d", f, key, k), pt.aggregateValues, groups[key], &lo, &hi)
				if !sameValues(pt.aggregateValues, rp[j].points[k].aggregateValues) {
					t.Fatalf("series %+v group %q point %d: memory %+v, Redis %+v", f, key, k, pt, rp[j].points[k])
				}
			}
		}
	}
}

// labelsOf is a label set as a list.
func labelsOf(set map[string]string) []label {
	var out []label
	for _, n := range slices.Sorted(maps.Keys(set)) {
		out = append(out, label{n, set[n]})
	}
	return out
}

func groupKey(labels map[string]string, groupBy string) string {
	if v, ok := labels[groupBy]; ok {
		return "=" + v
	}
	return ""
}

// TestSeriesIDCanonical checks that a label set's id ignores the order the
// labels came in, reads back as the same set, and that label sets which
// differ, however their values are written, never share an id.
func TestSeriesIDCanonical(t *testing.T) {
	sets := [][]label{
		nil,
		{{"a", "b,c"}},
		{{"a", "b"}, {"c", "x"}},
		{{"a", `b",c="x`}},
		{{"a", `b\`}, {"c", "x"}},
		{{"a", `b\",c=\"x`}},
		{{"a", `\`}},
		{{"a", `\\`}},
		{{"a", `"`}},
		{{"a", "b"}},
		{{"a_", "b"}},
		{{"A", "b"}},
		{{"a", "b"}, {"b", "a"}},
		{{"a", "a"}, {"b", "b"}},
	}
	ids := map[string][]label{}
	for _, set := range sets {
		id := seriesID(set)
		if other, ok := ids[id]; ok {
			t.Fatalf("%v and %v share the id %q", set, other, id)
		}
		ids[id] = set
		back, err := parseSeriesID(id)
		if err != nil || !slices.Equal(back, labelsOf(mapOf(set))) {
			t.Fatalf("parseSeriesID(%q) = %v, %v; want %v", id, back, err, set)
		}
		reversed := slices.Clone(set)
		slices.Reverse(reversed)
		if seriesID(reversed) != id {
			t.Fatalf("seriesID of %v reversed = %q, want %q", set, seriesID(reversed), id)
		}
	}
}

func mapOf(labels []label) map[string]string {
	m := map[string]string{}
	for _, l := range labels {
		m[l.name] = l.value
	}
	return m
}

// TestLabelsOverHTTP posts labelled samples and reads them back as a user
// would: label order does not matter, filters and group_by answer, the
// labels and types endpoints list the series, and a POST to one series
// leaves no stale type-wide, filtered or grouped answer in the cache.
func TestLabelsOverHTTP(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		at := sampleTime.Format(time.RFC3339)
		labelled := func(v float64, labels string) string {
			return fmt.Sprintf(`{"timestamp":%q,"value":%g,"type":"cpu","labels":%s}`, at, v, labels)
		}
		for _, body := range []string{
			labelled(1, `{"host":"web-1","region":"eu"}`),
			labelled(2, `{"region":"eu","host":"web-1"}`), // the same series
			"[" + labelled(4, `{"host":"web-2","region":"eu"}`) + "," + labelled(8, `{"host":"db-1","region":"us"}`) + "]",
			metricBody("cpu", sampleTime, 16),
		} {
			if r := post(t, base, body); r.status != 201 {
				t.Fatalf("POST %s = %d %s", body, r.status, r.body)
			}
		}
		summary := base + "/api/metrics/summary?metric_type=cpu"
		for _, c := range []struct{ query, want string }{
			{"", `"count":5,"average":6.2,"sum":31`},
			{"&label=region:eu", `"count":3,"average":2.3333333333333335,"sum":7`},
			{"&label=region:eu&label=host:web-1", `"count":2,"average":1.5,"sum":3`},
			{"&label=region:ap", `"count":0,"average":0,"sum":0}`},
			{"&group_by=host", `{"type":"cpu","groups":[{"labels":{},"count":1,"average":16,"sum":16,`},
			{"&group_by=region&label=host:db-1", `{"type":"cpu","groups":[{"labels":{"region":"us"},"count":1,"average":8,"sum":8,`},
		} {
			if r := get(t, summary+c.query); r.status != 200 || !strings.Contains(r.body, c.want) {
				t.Errorf("GET summary%s = %d %s, want %s", c.query, r.status, r.body, c.want)
			}
		}
		grouped := get(t, summary+"&group_by=host").body
		for _, g := range []string{`{"labels":{"host":"db-1"},"count":1`, `{"labels":{"host":"web-1"},"count":2`, `{"labels":{"host":"web-2"},"count":1`} {
			if !strings.Contains(grouped, g) {
				t.Errorf("group_by=host = %s, want a group %s", grouped, g)
			}
		}
		if i, j := strings.Index(grouped, `"db-1"`), strings.Index(grouped, `"web-1"`); i < 0 || j < i {
			t.Errorf("group_by=host = %s, want groups ordered by value", grouped)
		}
		series := fmt.Sprintf("%s/api/metrics/series?metric_type=cpu&from=%s&to=%s&step=1m", base,
			sampleTime.Truncate(time.Minute).Format(time.RFC3339), sampleTime.Truncate(time.Minute).Add(time.Minute).Format(time.RFC3339))
		if r := get(t, series+"&group_by=region"); r.status != 200 || !strings.Contains(r.body, `"groups":[{"labels":{},"points":[{"time":`) ||
			!strings.Contains(r.body, `{"labels":{"region":"eu"},"points":[{"time":`) {
			t.Errorf("GET series group_by=region = %d %s", r.status, r.body)
		}
		if r := get(t, series+"&label=host:web-2"); r.status != 200 || !strings.Contains(r.body, `"count":1,"average":4,"sum":4`) {
			t.Errorf("GET series label=host:web-2 = %d %s", r.status, r.body)
		}
		if r := get(t, base+"/api/metrics/labels?metric_type=cpu"); r.body != `{"type":"cpu","labels":{"host":["db-1","web-1","web-2"],"region":["eu","us"]}}`+"\n" {
			t.Errorf("GET labels = %d %s", r.status, r.body)
		}
		if r := get(t, base+"/api/metrics/types"); !strings.Contains(r.body, `"series":4}`) {
			t.Errorf("GET types = %s, want 4 series of cpu", r.body)
		}

		// Every cached answer above must see a write to one series.
		cached := []string{summary, summary + "&label=region:eu", summary + "&group_by=host", series + "&group_by=region"}
		before := make([]string, len(cached))
		for i, u := range cached {
			before[i] = get(t, u).body
		}
		if r := post(t, base, labelled(32, `{"host":"web-2","region":"eu"}`)); r.status != 201 {
			t.Fatalf("POST = %d %s", r.status, r.body)
		}
		for i, u := range cached {
			if after := get(t, u).body; after == before[i] {
				t.Errorf("GET %s after a POST to host web-2 is unchanged: %s", strings.TrimPrefix(u, base), after)
			}
		}
	})
}

// TestLabelsRefused checks every bad label with a 422 naming it, and that
// nothing of a refused batch is stored.
func TestLabelsRefused(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		at := sampleTime.Format(time.RFC3339)
		for _, c := range []struct{ labels, want string }{
			{`"web-1"`, "labels must be an object"},
			{`[]`, "labels must be an object"},
			{`{"host":1}`, "label host: value must be a string"},
			{`{"host":null}`, "label host: value must be a string"},
			{`{"host":""}`, "label host: value must be 1 to 128 printable characters"},
			{`{"host":"` + strings.Repeat("x", 129) + `"}`, "label host: value must be 1 to 128"},
			{`{"host":"a\nb"}`, "label host: value must be 1 to 128 printable characters"},
			{"{\"host\":\"a\xffb\"}", "label host: value must be 1 to 128 printable characters of valid UTF-8"},
			{`{"host":"a\ud800b"}`, "label host: value must be 1 to 128 printable characters of valid UTF-8"},
			{`{"host":"a\ufffdb"}`, "label host: value must be 1 to 128 printable characters of valid UTF-8"},
			{`{"1host":"a"}`, `label name "1host" must match`},
			{`{"ho-st":"a"}`, `label name "ho-st" must match`},
			{`{"":"a"}`, `label name "" must match`},
			{`{"` + strings.Repeat("h", 65) + `":"a"}`, "at most 64 characters"},
			{`{"host":"a","host":"b"}`, "label host appears twice"},
			{`{"a":"1","b":"1","c":"1","d":"1","e":"1","f":"1","g":"1","h":"1","i":"1"}`, "labels: at most 8 per sample"},
		} {
			good := fmt.Sprintf(`{"timestamp":%q,"value":1,"type":"cpu","labels":{"host":"ok"}}`, at)
			bad := fmt.Sprintf(`{"timestamp":%q,"value":1,"type":"cpu","labels":%s}`, at, c.labels)
			r := post(t, base, "["+good+","+bad+"]")
			if d, _ := r.json(t)["detail"].(string); r.status != 422 || !strings.HasPrefix(d, "item 1: ") || !strings.Contains(d, c.want) {
				t.Errorf("labels %s: %d %s, want 422 naming item 1: %s", c.labels, r.status, r.body, c.want)
			}
		}
		if n := count(t, e.b, "cpu"); n != 0 {
			t.Errorf("count after refused batches = %d, want 0", n)
		}
		for _, q := range []string{"label=host", "label=1h:x", "label=host:", "label=host:%FF", "group_by=1x", "group_by=a-b", "group_by=", "group_by=a&group_by=b"} {
			r := get(t, base+"/api/metrics/summary?metric_type=cpu&"+q)
			if d, _ := r.json(t)["detail"].(string); r.status != 422 || !strings.Contains(d, strings.SplitN(q, "=", 2)[0]) {
				t.Errorf("summary?%s = %d %s, want 422 naming %s", q, r.status, r.body, strings.SplitN(q, "=", 2)[0])
			}
		}
	})
}

// TestMaxSeries fills a type's MAX_SERIES: a new series beyond it is 422
// naming the type and labels, counted, and stores nothing of its batch;
// the existing series keep being accepted.
func TestMaxSeries(t *testing.T) {
	forEachStore(t, func(c *config) { c.MaxSeries = 3 }, func(t *testing.T, e storeEnv) {
		tel := newTelemetry()
		h := httptest.NewServer(newHandler(discardLogger(), e.cfg, tel, e.b))
		t.Cleanup(h.Close)
		srv := h.URL
		body := func(host string) string {
			if host == "" {
				return metricBody("cpu", sampleTime, 1)
			}
			return hostBody("cpu", host, sampleTime, 1)
		}
		for _, h := range []string{"", "a", "b"} {
			if r := post(t, srv, body(h)); r.status != 201 {
				t.Fatalf("POST host %q = %d %s", h, r.status, r.body)
			}
		}
		r := post(t, srv, "["+body("a")+","+body("c")+"]")
		if d, _ := r.json(t)["detail"].(string); r.status != 422 || !strings.Contains(d, `item 1: labels {host="c"} make a new series of cpu`) ||
			!strings.Contains(d, "limit of 3 series") {
			t.Errorf("POST a 4th series = %d %s, want 422 naming item 1, its labels and the limit", r.status, r.body)
		}
		if n := count(t, e.b, "cpu"); n != 3 {
			t.Errorf("count after the refused batch = %d, want 3", n)
		}
		if got := tel.refusals["max_series"].Load(); got != 2 {
			t.Errorf("ingest_refused_total{reason=max_series} = %d, want 2 (the batch's samples)", got)
		}
		for _, h := range []string{"", "a", "b"} {
			if r := post(t, srv, body(h)); r.status != 201 {
				t.Errorf("POST existing series %q at MAX_SERIES = %d %s", h, r.status, r.body)
			}
		}
		if n := count(t, e.b, "cpu"); n != 6 {
			t.Errorf("count = %d, want 6", n)
		}
	})
}

// TestOneSeriesThenAnother checks a type that holds one series for a
// while (its buckets kept once in the memory store) and then a second:
// the type-wide answer, each series' and a grouped one stay exact on both
// stores, before and after, retention sweeps included.
func TestOneSeriesThenAnother(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		ctx := context.Background()
		a, b := seriesID([]label{{"host", "a"}}), seriesID([]label{{"host", "b"}})
		var raw []labelledRaw
		add := func(id, host string, n int, v float64) {
			var batch []sample
			for i := range n {
				at := sampleTime.Add(time.Duration(i) * 7 * time.Second)
				batch = append(batch, sample{typ: "cpu", series: id, at: at.UnixMicro(), value: v})
				raw = append(raw, labelledRaw{map[string]string{"host": host}, rawSample{at.UnixMicro(), v}})
			}
			if err := storeAdd(e.b, batch...); err != nil {
				t.Fatal(err)
			}
		}
		check := func(when string) {
			t.Helper()
			from, to := floorTo(sampleTime.Unix(), 3600), floorTo(sampleTime.Unix(), 3600)+3*3600
			for _, f := range []labelFilter{{}, {match: []label{{"host", "a"}}}, {match: []label{{"host", "b"}}}} {
				var want []rawSample
				for _, r := range raw {
					if len(f.match) == 0 || r.labels["host"] == f.match[0].value {
						want = append(want, r.rawSample)
					}
				}
				groups, _, err := e.b.reader.window(ctx, "cpu", &from, &to, f)
				if err != nil {
					t.Fatal(err)
				}
				checkAgainstBruteForce(t, fmt.Sprintf("%s, filter %+v", when, f), onlyGroup(groups), want, &from, &to)
			}
		}
		add(a, "a", 100, 1)
		add(a, "a", 100, 2)
		check("one series")
		add(b, "b", 50, 4)
		check("a second series")
		add(a, "a", 10, 8)
		add(b, "b", 10, 16)
		if e.b.sweep != nil {
			e.b.sweep(e.clock.now())
		}
		check("both growing")
	})
}

// TestSeriesRetention lets one series of a type run out of retained data
// while another carries on: the first stops counting towards MAX_SERIES
// at once, then goes from the series count, the labels, the index and (in
// Redis) its keys, and the type's other series keep every answer.
func TestSeriesRetention(t *testing.T) {
	forEachStore(t, func(c *config) {
		c.MaxSeries = 2
		c.Retention = retention{3600, 7200, 2 * 86400, 3 * 86400}
	}, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		post1 := func(host string, at time.Time, v float64) response {
			return post(t, base, hostBody("cpu", host, at, v))
		}
		t0 := e.clock.now().Add(-time.Hour)
		for _, h := range []string{"old", "new"} {
			if r := post1(h, t0, 1); r.status != 201 {
				t.Fatalf("POST %s = %d %s", h, r.status, r.body)
			}
		}
		if r := post1("third", t0, 1); r.status != 422 {
			t.Fatalf("POST a third series at MAX_SERIES=2 = %d %s, want 422", r.status, r.body)
		}
		// Five days on, neither holds data any more. The ingest that moves
		// the anchor there finds room for a new series (before anything has
		// dropped the old ones), and "new" carries on as a new series.
		e.clock.advance(5 * 24 * time.Hour)
		now := e.clock.now().Add(-time.Minute)
		if r := post1("third", now, 4); r.status != 201 {
			t.Fatalf("POST a third series once the others hold no data = %d %s, want 201", r.status, r.body)
		}
		if r := post1("new", now, 2); r.status != 201 {
			t.Fatalf("POST new = %d %s", r.status, r.body)
		}
		if e.b.sweep != nil {
			e.b.sweep(e.clock.now()) // what the memory store's background loop does
		}
		if r := get(t, base+"/api/metrics/labels?metric_type=cpu"); !strings.Contains(r.body, `"host":["new","third"]`) {
			t.Errorf("labels = %s, want host new and third only", r.body)
		}
		if r := get(t, base+"/api/metrics/types"); !strings.Contains(r.body, `"series":2}`) {
			t.Errorf("types = %s, want 2 series", r.body)
		}
		if r := get(t, base+"/api/metrics/summary?metric_type=cpu&label=host:old"); !strings.Contains(r.body, `"count":0,`) {
			t.Errorf("summary of host old = %s, want count 0", r.body)
		}
		if r := get(t, base+"/api/metrics/summary?metric_type=cpu&group_by=host"); !strings.Contains(r.body, `{"labels":{"host":"new"},"count":1,`) ||
			!strings.Contains(r.body, `{"labels":{"host":"third"},"count":1,`) || strings.Contains(r.body, `"old"`) {
			t.Errorf("summary by host = %s, want new and third with one sample each", r.body)
		}
		if r := post1("fourth", now, 8); r.status != 422 {
			t.Errorf("POST a fourth series = %d %s, want 422: two series hold data", r.status, r.body)
		}
		if e.pool != nil {
			c := e.pool.Get()
			defer c.Close()
			k := keys{e.prefix}
			left, err := redis.Strings(c.Do("KEYS", k.unit("cpu", seriesID([]label{{"host", "old"}}))+"*"))
			if err != nil || len(left) > 0 {
				t.Errorf("keys of the dropped series: %v, %v; want none", left, err)
			}
			if n, err := redis.Int(c.Do("EXISTS", k.labelIndex("cpu", label{"host", "old"}), k.labelIndex("cpu", label{"host", "third"}))); err != nil || n != 1 {
				t.Errorf("label sets of host old and third: %d exist (%v), want only third's", n, err)
			}
		}
	})
}

// TestSeriesBackWhileDropped: series that hold no data are dropped a few
// at a time as the anchor moves; one that an ingest brings back while it
// is among those about to be dropped keeps its place, its labels and its
// new sample.
func TestSeriesBackWhileDropped(t *testing.T) {
	forEachStore(t, func(c *config) {
		c.Retention = retention{60, 120, 7200, 2 * 86400}
	}, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		var hosts, back []string
		for i := range 10 {
			hosts = append(hosts, fmt.Sprintf("h%d", i))
			back = append(back, hostBody("cpu", hosts[i], e.clock.now().Add(4*24*time.Hour+time.Second), 1))
			if r := post(t, base, hostBody("cpu", hosts[i], e.clock.now(), 1)); r.status != 201 {
				t.Fatalf("POST %s = %d %s", hosts[i], r.status, r.body)
			}
		}
		// Four days on the ten hold no data; this ingest drops some.
		e.clock.advance(4 * 24 * time.Hour)
		if r := post(t, base, metricBody("cpu", e.clock.now(), 1)); r.status != 201 {
			t.Fatalf("POST = %d %s", r.status, r.body)
		}
		e.clock.advance(time.Second)
		if r := post(t, base, "["+strings.Join(back, ",")+"]"); r.status != 201 {
			t.Fatalf("POST the ten again = %d %s", r.status, r.body)
		}
		for _, h := range hosts {
			if r := get(t, base+"/api/metrics/summary?metric_type=cpu&label=host:"+h); !strings.Contains(r.body, `"count":1,`) {
				t.Errorf("summary of host %s, back = %s, want its one new sample", h, r.body)
			}
		}
		if r := get(t, base+"/api/metrics/labels?metric_type=cpu"); !strings.Contains(r.body, `"host":["`+strings.Join(hosts, `","`)+`"]`) {
			t.Errorf("labels = %s, want all ten hosts", r.body)
		}
	})
}

// TestMaxSeriesDefault fills the default MAX_SERIES of 1,000 in one batch:
// the 1,001st series is refused with the batch that brings it, and the
// first 1,000 keep being accepted.
func TestMaxSeriesDefault(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		if e.cfg.MaxSeries != 1000 {
			t.Fatalf("MAX_SERIES default = %d, want 1000", e.cfg.MaxSeries)
		}
		base := serve(t, e.cfg, e.b)
		item := func(h int) string {
			return hostBody("cpu", fmt.Sprintf("h%d", h), sampleTime, 1)
		}
		items := make([]string, 1000)
		for h := range items {
			items[h] = item(h)
		}
		if r := post(t, base, "["+strings.Join(items, ",")+"]"); r.status != 201 {
			t.Fatalf("POST 1,000 series = %d %s", r.status, r.body)
		}
		r := post(t, base, "["+item(5)+","+item(1000)+"]")
		if d, _ := r.json(t)["detail"].(string); r.status != 422 || !strings.Contains(d, `item 1: labels {host="h1000"}`) {
			t.Errorf("POST the 1,001st series = %d %s, want 422 naming item 1", r.status, r.body)
		}
		if n := count(t, e.b, "cpu"); n != 1000 {
			t.Errorf("count after the refused batch = %d, want 1000", n)
		}
		for _, h := range []int{0, 999} {
			if r := post(t, base, item(h)); r.status != 201 {
				t.Errorf("POST series h%d at MAX_SERIES = %d %s", h, r.status, r.body)
			}
		}
		if r := get(t, base+"/api/metrics/types"); !strings.Contains(r.body, `"series":1000}`) {
			t.Errorf("types = %s, want 1000 series", r.body)
		}
	})
}

// TestSeriesBackPastMaxSeries lets two series run out of data, fills
// their room with two new ones, then brings one of the old ones back:
// it takes room again, so it is refused, on both stores alike, whether
// or not retention has dropped it yet.
func TestSeriesBackPastMaxSeries(t *testing.T) {
	forEachStore(t, func(c *config) {
		c.MaxSeries = 2
		c.Retention = retention{3600, 7200, 2 * 86400, 3 * 86400}
	}, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		post1 := func(host string, at time.Time) response { return post(t, base, hostBody("cpu", host, at, 1)) }
		t0 := e.clock.now().Add(-time.Hour)
		for _, h := range []string{"a", "b"} {
			if r := post1(h, t0); r.status != 201 {
				t.Fatalf("POST %s = %d %s", h, r.status, r.body)
			}
		}
		e.clock.advance(5 * 24 * time.Hour)
		now := e.clock.now().Add(-time.Minute)
		if r := post(t, base, "["+strings.Join([]string{
			hostBody("cpu", "c", now, 1), hostBody("cpu", "d", now, 1),
		}, ",")+"]"); r.status != 201 {
			t.Fatalf("POST c and d = %d %s", r.status, r.body)
		}
		if r := post1("a", now); r.status != 422 || !strings.Contains(r.body, `labels {host=\"a\"}`) {
			t.Errorf("POST a, back with two series holding data at MAX_SERIES=2 = %d %s, want 422 naming it", r.status, r.body)
		}
	})
}

// TestManySeriesInOneBatch ingests more new series in one batch than Lua
// unpacks in one call. Its script call is large (240,000 arguments), which
// under the race detector takes longer to write than the default fence
// allows; the timeout is not what is tested here.
func TestManySeriesInOneBatch(t *testing.T) {
	forEachStore(t, func(c *config) { c.MaxSeries, c.RedisTimeout = 100_000, 10*time.Second }, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		items := make([]string, 8500)
		for h := range items {
			items[h] = hostBody("cpu", fmt.Sprintf("h%d", h), sampleTime, 1)
		}
		if r := post(t, base, "["+strings.Join(items, ",")+"]"); r.status != 201 {
			t.Fatalf("POST 8,500 new series = %d %s", r.status, r.body)
		}
		if n := count(t, e.b, "cpu"); n != 8500 {
			t.Errorf("count = %d, want 8500", n)
		}
	})
}

// TestTrimChecksItsKeysFirst plants a key of the wrong type where
// retention will drop a series: the ingest that would drop it must fail
// whole, storing nothing, rather than after its writes.
func TestTrimChecksItsKeysFirst(t *testing.T) {
	e := redisStoreEnv(t, func(c *config) { c.Retention = retention{3600, 7200, 2 * 86400, 3 * 86400} })
	base := serve(t, e.cfg, e.b)
	post1 := func(host string, at time.Time) response { return post(t, base, hostBody("cpu", host, at, 1)) }
	t0 := e.clock.now().Add(-time.Hour)
	for _, h := range []string{"old", "new"} {
		if r := post1(h, t0); r.status != 201 {
			t.Fatalf("POST %s = %d %s", h, r.status, r.body)
		}
	}
	c := e.pool.Get()
	defer c.Close()
	k := keys{e.prefix}
	for _, bad := range []string{k.labelIndex("cpu", label{"host", "old"}), indexKey(k.unit("cpu", seriesID([]label{{"host", "old"}})), res1s)} {
		if _, err := c.Do("SET", bad, "x"); err != nil {
			t.Fatal(err)
		}
		e.clock.advance(5 * 24 * time.Hour) // "old" holds no data from here on
		at := e.clock.now().Add(-time.Minute)
		if r := post1("new", at); r.status != 503 {
			t.Errorf("POST with %s of the wrong type = %d %s, want 503", bad, r.status, r.body)
		}
		if storedBucketExists(t, e, "cpu", res1s, at.Unix()) {
			t.Errorf("the failed ingest's 1 s bucket exists: it stored part of itself")
		}
		if _, err := c.Do("DEL", bad); err != nil {
			t.Fatal(err)
		}
	}
	if r := post1("new", e.clock.now().Add(-time.Minute)); r.status != 201 {
		t.Errorf("POST once the keys are sound = %d %s", r.status, r.body)
	}
}

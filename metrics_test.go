package main

import (
	"errors"
	"fmt"
	"github.com/gomodule/redigo/redis"
	"math"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestIngestRejections(t *testing.T) {
	long := strings.Repeat("a", 65)
	ok := metricBody("cpu", sampleTime, 1)
	forEachStore(t, func(c *config) {
		c.MaxBatch = 3
		c.MaxBodyBytes = 300
		c.MaxTypes = 3
	}, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		// Fill MAX_TYPES so that a fourth type is refused.
		for _, typ := range []string{"t1", "t2"} {
			if r := post(t, base, metricBody(typ, sampleTime, 1)); r.status != 201 {
				t.Fatalf("seeding %s: %d %s", typ, r.status, r.body)
			}
		}
		for _, tc := range []struct {
			name, contentType, body string
			status                  int
			mention                 string // the message must contain this
		}{
			{"not JSON", "application/json", `{"timestamp":`, 422, "JSON"},
			{"empty body", "application/json", ``, 422, "JSON"},
			{"trailing garbage", "application/json", ok + ` x`, 422, "JSON"},
			{"scalar", "application/json", `42`, 422, "object"},
			{"null", "application/json", `null`, 422, "object"},
			{"value as string", "", `{"timestamp":"2025-01-01T10:00:00","value":"75","type":"cpu"}`, 422, "value"},
			{"value missing", "", `{"timestamp":"2025-01-01T10:00:00","type":"cpu"}`, 422, "value"},
			{"value null", "", `{"timestamp":"2025-01-01T10:00:00","value":null,"type":"cpu"}`, 422, "value"},
			{"value overflows", "", `{"timestamp":"2025-01-01T10:00:00","value":1e400,"type":"cpu"}`, 422, "value"},
			{"value too large", "", `{"timestamp":"2025-01-01T10:00:00","value":1e301,"type":"cpu"}`, 422, "value"},
			{"value bool", "", `{"timestamp":"2025-01-01T10:00:00","value":true,"type":"cpu"}`, 422, "value"},
			{"timestamp missing", "", `{"value":1,"type":"cpu"}`, 422, "timestamp"},
			{"timestamp number", "", `{"timestamp":1700000000,"value":1,"type":"cpu"}`, 422, "timestamp"},
			{"timestamp invalid", "", `{"timestamp":"yesterday","value":1,"type":"cpu"}`, 422, "timestamp"},
			{"timestamp bad month", "", `{"timestamp":"2025-13-01T10:00:00","value":1,"type":"cpu"}`, 422, "timestamp"},
			{"timestamp date only", "", `{"timestamp":"2025-01-01","value":1,"type":"cpu"}`, 422, "timestamp"},
			{"timestamp far future", "", `{"timestamp":"9999-01-01T00:00:00Z","value":1,"type":"cpu"}`, 422, "timestamp"},
			{"type missing", "", `{"timestamp":"2025-01-01T10:00:00","value":1}`, 422, "type"},
			{"type empty", "", `{"timestamp":"2025-01-01T10:00:00","value":1,"type":""}`, 422, "type"},
			{"type too long", "", `{"timestamp":"2025-01-01T10:00:00","value":1,"type":"` + long + `"}`, 422, "type"},
			{"type with space", "", `{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu load"}`, 422, "type"},
			{"type with brace", "", `{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu}"}`, 422, "type"},
			{"type number", "", `{"timestamp":"2025-01-01T10:00:00","value":1,"type":7}`, 422, "type"},
			{"type beyond MAX_TYPES", "", "[" + metricBody("t1", sampleTime, 1) + "," + metricBody("t3", sampleTime, 1) + "," + ok + "]", 422, `item 2: type "cpu" is new`},
			{"empty batch", "", `[]`, 422, "empty"},
			{"batch over MAX_BATCH", "", `[` + ok + `,` + ok + `,` + ok + `,` + ok + `]`, 422, "limit"},
			{"bad item in batch", "", `[` + ok + `,` + ok + `,{"timestamp":"2025-01-01T10:00:00","value":"x","type":"cpu"}]`, 422, "item 2"},
			{"non-object in batch", "", `[` + ok + `,1]`, 422, "item 1"},
			{"body over MAX_BODY_BYTES", "", `{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu","pad":"` + strings.Repeat("x", 300) + `"}`, 413, "bytes"},
			{"wrong content type", "text/plain", ok, 415, "Content-Type"},
			{"form content type", "application/x-www-form-urlencoded", ok, 415, "Content-Type"},
		} {
			r := send(t, "POST", base+"/api/metrics", tc.contentType, tc.body)
			if r.status != tc.status {
				t.Errorf("%s: status %d %s, want %d", tc.name, r.status, r.body, tc.status)
				continue
			}
			if ct := r.header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("%s: Content-Type %q, want application/json", tc.name, ct)
			}
			if d, _ := r.json(t)["detail"].(string); !strings.Contains(d, tc.mention) {
				t.Errorf("%s: detail %q, want it to mention %q", tc.name, d, tc.mention)
			}
			for _, typ := range []string{"cpu", "t3"} {
				if n := count(t, e.b, typ); n != 0 {
					t.Fatalf("%s: %d %s samples stored by a rejected request, want 0", tc.name, n, typ)
				}
			}
		}
	})
}

func TestIngestAccepts(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		for _, tc := range []struct {
			name, contentType, body, want string
		}{
			{"spec example", "application/json", `{"timestamp":"2025-01-01T10:00:00","value":75,"type":"cpu"}`, `{"message":"Metric stored successfully"}`},
			{"no content type", "", `{"timestamp":"2025-01-01T10:00:00Z","value":-1.5,"type":"cpu"}`, `{"message":"Metric stored successfully"}`},
			{"charset", "application/json; charset=utf-8", `{"timestamp":"2025-01-01T12:00:00.123456+02:00","value":-0,"type":"cpu"}`, `{"message":"Metric stored successfully"}`},
			{"lowercase t and z", "", `{"timestamp":"2025-01-01t10:00:00z","value":-0.0,"type":"zero"}`, `{"message":"Metric stored successfully"}`},
			{"unknown fields", "", `{"timestamp":"2025-01-01T10:00:00","value":1e3,"type":"cpu","host":"a","tags":{"x":1}}`, `{"message":"Metric stored successfully"}`},
			{"batch", "", `[{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu"},{"timestamp":"2025-01-01T10:00:00","value":1,"type":"mem.used_MB-2"}]`, `{"message":"Metrics stored successfully","count":2}`},
		} {
			r := send(t, "POST", base+"/api/metrics", tc.contentType, tc.body)
			if r.status != 201 || strings.TrimSpace(r.body) != tc.want {
				t.Errorf("%s: %d %s, want 201 %s", tc.name, r.status, r.body, tc.want)
			}
		}
		for typ, want := range map[string]string{
			// Samples -1.5, 0 (sent as -0), 1e3, 1 and 75: the percentiles
			// are bin midpoints within 0.55%, clamped to [min, max].
			"cpu":  `{"type":"cpu","count":5,"average":214.9,"sum":1074.5,"min":-1.5,"max":1000,"p50":0.9945848405840975,"p90":996.6314888924637,"p95":996.6314888924637,"p99":996.6314888924637}`,
			"zero": `{"type":"zero","count":1,"average":0,"sum":0,"min":0,"max":0,"p50":0,"p90":0,"p95":0,"p99":0}`, // never "-0"
		} {
			if r := get(t, base+"/api/metrics/summary?metric_type="+typ); strings.TrimSpace(r.body) != want {
				t.Errorf("summary = %s, want %s", r.body, want)
			}
		}
	})
}

func TestSummaryRejections(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		for _, q := range []string{
			"",
			"?metric_type=",
			"?metric_type=cpu%20load",
			"?metric_type=" + strings.Repeat("x", 65),
			"?metric_type=cpu&from=yesterday",
			"?metric_type=cpu&to=2025-01-01",
			"?metric_type=cpu&from=2025-01-02T00:00:00Z&to=2025-01-01T00:00:00Z",
		} {
			r := get(t, base+"/api/metrics/summary"+q)
			if r.status != 422 || r.json(t)["detail"] == nil {
				t.Errorf("GET summary%s = %d %s, want 422 with a detail", q, r.status, r.body)
			}
		}
		r := get(t, base+"/api/metrics/summary?metric_type=never")
		if want := `{"type":"never","count":0,"average":0,"sum":0}`; r.status != 200 || strings.TrimSpace(r.body) != want {
			t.Errorf("summary of an unknown type = %d %s, want 200 %s", r.status, r.body, want)
		}
	})
}

func TestConcurrentWritersExact(t *testing.T) {
	forEachStore(t, func(c *config) { c.RateLimit = 1 << 30 }, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		const writers, posts = 8, 100
		var wg sync.WaitGroup
		errs := make(chan string, writers*posts)
		for w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range posts {
					at := sampleTime.Add(time.Duration(w)*time.Minute + time.Duration(i%60)*time.Second)
					r, err := tryPost(base, metricBody("cpu", at, float64(w*1000+i)))
					if err != nil {
						errs <- err.Error()
						continue
					}
					if r.status != 201 {
						errs <- fmt.Sprintf("status %d", r.status)
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for e := range errs {
			t.Fatal(e)
		}
		// sum of w*1000+i over w<8, i<100 = 100*1000*28 + 8*4950
		want := map[string]any{"type": "cpu", "count": 800.0, "sum": 2839600.0, "average": 3549.5, "min": 0.0, "max": 7099.0}
		got := get(t, base+"/api/metrics/summary?metric_type=cpu").json(t)
		for k, v := range want {
			if got[k] != v {
				t.Errorf("summary[%s] = %v, want %v", k, got[k], v)
			}
		}
	})
}

func TestBatchAllOrNothing(t *testing.T) {
	forEachStore(t, func(c *config) { c.MaxTypes = 2 }, func(t *testing.T, e storeEnv) {
		ok := func(typ string) sample { return sample{typ: typ, at: 1, value: 1} }
		if err := storeAdd(e.b, ok("a")); err != nil {
			t.Fatal(err)
		}
		// Two new types where only one more fits: nothing of it is stored.
		err := storeAdd(e.b, ok("a"), ok("b"), ok("c"), ok("a"))
		if tm := (*tooManyTypesError)(nil); !errors.As(err, &tm) || tm.typ != "b" {
			t.Fatalf("add over MAX_TYPES = %v, want a tooManyTypesError for b", err)
		}
		for typ, want := range map[string]int64{"a": 1, "b": 0, "c": 0} {
			if n := count(t, e.b, typ); n != want {
				t.Errorf("count(%s) = %d, want %d", typ, n, want)
			}
		}
		if err := storeAdd(e.b, ok("b"), ok("a"), ok("b")); err != nil {
			t.Fatalf("add within MAX_TYPES: %v", err)
		}
		for typ, want := range map[string]int64{"a": 2, "b": 2} {
			if n := count(t, e.b, typ); n != want {
				t.Errorf("count(%s) = %d, want %d", typ, n, want)
			}
		}
	})
}

// TestBatchAtomicForReaders checks that a reader never sees part of a batch.
func TestBatchAtomicForReaders(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		const batch, rounds = 50, 40
		done := make(chan struct{})
		go func() {
			defer close(done)
			for r := range rounds {
				b := make([]sample, batch)
				for i := range b {
					b[i] = sample{typ: "cpu", at: int64(r*batch + i), value: 1}
				}
				if err := storeAdd(e.b, b...); err != nil {
					t.Error(err)
					return
				}
			}
		}()
		for finished := false; !finished; {
			select {
			case <-done:
				finished = true
			default:
			}
			for _, w := range []window{allTime, {0, math.MaxInt64 - 1}} {
				v, _, err := summarize(e.b, "cpu", w)
				if err != nil {
					t.Fatal(err)
				}
				if v.Count%batch != 0 {
					t.Fatalf("summarize %v saw %d samples: part of a %d-sample batch", w, v.Count, batch)
				}
			}
		}
	})
}

func TestSummaryWindows(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		// Posted out of order on purpose: the store must not rely on arrival order.
		body := `[
			{"timestamp":"2025-01-01T10:00:02Z","value":3,"type":"cpu"},
			{"timestamp":"2025-01-01T10:00:00Z","value":1,"type":"cpu"},
			{"timestamp":"2025-01-01T10:00:01Z","value":2,"type":"cpu"},
			{"timestamp":"2025-01-01T12:00:00.5+02:00","value":10,"type":"cpu"},
			{"timestamp":"2025-01-01T10:00:03","value":4,"type":"cpu"}]`
		if r := post(t, base, body); r.status != 201 {
			t.Fatalf("post: %d %s", r.status, r.body)
		}
		for _, tc := range []struct {
			query string
			want  string
		}{
			{"", `"count":5,"average":4,"sum":20,"min":1,"max":10`},
			{"&from=2025-01-01T10:00:01Z", `"count":3,"average":3,"sum":9,"min":2,"max":4`},
			{"&to=2025-01-01T10:00:01Z", `"count":2,"average":5.5,"sum":11,"min":1,"max":10`},
			{"&from=2025-01-01T10:00:00Z&to=2025-01-01T10:00:01Z", `"count":2,"average":5.5,"sum":11,"min":1,"max":10`}, // 10:00:00.5 counts in its second
			{"&from=2025-01-01T10:00:01Z&to=2025-01-01T10:00:03Z", `"count":2,"average":2.5,"sum":5,"min":2,"max":3`},
			{"&from=2025-01-01T11:00:00%2B01:00&to=2025-01-01T10:00:01", `"count":2,"average":5.5,"sum":11,"min":1,"max":10`},
			// The same, its plus sent unescaped (a space once decoded).
			{"&from=2025-01-01T11:00:00+01:00&to=2025-01-01T10:00:01", `"count":2,"average":5.5,"sum":11,"min":1,"max":10`},
			{"&from=2025-01-01T10:00:01Z&to=2025-01-01T10:00:01Z", `"count":0,"average":0,"sum":0}`},
			{"&from=2030-01-01T00:00:00Z", `"count":0,"average":0,"sum":0}`},
		} {
			r := get(t, base+"/api/metrics/summary?metric_type=cpu"+tc.query)
			if want := `{"type":"cpu",` + tc.want; r.status != 200 || !strings.HasPrefix(r.body, want) {
				t.Errorf("summary%s = %d %s, want %s...", tc.query, r.status, r.body, want)
			}
		}
		// Windows are resolved to the second: a bound with a fraction is
		// refused, naming it.
		for _, q := range []string{"&to=2025-01-01T10:00:00.5Z", "&from=2025-01-01T10:00:00.000001Z"} {
			r := get(t, base+"/api/metrics/summary?metric_type=cpu"+q)
			if name := q[1:strings.IndexByte(q, '=')]; r.status != 422 || !strings.Contains(r.body, name+" must be a whole second") {
				t.Errorf("summary%s = %d %s, want 422 naming %s", q, r.status, r.body, name)
			}
		}
	})
}

// TestRedisSharedAcrossInstances: instances on one Redis share its data
// (the memory store belongs to one process).
func TestRedisSharedAcrossInstances(t *testing.T) {
	e := redisStoreEnv(t, nil)
	first := serve(t, e.cfg, e.b)
	second := serve(t, e.cfg, e.reopen())
	if r := post(t, first, metricBody("cpu", sampleTime, 7)); r.status != 201 {
		t.Fatal(r.status, r.body)
	}
	// The second instance caches the summary, then sees the first's next write.
	if r := get(t, second+"/api/metrics/summary?metric_type=cpu"); !strings.Contains(r.body, `"count":1,`) {
		t.Errorf("second instance: %s, want count 1", r.body)
	}
	if r := post(t, first, metricBody("cpu", sampleTime.Add(time.Second), 9)); r.status != 201 {
		t.Fatal(r.status, r.body)
	}
	if r := get(t, second+"/api/metrics/summary?metric_type=cpu"); !strings.Contains(r.body, `"count":2,"average":8,"sum":16,"min":7,"max":9`) {
		t.Errorf("second instance after another write to the first: %s, want count 2 sum 16", r.body)
	}
	// Data outlives the pool it was written through.
	e.pool.Close()
	third := serve(t, e.cfg, e.reopen())
	if r := get(t, third+"/api/metrics/summary?metric_type=cpu&from=2025-01-01T10:00:01"); !strings.Contains(r.body, `"count":1,"average":9`) {
		t.Errorf("reopened store: %s, want the second sample", r.body)
	}
}

func TestRedisTypeKeysShareHashTag(t *testing.T) {
	e := redisStoreEnv(t, nil)
	base := serve(t, e.cfg, e.b)
	post(t, base, metricBody("cpu", sampleTime, 7))
	get(t, base+"/api/metrics/summary?metric_type=cpu")
	c := e.pool.Get()
	defer c.Close()
	ks, err := redis.Strings(c.Do("KEYS", e.prefix+"{cpu}:*"))
	if err != nil {
		t.Fatal(err)
	}
	// The running total, a bucket at each of the four resolutions and the
	// index of each, once type-wide and once for the unlabelled series;
	// the type's meta hash (a series' own comes with its first sweep, at
	// its next ingest); and the registry of series with the anchors they
	// hold data until.
	if len(ks) != 2*(1+4+4)+1+2 {
		t.Errorf("keys of type cpu: %v, want 21", ks)
	}
	all, err := redis.Strings(c.Do("KEYS", e.prefix+"*"))
	if err != nil {
		t.Fatal(err)
	}
	// Everything else is the type registry, the limiter and the cache.
	for _, k := range all {
		rest := strings.TrimPrefix(k, e.prefix)
		if !strings.HasPrefix(rest, "{cpu}:") && rest != "types" && !strings.HasPrefix(rest, "rl:{") && !strings.HasPrefix(rest, "{cache}:") {
			t.Errorf("key %q is outside the layout of keys.go", k)
		}
	}
}

// TestStoreDown checks that a dead or hung Redis gives 503 JSON, quickly,
// and that the service starts without Redis and recovers when it comes.
func TestStoreDown(t *testing.T) {
	srv := startRedis(t)
	cfg := testConfig(t)
	cfg.RedisAddr = srv.addr
	prefix := testPrefix()
	b := newRedisBackend(testPool(t, cfg, prefix), prefix, cfg, time.Now)
	base := serve(t, cfg, b)
	sample := metricBody("cpu", sampleTime, 7)
	if r := post(t, base, sample); r.status != 201 {
		t.Fatalf("post with Redis up: %d %s", r.status, r.body)
	}

	srv.kill()
	expectUnavailable(t, base, sample)

	srv.restart(t)
	deadline := time.Now().Add(3 * time.Second)
	for {
		r := get(t, base+"/health")
		if r.status == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("health still %d 3s after Redis came back", r.status)
		}
		time.Sleep(20 * time.Millisecond) // polling interval
	}
	if r := post(t, base, sample); r.status != 201 {
		t.Errorf("post after Redis came back: %d %s", r.status, r.body)
	}
}

func TestStoreHung(t *testing.T) {
	cfg := testConfig(t)
	cfg.RedisAddr = hungRedis(t)
	cfg.RedisTimeout = 500 * time.Millisecond // the default
	pool := newRedisPool(cfg, nil)
	t.Cleanup(func() { pool.Close() })
	base := serve(t, cfg, newRedisBackend(pool, "", cfg, time.Now))
	expectUnavailable(t, base, metricBody("cpu", sampleTime, 7))
}

func expectUnavailable(t *testing.T, base, sample string) {
	t.Helper()
	for _, tc := range []struct {
		method, path, body string
		retryAfter         bool
	}{
		{"POST", "/api/metrics", sample, true},
		{"POST", "/api/metrics", "[" + sample + "," + sample + "]", true},
		{"GET", "/api/metrics/summary?metric_type=cpu", "", false},
		{"GET", "/api/metrics/summary?metric_type=cpu&from=2025-01-01T00:00:00", "", false},
		{"GET", "/health", "", false},
	} {
		start := time.Now()
		r := send(t, tc.method, base+tc.path, "application/json", tc.body)
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("%s %s took %v with Redis down, want under 2s", tc.method, tc.path, d)
		}
		if r.status != 503 || r.header.Get("Content-Type") != "application/json" || r.json(t)["detail"] == nil {
			t.Errorf("%s %s with Redis down = %d %q, want 503 JSON with a detail", tc.method, tc.path, r.status, r.body)
		}
		if tc.retryAfter && r.header.Get("Retry-After") == "" {
			t.Errorf("%s %s with Redis down: no Retry-After", tc.method, tc.path)
		}
		if tc.path == "/health" && r.body != `{"status":"unavailable","detail":"store unavailable"}`+"\n" {
			t.Errorf("GET /health with Redis down = %s, want status unavailable and no internals", r.body)
		}
	}
}

func TestFieldNamesAreExact(t *testing.T) {
	for _, tc := range []struct {
		body string
		want sample
		err  string
	}{
		{`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu","Value":"junk","TYPE":"evil"}`, sample{typ: "cpu", value: 1}, ""},
		{`{"timestamp":"2025-01-01T10:00:00","\u0076alue":3,"type":"cpu"}`, sample{typ: "cpu", value: 3}, ""}, // an escape, but exactly "value"
		{`{"timestamp":"2025-01-01T10:00:00","VALUE":1,"type":"cpu"}`, sample{}, "value is required"},
		{`{"timestamp":"2025-01-01T10:00:00","value":1,"tYpe":"cpu"}`, sample{}, "type is required"},
		{`{"timeſtamp":"2025-01-01T10:00:00","value":1,"type":"cpu"}`, sample{}, "timestamp is required"},
		{`{"timestamp":"2025-01-01T10:00:00","Value":1,"value":"x","type":"cpu"}`, sample{}, "value must be"},
	} {
		got, err := parseSample([]byte(tc.body))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("parseSample(%s) = %v, want an error with %q", tc.body, err, tc.err)
			}
			continue
		}
		tc.want.at = time.Date(2025, 1, 1, 10, 0, 0, 0, time.UTC).UnixMicro()
		if err != nil || got != tc.want {
			t.Errorf("parseSample(%s) = %+v, %v; want %+v", tc.body, got, err, tc.want)
		}
	}
}

func TestSeries(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		body := `[
			{"timestamp":"2025-01-01T10:00:05Z","value":1,"type":"cpu"},
			{"timestamp":"2025-01-01T10:00:59.9Z","value":3,"type":"cpu"},
			{"timestamp":"2025-01-01T10:02:00Z","value":8,"type":"cpu"}]`
		if r := post(t, base, body); r.status != 201 {
			t.Fatalf("post: %d %s", r.status, r.body)
		}
		// from rounds down and to up to the step; every step is present,
		// an empty one with count, average and sum 0 only.
		r := get(t, base+"/api/metrics/series?metric_type=cpu&from=2025-01-01T10:00:30Z&to=2025-01-01T10:02:01Z&step=1m")
		want := `{"type":"cpu","from":"2025-01-01T10:00:00Z","to":"2025-01-01T10:03:00Z","step":"1m","points":[` +
			`{"time":"2025-01-01T10:00:00Z","count":2,"average":2,"sum":4,"min":1,"max":3,"p50":1,"p90":3,"p95":3,"p99":3},` +
			`{"time":"2025-01-01T10:01:00Z","count":0,"average":0,"sum":0},` +
			`{"time":"2025-01-01T10:02:00Z","count":1,"average":8,"sum":8,"min":8,"max":8,"p50":8,"p90":8,"p95":8,"p99":8}]}` + "\n"
		if r.status != 200 || r.body != want {
			t.Errorf("series = %d %s\nwant %s", r.status, r.body, want)
		}
		// A step that 1m does not divide reads seconds, and says so.
		r = get(t, base+"/api/metrics/series?metric_type=cpu&from=2025-01-01T10:00:00Z&to=2025-01-01T10:01:30Z&step=45")
		if pts := r.json(t)["points"].([]any); r.status != 200 || len(pts) != 2 || pts[0].(map[string]any)["count"] != 1.0 || pts[1].(map[string]any)["count"] != 1.0 {
			t.Errorf("45 s steps = %d %s, want two points of one sample each", r.status, r.body)
		}
		// Relative bounds count back from the clock; the default is the last hour.
		e.clock.advance(sampleTime.Add(2*time.Minute + 30*time.Second).Sub(e.clock.now()))
		r = get(t, base+"/api/metrics/series?metric_type=cpu&from=-3m&step=1m")
		if got := r.json(t); r.status != 200 || got["from"] != "2025-01-01T09:59:00Z" || got["to"] != "2025-01-01T10:03:00Z" {
			t.Errorf("from=-3m at 10:02:30 = %d %s, want from 09:59 to 10:03", r.status, r.body)
		}
		r = get(t, base+"/api/metrics/series?metric_type=cpu")
		if got := r.json(t); r.status != 200 || got["from"] != "2025-01-01T09:02:00Z" || got["to"] != "2025-01-01T10:03:00Z" || len(got["points"].([]any)) != 61 {
			t.Errorf("default series at 10:02:30 = %d %.200s, want from 09:02:30 to 10:02:30, rounded out to 61 minutes", r.status, r.body)
		}
		if r := get(t, base+"/api/metrics/series?metric_type=cpu&from=-2562047h"); r.status != 422 {
			t.Errorf("series from 292 years ago = %d %s, want 422 at once", r.status, r.body)
		}
		for _, c := range []struct{ query, want string }{
			{"&step=0", "step must be"},
			{"&step=1.5", "step must be"},
			{"&step=2500ms", "step must be"},
			{"&from=2025-01-01T10:00:00.5Z", "from must be a whole second"},
			{"&from=2025-01-02T00:00:00Z&to=2025-01-01T00:00:00Z", "from must not be after to"},
			{"&from=2024-01-01T00:00:00Z&to=2025-01-01T00:00:00Z&step=1", "use a step of at least 1h"},
			{"&from=2025-01-01T00:00:00Z&to=2025-01-08T00:00:00Z&step=10s", "use a step of at least 1m"},
			{"&from=yesterday", "from "},
		} {
			r := get(t, base+"/api/metrics/series?metric_type=cpu"+c.query)
			if r.status != 422 || !strings.Contains(r.body, c.want) {
				t.Errorf("series%s = %d %s, want 422 saying %q", c.query, r.status, r.body, c.want)
			}
		}
	})
}

func TestTypes(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		if r := get(t, base+"/api/metrics/types"); r.status != 200 || r.body != `{"types":[]}`+"\n" {
			t.Errorf("types of an empty store = %d %s", r.status, r.body)
		}
		body := `[{"timestamp":"2025-01-01T10:00:05.5Z","value":1,"type":"mem"},
			{"timestamp":"2025-01-01T09:00:00Z","value":1,"type":"cpu"},
			{"timestamp":"2025-01-01T11:00:00Z","value":2,"type":"cpu"}]`
		if r := post(t, base, body); r.status != 201 {
			t.Fatalf("post: %d %s", r.status, r.body)
		}
		want := `{"types":[{"type":"cpu","count":2,"first":"2025-01-01T09:00:00Z","last":"2025-01-01T11:00:00Z","series":1},` +
			`{"type":"mem","count":1,"first":"2025-01-01T10:00:05Z","last":"2025-01-01T10:00:05Z","series":1}]}` + "\n"
		if r := get(t, base+"/api/metrics/types"); r.status != 200 || r.body != want {
			t.Errorf("types = %d %s, want %s", r.status, r.body, want)
		}
		if r := get(t, base+"/api/metrics/types?prefix=me"); !strings.Contains(r.body, `"mem"`) || strings.Contains(r.body, `"cpu"`) {
			t.Errorf("types?prefix=me = %s, want mem only", r.body)
		}
	})
}

func TestIngestRefusesByTime(t *testing.T) {
	forEachStore(t, func(c *config) { c.Retention = retention{60, 3600, 86400, 2 * 86400} }, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		now := e.clock.now()
		before := scrape(t, base)
		at := func(d time.Duration) string { return now.Add(d).Format(time.RFC3339) }
		for _, c := range []struct {
			body, want string
		}{
			{metricBody("cpu", now.Add(61*time.Minute), 1), "is more than 1h0m0s ahead of the server's clock"},
			{`[{"timestamp":"` + at(0) + `","value":1,"type":"cpu"},{"timestamp":"` + at(2*time.Hour) + `","value":1,"type":"cpu"}]`, "item 1: timestamp"},
		} {
			if r := post(t, base, c.body); r.status != 422 || !strings.Contains(r.body, c.want) {
				t.Errorf("post %s = %d %s, want 422 saying %q", c.body, r.status, r.body, c.want)
			}
		}
		// The first sample of a new type anchors it, however old ...
		if r := post(t, base, metricBody("cpu", now.Add(-30*24*time.Hour), 1)); r.status != 201 {
			t.Fatalf("an old first sample: %d %s", r.status, r.body)
		}
		// ... and a newer one moves the anchor: now that sample is older
		// than any resolution keeps.
		if r := post(t, base, metricBody("cpu", now, 1)); r.status != 201 {
			t.Fatalf("a current sample: %d %s", r.status, r.body)
		}
		r := post(t, base, `[{"timestamp":"`+at(0)+`","value":1,"type":"cpu"},{"timestamp":"`+at(-3*24*time.Hour)+`","value":1,"type":"cpu"}]`)
		if r.status != 422 || !strings.Contains(r.body, "item 1: timestamp") || !strings.Contains(r.body, "older than retention keeps") {
			t.Errorf("a batch with a sample past every horizon = %d %s, want 422 naming item 1's timestamp", r.status, r.body)
		}
		// The month-old sample aged out when the anchor moved to now; of
		// the refused batch nothing is stored.
		if n := count(t, e.b, "cpu"); n != 1 {
			t.Errorf("count after the refusals = %d, want 1", n)
		}
		after := scrape(t, base)
		for reason, want := range map[string]float64{"future": 3, "retention": 2} {
			series := `ingest_refused_total{reason="` + reason + `"}`
			if got := after[series] - before[series]; got != want {
				t.Errorf("%s moved by %v, want %v", series, got, want)
			}
		}
	})
}

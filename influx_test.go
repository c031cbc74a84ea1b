package main

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"
)

// lineNow is the clock of the line protocol tests, for lines without a
// timestamp.
var lineNow = time.Date(2025, 1, 1, 10, 0, 0, 0, time.UTC)

func TestLineProtocolParse(t *testing.T) {
	at := func(s string) int64 {
		v, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			t.Fatal(err)
		}
		return v.UnixMicro()
	}
	host := func(kv ...string) string {
		var ls []label
		for i := 0; i < len(kv); i += 2 {
			ls = append(ls, label{kv[i], kv[i+1]})
		}
		return seriesID(ls)
	}
	for _, c := range []struct {
		name, precision, body string
		want                  []sample
		lines                 []int
	}{
		{"value field", "", "cpu value=1 1735725600000000000", []sample{{typ: "cpu", at: at("2025-01-01T10:00:00Z"), value: 1}}, []int{1}},
		{"fields and tags", "", "cpu,host=a,region=eu usage=0.5,idle=99i,n=7u 1735725600123456789",
			[]sample{{"cpu.usage", host("host", "a", "region", "eu"), at("2025-01-01T10:00:00.123456Z"), 0.5},
				{"cpu.idle", host("host", "a", "region", "eu"), at("2025-01-01T10:00:00.123456Z"), 99},
				{"cpu.n", host("host", "a", "region", "eu"), at("2025-01-01T10:00:00.123456Z"), 7}}, []int{1, 1, 1}},
		{"escaped tag value", "s", `cpu,host=web\ 1\,eu\=x\\y value=2 1735725600`,
			[]sample{{"cpu", host("host", `web 1,eu=x\y`), at("2025-01-01T10:00:00Z"), 2}}, []int{1}},
		{"a backslash before anything else stays", "s", `cpu,host=a\b value=2 1735725600`,
			[]sample{{"cpu", host("host", `a\b`), at("2025-01-01T10:00:00Z"), 2}}, []int{1}},
		{"strings and booleans skipped", "s", `cpu msg="a \"quoted\", with, commas and spaces=",up=true,down=F,value=3 1735725600`,
			[]sample{{"cpu", "", at("2025-01-01T10:00:00Z"), 3}}, []int{1}},
		{"only strings", "s", `cpu msg="x" 1735725600`, nil, nil},
		{"no timestamp: now", "", "cpu value=-1.5e3", []sample{{typ: "cpu", at: lineNow.UnixMicro(), value: -1500}}, []int{1}},
		{"precision ms", "ms", "cpu value=1 1735725600001", []sample{{typ: "cpu", at: at("2025-01-01T10:00:00.001Z"), value: 1}}, []int{1}},
		{"precision us", "us", "cpu value=1 1735725600000001", []sample{{typ: "cpu", at: at("2025-01-01T10:00:00.000001Z"), value: 1}}, []int{1}},
		{"before 1970, ns rounds down", "ns", "cpu value=1 -1500", []sample{{typ: "cpu", at: -2, value: 1}}, []int{1}},
		{"comments, blank lines, CRLF, spaces", "s", "# a comment, with x=\"an open quote\n\n  cpu value=1 1735725600\r\n\t\nmem value=2 1735725600\n# end",
			[]sample{{typ: "cpu", at: at("2025-01-01T10:00:00Z"), value: 1}, {typ: "mem", at: at("2025-01-01T10:00:00Z"), value: 2}}, []int{3, 5}},
		{"a field named twice: the last", "s", "cpu value=1,value=2 1735725600", []sample{{typ: "cpu", at: at("2025-01-01T10:00:00Z"), value: 2}}, []int{1}},
		{"a newline inside a string", "s", "cpu msg=\"two\nlines \\\" and\nthree\",value=1 1735725600\nmem value=2 1735725600",
			[]sample{{typ: "cpu", at: at("2025-01-01T10:00:00Z"), value: 1}, {typ: "mem", at: at("2025-01-01T10:00:00Z"), value: 2}}, []int{1, 4}},
		{"v1 precision h", "h", "cpu value=1 482146", []sample{{typ: "cpu", at: at("2025-01-01T10:00:00Z"), value: 1}}, []int{1}},
		{"v1 precision m", "m", "cpu value=1 28928760", []sample{{typ: "cpu", at: at("2025-01-01T10:00:00Z"), value: 1}}, []int{1}},
		{"an equals sign in the measurement", "s", "cpu=x value=1 1735725600", nil, nil}, // refused below: not a type
	} {
		if c.name == "an equals sign in the measurement" {
			continue
		}
		got, err := parseLineProtocol([]byte(c.body), linePrecisions[c.precision], lineNow.UnixMicro(), 100)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if fmt.Sprint(got.samples) != fmt.Sprint(c.want) || fmt.Sprint(got.lines) != fmt.Sprint(c.lines) {
			t.Errorf("%s:\n got %v at lines %v\nwant %v at lines %v", c.name, got.samples, got.lines, c.want, c.lines)
		}
	}
	for _, c := range []struct{ body, want string }{
		{"cpu", "line 1: the field set is missing"},
		{"cpu =1", "line 1: a field must be key=value"},
		{"cpu value=1,", "line 1: a field must be key=value"},
		{"cpu value=", "line 1: field value: the value is missing"},
		{"cpu value=abc", `line 1: field value: "abc" is not a number`},
		{"cpu value=inf", `"inf" is not a number`},
		{"cpu value=NaN", `"NaN" is not a number`},
		{"cpu value=0x10", `"0x10" is not a number`},
		{"cpu value=1e999", `"1e999" is out of range`},
		{"cpu value=1.5i", `"1.5i" is not a 64-bit integer`},
		{"cpu value=-1u", `"-1u" is not a 64-bit unsigned integer`},
		{"cpu value=tru", `"tru" is not a number, string or boolean`},
		{`cpu value="open`, "a string has no closing quote"},
		{"cpu,host= value=1", `tag "host" has an empty value`},
		{"cpu,host value=1", `tag "host" has no value`},
		{"cpu,1host=a value=1", "label name"},
		{"cpu,host=a,host=b value=1", "tag host appears twice"},
		{",host=a value=1", "the measurement is missing"},
		{"cpu value=1 12x", `timestamp "12x" must be an integer`},
		{"cpu value=1 99999999999999", "from the year 1900"}, // in seconds, past 2200
		{`c\ pu value=1`, `measurement "c pu"`},
		{"cpu=x value=1", "type may contain only"},
		{"cpu value=1\nmem value=2\ndisk value=x\nnet value=4", "line 3: "},
	} {
		_, err := parseLineProtocol([]byte(c.body), linePrecisions["s"], lineNow.UnixMicro(), 100)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want one holding %q", c.body, err, c.want)
		}
	}
	if _, err := parseLineProtocol([]byte(strings.Repeat("cpu a=1,b=2\n", 6)), linePrecisions["s"], 0, 10); err == nil || !strings.Contains(err.Error(), "line 6: more than the limit of 10") {
		t.Errorf("12 samples at a limit of 10: %v", err)
	}
	// A megabyte line of distinct fields stops at the limit: its last
	// field, which is bad, is never read.
	var wide strings.Builder
	wide.WriteString("m ")
	for i := range 100_000 {
		fmt.Fprintf(&wide, "f%06d=1,", i)
	}
	wide.WriteString("bad=x")
	_, err := parseLineProtocol([]byte(wide.String()), 1, 0, 10_000)
	if err == nil || !strings.Contains(err.Error(), "line 1: more than the limit of 10000") {
		t.Errorf("100,000 fields at a limit of 10,000: %v", err)
	}
}

// influxPost sends a line protocol body to path.
func influxPost(t *testing.T, url, body string, header ...string) response {
	t.Helper()
	return sendWith(t, "POST", url, body, append([]string{"Content-Type", "text/plain; charset=utf-8"}, header...)...)
}

func TestLineProtocolWrite(t *testing.T) {
	forEachStore(t, func(c *config) { c.MaxTypes = 6 }, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		ts := sampleTime.Unix()
		body := fmt.Sprintf("cpu,host=a usage=10,idle=90i %d\ncpu,host=b usage=30 %d\n", ts, ts+1)
		for _, path := range []string{"/api/v2/write?org=o&bucket=b&precision=s", "/write?db=d&precision=s"} {
			if r := influxPost(t, base+path, body); r.status != 204 || r.body != "" {
				t.Fatalf("POST %s = %d %q, want 204 and no body", path, r.status, r.body)
			}
		}
		if r := get(t, base+"/api/metrics/summary?metric_type=cpu.usage"); !strings.Contains(r.body, `"count":4,"average":20,"sum":80,"min":10,"max":30`) {
			t.Errorf("cpu.usage = %s, want both lines twice", r.body)
		}
		if r := get(t, base+"/api/metrics/summary?metric_type=cpu.usage&label=host:b"); !strings.Contains(r.body, `"count":2,"average":30`) {
			t.Errorf("cpu.usage of host b = %s", r.body)
		}
		if r := get(t, base+"/api/metrics/summary?metric_type=cpu.idle"); !strings.Contains(r.body, `"count":2,"average":90`) {
			t.Errorf("cpu.idle = %s", r.body)
		}

		// A bad line stores nothing, not even the lines before it.
		r := influxPost(t, base+"/api/v2/write?precision=s", fmt.Sprintf("good value=1 %d\nbad value=x %d\n", ts, ts))
		if m := r.json(t); r.status != 400 || m["code"] != "invalid" || !strings.HasPrefix(fmt.Sprint(m["message"]), "line 2: ") {
			t.Errorf("a bad second line = %d %s, want 400 invalid naming line 2", r.status, r.body)
		}
		if n := count(t, e.b, "good"); n != 0 {
			t.Errorf("the line before a bad one was stored (%d)", n)
		}

		// gzip, as the clients send it.
		var zipped bytes.Buffer
		zw := gzip.NewWriter(&zipped)
		fmt.Fprintf(zw, "zipped value=5 %d\n", ts)
		zw.Close()
		for i, enc := range []string{"gzip", "GZip", "x-gzip"} {
			if r := influxPost(t, base+"/api/v2/write?precision=s", zipped.String(), "Content-Encoding", enc); r.status != 204 || count(t, e.b, "zipped") != int64(i+1) {
				t.Errorf("body with Content-Encoding %s = %d %s", enc, r.status, r.body)
			}
		}
		for _, c := range []struct {
			path, body, code string
			status           int
			header           []string
		}{
			{"/api/v2/write?precision=w", "x value=1", "invalid", 400, nil},
			{"/api/v2/write", "x value=1", "unsupported media type", 415, []string{"Content-Encoding", "br"}},
			{"/api/v2/write?precision=s", strings.Repeat(fmt.Sprintf("many value=1 %d\n", ts), e.cfg.MaxBatch+1), "unprocessable entity", 422, nil},
			{"/api/v2/write", "not gzip", "invalid", 400, []string{"Content-Encoding", "gzip"}},
			{"/api/v2/write", strings.Repeat("x", int(e.cfg.MaxBodyBytes)+1), "request too large", 413, nil},
			// MAX_TYPES is 6: cpu.usage, cpu.idle, zipped, then these three new ones and one more.
			{"/api/v2/write?precision=s", fmt.Sprintf("t1 value=1 %d\nt2 value=1 %d\nt3 value=1 %d\nt4 value=1 %d", ts, ts, ts, ts), "unprocessable entity", 422, nil},
		} {
			r := influxPost(t, base+c.path, c.body, c.header...)
			if m := r.json(t); r.status != c.status || m["code"] != c.code || m["message"] == "" {
				t.Errorf("POST %s (%.20q) = %d %s, want %d %q", c.path, c.body, r.status, r.body, c.status, c.code)
			}
		}
		if r := influxPost(t, base+"/api/v2/write?precision=s", fmt.Sprintf("t1 value=1 %d\nt2 value=1 %d\nt3 value=1 %d\nt4 value=1 %d", ts, ts, ts, ts)); !strings.Contains(r.body, `line 1: type \"t1\" is new`) {
			t.Errorf("the refusal names the line of the first new type: %s", r.body)
		}
	})
}

// TestLineProtocolLimitsAndFailures: the write endpoints share the rate
// limit of POST /api/metrics and answer its refusals, and a store that is
// down, in the InfluxDB form.
func TestLineProtocolLimitsAndFailures(t *testing.T) {
	cfg := testConfig(t)
	cfg.RateLimit = 2
	base := serve(t, cfg, newMemoryBackend(cfg, time.Now))
	influxPost(t, base+"/write", "a value=1")
	influxPost(t, base+"/api/v2/write", "a value=1")
	r := influxPost(t, base+"/api/v2/write", "a value=1")
	if m := r.json(t); r.status != 429 || m["code"] != "too many requests" || r.header.Get("Retry-After") == "" || r.header.Get("X-Ratelimit-Remaining") != "0" {
		t.Errorf("third write at RATE_LIMIT=2 = %d %s %v", r.status, r.body, r.header)
	}
	if r := post(t, base, metricBody("a", sampleTime, 1)); r.status != 429 {
		t.Errorf("POST /api/metrics after two line protocol writes at RATE_LIMIT=2 = %d, want 429: one limit", r.status)
	}

	needRedis(t)
	down := testConfig(t)
	down.RedisAddr = "127.0.0.1:1" // nothing listens
	pool := newRedisPool(down, nil)
	defer pool.Close()
	base = serve(t, down, newRedisBackend(pool, testPrefix(), down, time.Now))
	r = influxPost(t, base+"/api/v2/write", "a value=1")
	if m := r.json(t); r.status != 503 || m["code"] != "unavailable" {
		t.Errorf("write with Redis down = %d %s, want 503 unavailable", r.status, r.body)
	}
}

func FuzzParseLineProtocol(f *testing.F) {
	for _, s := range []string{
		"cpu value=1 1735725600000000000",
		"cpu,host=a,region=eu usage=0.5,idle=99i,n=7u 1735725600123456789",
		`cpu,host=web\ 1\,eu\=x\\y value=2`,
		`cpu msg="a \"q\", c",up=true,value=3 -1500`,
		"# c\n\n cpu value=1\r\nmem value=-1.5e3\n",
		"cpu value=1e999", "cpu,host= value=1", `c\ pu value=1`, "cpu value=",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		got, err := parseLineProtocol(body, 1, lineNow.UnixMicro(), 1000)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "line ") {
				t.Fatalf("error %q names no line", err)
			}
			return
		}
		if len(got.lines) != len(got.samples) {
			t.Fatalf("%d samples, %d line numbers", len(got.samples), len(got.lines))
		}
		for _, s := range got.samples {
			if validType(s.typ) != nil || math.IsNaN(s.value) || math.IsInf(s.value, 0) ||
				s.at < minTimestamp.UnixMicro() || s.at >= maxTimestamp.UnixMicro() {
				t.Fatalf("sample %+v from %q", s, body)
			}
			if _, err := parseSeriesID(s.series); err != nil {
				t.Fatalf("series %q of %q: %v", s.series, body, err)
			}
		}
	})
}

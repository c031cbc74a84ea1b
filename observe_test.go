package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// scrape reads /metrics into a map from series (name and labels, as
// written) to value.
func scrape(t *testing.T, base string) map[string]float64 {
	t.Helper()
	r := get(t, base+"/metrics")
	if r.status != 200 || !strings.HasPrefix(r.header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("GET /metrics = %d %s", r.status, r.header.Get("Content-Type"))
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(r.body))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad sample line %q", line)
		}
		out[line[:i]] = v
	}
	return out
}

func TestMetricsCountersMove(t *testing.T) {
	forEachStore(t, func(c *config) {
		c.RateLimit = 2
		c.ExternalFailureRate, c.ExternalLatency, c.BreakerThreshold = 1, 0, 1
	}, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		before := scrape(t, base)
		steps := []struct {
			method, path, body string
			status             int
		}{
			{"POST", "/api/metrics", "[" + metricBody("cpu", sampleTime, 1) + "," + metricBody("cpu", sampleTime, 2) + "]", 201},
			{"POST", "/api/metrics", `{"bad":`, 422},
			{"POST", "/api/metrics", metricBody("cpu", sampleTime, 1), 429},
			{"GET", "/api/metrics/summary?metric_type=cpu", "", 200}, // miss
			{"GET", "/api/metrics/summary?metric_type=cpu", "", 200}, // hit
			{"GET", "/external", "", 200},                            // fails: the breaker opens
			{"GET", "/no/such/path/42", "", 404},
		}
		for _, s := range steps {
			if r := send(t, s.method, base+s.path, "application/json", s.body); r.status != s.status {
				t.Fatalf("%s %s = %d %s, want %d", s.method, s.path, r.status, r.body, s.status)
			}
		}
		after := scrape(t, base)
		for series, want := range map[string]float64{
			`http_requests_total{route="POST /api/metrics",code="201"}`:                 1,
			`http_requests_total{route="POST /api/metrics",code="422"}`:                 1,
			`http_requests_total{route="POST /api/metrics",code="429"}`:                 1,
			`http_requests_total{route="GET /api/metrics/summary",code="200"}`:          2,
			`http_requests_total{route="unmatched",code="404"}`:                         1,
			`http_request_duration_seconds_count{route="POST /api/metrics"}`:            3,
			`http_request_duration_seconds_bucket{route="POST /api/metrics",le="+Inf"}`: 3,
			`metrics_ingested_total`:                             2,
			`summary_cache_hits_total`:                           1,
			`summary_cache_misses_total`:                         1,
			`ratelimit_rejected_total`:                           1,
			`ratelimit_store_errors_total`:                       0,
			`breaker_transitions_total{from="closed",to="open"}`: 1,
			`breaker_state{state="open"}`:                        1,
			`breaker_state{state="closed"}`:                      -1,
			`store_errors_total{op="ingest"}`:                    0,
		} {
			// A series missing from the scrape would read as 0 and seem
			// not to have moved.
			v, ok := after[series]
			if !ok {
				t.Errorf("%s is missing from /metrics", series)
				continue
			}
			if got := v - before[series]; got != want {
				t.Errorf("%s moved by %g, want %g", series, got, want)
			}
		}
		for series := range after {
			if strings.Contains(series, "/no/such") {
				t.Errorf("a raw path became a label value: %s", series)
			}
		}
	})
}

func TestMetricsStoreErrorsCounted(t *testing.T) {
	cfg := testConfig(t)
	cfg.RedisAddr = "127.0.0.1:1" // nothing listens there
	tel := newTelemetry()
	pool := newRedisPool(cfg, tel)
	t.Cleanup(func() { pool.Close() })
	srv := httptest.NewServer(newHandler(discardLogger(), cfg, tel, newRedisBackend(pool, "", cfg, time.Now)))
	t.Cleanup(srv.Close)
	post(t, srv.URL, metricBody("cpu", sampleTime, 1))
	get(t, srv.URL+"/api/metrics/summary?metric_type=cpu")
	get(t, srv.URL+"/health")
	m := scrape(t, srv.URL)
	for series, want := range map[string]float64{
		`store_errors_total{op="ingest"}`:    1,
		`store_errors_total{op="ratelimit"}`: 1,
		`store_errors_total{op="cache_get"}`: 1,
		`store_errors_total{op="ping"}`:      1,
		`ratelimit_store_errors_total`:       1,
	} {
		if m[series] != want {
			t.Errorf("%s = %g, want %g", series, m[series], want)
		}
	}
}

// TestMetricsPassPromtool checks the exposition with Prometheus's own
// validator. CI installs it and sets PROMTOOL; elsewhere the test looks on
// PATH and skips without it unless REQUIRE_PROMTOOL=1.
func TestMetricsPassPromtool(t *testing.T) {
	promtool := os.Getenv("PROMTOOL")
	if promtool == "" {
		var err error
		if promtool, err = exec.LookPath("promtool"); err != nil {
			if os.Getenv("REQUIRE_PROMTOOL") == "1" {
				t.Fatal("REQUIRE_PROMTOOL=1 and promtool is not on PATH and PROMTOOL is not set")
			}
			t.Skip("promtool not found (set PROMTOOL or put it on PATH)")
		}
	}
	cfg := testConfig(t)
	cfg.ExternalLatency, cfg.ExternalFailureRate, cfg.BreakerThreshold = 0, 1, 1
	base := serve(t, cfg, newMemoryBackend(cfg, time.Now))
	post(t, base, metricBody("cpu", sampleTime, 1))
	get(t, base+"/api/metrics/summary?metric_type=cpu")
	get(t, base+"/external")
	get(t, base+"/nope")
	body := get(t, base+"/metrics").body
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(body)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s\nexposition:\n%s", err, out, body)
	}
}

// syncBuffer is a log destination tests can read while a server writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// lines returns the JSON log lines written so far.
func (s *syncBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, l := range bytes.Split(bytes.TrimSpace(s.b.Bytes()), []byte("\n")) {
		var m map[string]any
		if err := json.Unmarshal(l, &m); err != nil {
			t.Fatalf("log line %q is not JSON: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

func TestAccessLog(t *testing.T) {
	cfg := testConfig(t)
	var logs syncBuffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	srv := httptest.NewServer(newHandler(log, cfg, newTelemetry(), newMemoryBackend(cfg, time.Now)))
	defer srv.Close()

	for _, tc := range []struct {
		sentID string
		echo   bool
	}{
		{"req-42.a_b", true},
		{"", false},
		{"has space", false},
		{strings.Repeat("x", 129), false},
	} {
		req, _ := http.NewRequest("POST", srv.URL+"/api/metrics", strings.NewReader(metricBody("cpu", sampleTime, 1)))
		if tc.sentID != "" {
			req.Header.Set("X-Request-ID", tc.sentID)
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		id := res.Header.Get("X-Request-ID")
		if tc.echo && id != tc.sentID || !tc.echo && (id == "" || id == tc.sentID) {
			t.Errorf("X-Request-ID sent %q, answered %q; want it echoed only when sane, else generated", tc.sentID, id)
		}
		lines := logs.lines(t)
		last := lines[len(lines)-1]
		for k, want := range map[string]any{
			"msg": "request", "method": "POST", "route": "POST /api/metrics", "status": 201.0, "request_id": id,
		} {
			if last[k] != want {
				t.Errorf("access log %s = %v, want %v (line %v)", k, last[k], want, last)
			}
		}
		if _, ok := last["duration_ms"].(float64); !ok {
			t.Errorf("access log duration_ms = %v, want a number (line %v)", last["duration_ms"], last)
		}
		if c, _ := last["client"].(string); c == "" {
			t.Errorf("access log client = %v, want the peer's address (line %v)", last["client"], last)
		}
	}
}

func TestPanicBecomes500(t *testing.T) {
	var logs syncBuffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	tel := newTelemetry()
	mux := http.NewServeMux()
	for pattern, h := range map[string]http.HandlerFunc{
		"GET /boom":  func(http.ResponseWriter, *http.Request) { panic("boom") },
		"GET /abort": func(http.ResponseWriter, *http.Request) { panic(http.ErrAbortHandler) },
		"GET /ok":    func(w http.ResponseWriter, _ *http.Request) { writeError(w, 200, "fine") },
	} {
		tel.addRoute(pattern)
		mux.Handle(pattern, h)
	}
	srv := httptest.NewUnstartedServer(instrument(log, tel, mux, nil))
	srv.Config.ErrorLog = slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)
	srv.Start()
	defer srv.Close()

	r := get(t, srv.URL+"/boom")
	if r.status != 500 || strings.TrimSpace(r.body) != `{"detail":"internal error"}` {
		t.Errorf("GET /boom = %d %s, want 500 {\"detail\":\"internal error\"}", r.status, r.body)
	}
	var panics int
	for _, l := range logs.lines(t) {
		if l["msg"] == "panic serving request" {
			panics++
			if s, _ := l["stack"].(string); !strings.Contains(s, "TestPanicBecomes500") {
				t.Errorf("panic log has no stack of the handler: %v", l["stack"])
			}
		}
	}
	if panics != 1 {
		t.Errorf("%d panic log lines, want 1", panics)
	}
	if _, err := http.Get(srv.URL + "/abort"); err == nil {
		t.Error("GET /abort got an answer; http.ErrAbortHandler must cut the connection")
	}
	if r := get(t, srv.URL+"/ok"); r.status != 200 {
		t.Errorf("after panics, GET /ok = %d, want 200", r.status)
	}
}

func TestHealthcheckMode(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	addr, done := startRun(t, ctx, map[string]string{"ADDR": "127.0.0.1:0"})
	_, port, _ := strings.Cut(addr, ":")
	for _, listen := range []string{addr, ":" + port, "0.0.0.0:" + port} {
		if err := healthcheck(func(k string) string { return map[string]string{"ADDR": listen}[k] }); err != nil {
			t.Errorf("healthcheck with ADDR=%s against a healthy server: %v", listen, err)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := healthcheck(func(k string) string { return map[string]string{"ADDR": addr}[k] }); err == nil {
		t.Error("healthcheck against a stopped server succeeded")
	}
}

// TestInstrumentPassesFlush checks that a handler behind instrument can
// flush, both as an http.Flusher and through http.ResponseController: the
// first part of its answer reaches the client while it still waits.
func TestInstrumentPassesFlush(t *testing.T) {
	for _, via := range []string{"Flusher", "ResponseController"} {
		t.Run(via, func(t *testing.T) {
			tel := newTelemetry()
			mux := http.NewServeMux()
			release := make(chan struct{})
			tel.addRoute("GET /slow")
			mux.HandleFunc("GET /slow", func(w http.ResponseWriter, _ *http.Request) {
				w.Write([]byte("first\n"))
				if via == "Flusher" {
					f, ok := w.(http.Flusher)
					if !ok {
						t.Error("the writer behind instrument is not an http.Flusher")
						return
					}
					f.Flush()
				} else if err := http.NewResponseController(w).Flush(); err != nil {
					t.Errorf("ResponseController.Flush: %v", err)
					return
				}
				<-release
				w.Write([]byte("second\n"))
			})
			srv := httptest.NewServer(instrument(discardLogger(), tel, mux, nil))
			defer srv.Close()
			defer close(release)
			res, err := http.Get(srv.URL + "/slow")
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			line, err := bufio.NewReader(res.Body).ReadString('\n')
			if err != nil || line != "first\n" || res.StatusCode != 200 {
				t.Errorf("before the handler ends: %d %q %v, want 200 and the flushed line", res.StatusCode, line, err)
			}
		})
	}
}

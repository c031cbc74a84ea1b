package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/gomodule/redigo/redis"
)

const (
	tokenA = "tok-A-7f3c9e1d2b"
	tokenB = "tok-B-0a8e44c6d1"
)

// serveLogged is serve with the log kept, at debug level.
func serveLogged(t *testing.T, cfg config, b backend) (string, *syncBuffer) {
	logs := &syncBuffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv := httptest.NewServer(newHandler(log, cfg, newTelemetry(), b))
	t.Cleanup(srv.Close)
	return srv.URL, logs
}

func TestAuthTokens(t *testing.T) {
	forEachStore(t, func(c *config) {
		c.AuthTokens = []string{tokenA, tokenB}
		c.RateLimit, c.TokenRateLimit = 3, 4
	}, func(t *testing.T, e storeEnv) {
		base, logs := serveLogged(t, e.cfg, e.b)
		body := metricBody("cpu", sampleTime, 1)
		for _, h := range [][]string{nil, {"Authorization", "Bearer wrong"}} {
			r := sendWith(t, "POST", base+"/api/metrics", body, h...)
			if r.status != 401 || r.header.Get("WWW-Authenticate") != "Bearer" || !strings.Contains(r.body, `"detail":"a token from AUTH_TOKENS is needed`) || r.header.Get("X-Ratelimit-Limit") != "3" {
				t.Errorf("POST with %v = %d %v %s, want 401 with a Bearer challenge", h, r.status, r.header, r.body)
			}
		}
		lines := base + "/api/v2/write?precision=s"
		r := sendWith(t, "POST", lines, "cpu value=5 1735725600", "Authorization", "Token nope")
		if m := r.json(t); r.status != 401 || m["code"] != "unauthorized" || r.header.Get("WWW-Authenticate") != "Token" {
			t.Errorf("line protocol with a wrong token = %d %v %s", r.status, r.header, r.body)
		}
		// The three refused ones counted against the address.
		if r := sendWith(t, "POST", base+"/api/metrics", body); r.status != 429 {
			t.Errorf("fourth POST from the address without a token = %d, want 429", r.status)
		}
		if n := count(t, e.b, "cpu"); n != 0 {
			t.Fatalf("refused POSTs stored %d samples", n)
		}
		// A valid token has a limit of its own, TOKEN_RATE_LIMIT.
		for i := range 5 {
			r := sendWith(t, "POST", base+"/api/metrics", body, "Authorization", "bearer "+tokenA)
			if want := map[bool]int{true: 201, false: 429}[i < 4]; r.status != want || r.header.Get("X-Ratelimit-Limit") != "4" {
				t.Errorf("POST %d with a token = %d %v, want %d with limit 4", i+1, r.status, r.header, want)
			}
		}
		// The InfluxDB clients' ways of sending one, under the other token.
		for _, h := range [][]string{{"Authorization", "Token " + tokenB}, {"Authorization", "Bearer " + tokenB}} {
			if r := sendWith(t, "POST", lines, "cpu value=2 1735725600", h...); r.status != 204 {
				t.Errorf("line protocol with %s = %d %s", h[1][:6], r.status, r.body)
			}
		}
		req, _ := http.NewRequest("POST", base+"/write?db=x&precision=s", strings.NewReader("cpu value=3 1735725600"))
		req.SetBasicAuth("anyone", tokenB)
		if res, err := http.DefaultClient.Do(req); err != nil || res.StatusCode != 204 {
			t.Errorf("v1 write with basic auth: %v %v", res, err)
		} else {
			res.Body.Close()
		}
		if r := sendWith(t, "POST", base+"/write?db=x&precision=s&u=anyone&p="+tokenB, "cpu value=4 1735725600"); r.status != 204 {
			t.Errorf("v1 write with u and p = %d %s", r.status, r.body)
		}
		if n := count(t, e.b, "cpu"); n != 8 {
			t.Errorf("cpu holds %d samples, want 8 (4 JSON, 4 line protocol)", n)
		}
		// No token is ever written down: not in the log, not in /metrics,
		// not in a Redis key.
		seen := logs.String() + get(t, base+"/metrics").body
		if e.pool != nil {
			c := e.pool.Get()
			defer c.Close()
			ks, err := redis.Strings(c.Do("KEYS", "*"))
			if err != nil {
				t.Fatal(err)
			}
			seen += strings.Join(ks, "\n")
		}
		for _, tok := range []string{tokenA, tokenB} {
			d := sha256.Sum256([]byte(tok))
			if strings.Contains(seen, tok) || strings.Contains(seen, hex.EncodeToString(d[:4])) {
				t.Errorf("token %s, or its digest, appears in the log, /metrics or a Redis key", tok)
			}
		}
	})
}

func TestAuthReads(t *testing.T) {
	forEachStore(t, func(c *config) {
		c.AuthTokens, c.AuthReads, c.RateLimit = []string{tokenA}, true, 20
	}, func(t *testing.T, e storeEnv) {
		base, logs := serveLogged(t, e.cfg, e.b)
		if r := sendWith(t, "POST", base+"/api/metrics", metricBody("cpu", sampleTime, 1), "Authorization", "Bearer "+tokenA); r.status != 201 {
			t.Fatalf("POST = %d %s", r.status, r.body)
		}
		for _, path := range []string{"/api/metrics/summary?metric_type=cpu", "/api/metrics/series?metric_type=cpu&from=2025-01-01T10:00:00Z&to=2025-01-01T10:01:00Z&step=1m",
			"/api/metrics/types", "/api/metrics/labels?metric_type=cpu", "/api/metrics/stream"} {
			for _, h := range [][]string{nil, {"Authorization", "Bearer " + tokenB}} {
				if r := sendWith(t, "GET", base+path, "", h...); r.status != 401 || r.header.Get("WWW-Authenticate") != "Bearer" || !strings.Contains(r.body, `"detail"`) {
					t.Errorf("GET %s with %v = %d %s, want 401", path, h, r.status, r.body)
				}
			}
			if strings.HasSuffix(path, "stream") {
				continue
			}
			if r := sendWith(t, "GET", base+path, "", "Authorization", "Bearer "+tokenA); r.status != 200 {
				t.Errorf("GET %s with the token = %d %s", path, r.status, r.body)
			}
		}
		// Each refused read counted against the address (RATE_LIMIT is 20
		// here): guessing by reading is as slow as by writing.
		r := sendWith(t, "GET", base+"/api/metrics/types", "")
		for range 20 {
			r = sendWith(t, "GET", base+"/api/metrics/types", "", "Authorization", "Bearer guess")
		}
		if r.status != 429 {
			t.Errorf("the 21st refused read = %d %s, want 429", r.status, r.body)
		}
		// The stream takes the token in its query, as EventSource can send
		// no header.
		res, err := http.Get(base + "/api/metrics/stream?access_token=" + tokenA)
		if err != nil {
			t.Fatal(err)
		}
		line, _ := bufio.NewReader(res.Body).ReadString('\n')
		res.Body.Close()
		if res.StatusCode != 200 || !strings.HasPrefix(line, "retry:") {
			t.Errorf("stream with access_token = %d %q", res.StatusCode, line)
		}
		// The dashboard's page, /health and /metrics need none.
		for _, path := range []string{"/", "/assets/app.js", "/health", "/metrics"} {
			if r := get(t, base+path); r.status != 200 {
				t.Errorf("GET %s = %d, want 200 without a token", path, r.status)
			}
		}
		if strings.Contains(logs.String(), tokenA) {
			t.Errorf("the token appears in the log")
		}
	})
}

func TestAuthConfig(t *testing.T) {
	for _, c := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"AUTH_READS": "true"}, "AUTH_READS"},
		{map[string]string{"REDIS_CLUSTER": "127.0.0.1:7000,127.0.0.1"}, `REDIS_CLUSTER="127.0.0.1": must be a comma-separated list of host:port`},
		{map[string]string{"REDIS_CLUSTER": "127.0.0.1:7000", "REDIS_URL": "redis://127.0.0.1:7000/2"}, "REDIS_CLUSTER" + `="127.0.0.1:7000": a Redis Cluster has only database 0`},
		{map[string]string{"AUTH_TOKENS": "good-one-16-chars,bad one with spaces"}, "AUTH_TOKENS: token 2"},
		{map[string]string{"AUTH_TOKENS": "good-one-16-chars,,xxxxxxxxxxxxxxxxxx"}, "AUTH_TOKENS: token 2"},
		{map[string]string{"AUTH_TOKENS": "good-one-16-chars,too-short"}, "AUTH_TOKENS: token 2 of the list must be 16 to 256"},
	} {
		_, err := loadConfig(func(k string) string { return c.env[k] })
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "good-one") {
			t.Errorf("%v: %v, want an error naming %q without the tokens", c.env, err, c.want)
		}
	}
	cfg, err := loadConfig(func(k string) string {
		return map[string]string{"AUTH_TOKENS": " a-token-of-16-chars , b-token-of-16-chars ", "AUTH_READS": "true", "TOKEN_RATE_LIMIT": "50"}[k]
	})
	if err != nil || len(cfg.AuthTokens) != 2 || cfg.AuthTokens[1] != "b-token-of-16-chars" || !cfg.AuthReads || cfg.TokenRateLimit != 50 {
		t.Errorf("config = %+v, %v", cfg, err)
	}
	if cfg, _ := loadConfig(func(string) string { return "" }); cfg.TokenRateLimit != 1000 || cfg.AuthTokens != nil {
		t.Errorf("defaults: TOKEN_RATE_LIMIT %d, AUTH_TOKENS %v", cfg.TokenRateLimit, cfg.AuthTokens)
	}
}

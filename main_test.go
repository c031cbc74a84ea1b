package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestRunServesAndStops(t *testing.T) {
	env := map[string]string{"ADDR": "127.0.0.1:0", "LOG_LEVEL": "debug"}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, done := startRun(t, ctx, env)

	if r := get(t, "http://"+addr+"/health"); r.status != 200 || r.body != `{"status":"ok"}`+"\n" {
		t.Fatalf("GET /health = %d %q, want 200 {\"status\":\"ok\"}", r.status, r.body)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run returned %v after cancel, want nil", err)
		}
	case <-time.After(shutdownTimeout + time.Second):
		t.Fatal("run did not return after its context was cancelled")
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("the server still accepts connections after run returned")
	}
}

func TestRunRejectsBadConfig(t *testing.T) {
	for _, tc := range []struct{ name, value string }{
		{"STORE", "postgres"},
		{"RATE_LIMIT", "0"},
		{"RATE_WINDOW", "soon"},
		{"CACHE_TTL", "-5"},
		{"CB_FAILURE_THRESHOLD", "x"},
		{"EXTERNAL_SERVICE_FAILURE_RATE", "1.5"},
		{"EXTERNAL_URL", "ftp://example"},
		{"REDIS_URL", "http://localhost"},
		{"REDIS_TIMEOUT", "0"},
		{"TRUSTED_PROXIES", "10.0.0.0/33"},
		{"MAX_BODY_BYTES", "-1"},
		{"LOG_LEVEL", "loud"},
		{"RATE_LIMIT_FAIL_CLOSED", "perhaps"},
		{"ADDR", "notanaddr"},
	} {
		env := map[string]string{"ADDR": "127.0.0.1:0"}
		env[tc.name] = tc.value
		err := run(context.Background(), func(k string) string { return env[k] }, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.name) {
			t.Errorf("run with %s=%q = %v, want an error naming %s", tc.name, tc.value, err, tc.name)
		}
	}
}

func TestRunFailsOnTakenPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	env := map[string]string{"ADDR": ln.Addr().String()}
	done := make(chan error, 1)
	go func() { done <- run(context.Background(), func(k string) string { return env[k] }, io.Discard) }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("run on a taken port returned nil")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("run on a taken port did not fail at once")
	}
}

func TestConfigDurations(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
	}{
		{"60", time.Minute},
		{"0.5", 500 * time.Millisecond},
		{"1500ms", 1500 * time.Millisecond},
		{"5m", 5 * time.Minute},
	} {
		cfg, err := loadConfig(func(k string) string { return map[string]string{"CACHE_TTL": tc.in}[k] })
		if err != nil || cfg.CacheTTL != tc.want {
			t.Errorf("CACHE_TTL=%q: got %v, %v; want %v", tc.in, cfg.CacheTTL, err, tc.want)
		}
	}
}

func TestConfigRedisURL(t *testing.T) {
	for _, tc := range []struct {
		env            map[string]string
		addr, user, pw string
		db             int
	}{
		{map[string]string{}, "localhost:6379", "", "", 0},
		{map[string]string{"REDIS_HOST": "cache", "REDIS_PORT": "7000"}, "cache:7000", "", "", 0},
		{map[string]string{"REDIS_URL": "redis://redis:6380/2", "REDIS_HOST": "ignored"}, "redis:6380", "", "", 2},
		{map[string]string{"REDIS_URL": "redis://:secret@r"}, "r:6379", "", "secret", 0},
		{map[string]string{"REDIS_URL": "redis://app:pw@r:1/0"}, "r:1", "app", "pw", 0},
	} {
		cfg, err := loadConfig(func(k string) string { return tc.env[k] })
		if err != nil {
			t.Fatalf("loadConfig(%v): %v", tc.env, err)
		}
		if cfg.RedisAddr != tc.addr || cfg.RedisUsername != tc.user || cfg.RedisPassword != tc.pw || cfg.RedisDB != tc.db {
			t.Errorf("loadConfig(%v) = %s %q %q db %d, want %s %q %q db %d", tc.env,
				cfg.RedisAddr, cfg.RedisUsername, cfg.RedisPassword, cfg.RedisDB, tc.addr, tc.user, tc.pw, tc.db)
		}
	}
}

func TestUncleanPathRedirectsInJSON(t *testing.T) {
	cfg := testConfig(t)
	base := serve(t, cfg, newMemoryBackend(cfg, time.Now))
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	res, err := client.Get(base + "//health")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var body errorBody
	if res.StatusCode/100 != 3 || res.Header.Get("Location") != "/health" ||
		res.Header.Get("Content-Type") != "application/json" || json.NewDecoder(res.Body).Decode(&body) != nil || body.Detail == "" {
		t.Errorf("GET //health = %d Location %q %s, want a redirect to /health with a JSON detail",
			res.StatusCode, res.Header.Get("Location"), res.Header.Get("Content-Type"))
	}
}

func TestUnknownRouteAndMethod(t *testing.T) {
	cfg := testConfig(t)
	base := serve(t, cfg, newMemoryBackend(cfg, time.Now))
	for _, tc := range []struct {
		method, path string
		status       int
		detail       string
		allow        string
	}{
		{"GET", "/nope", 404, "not found", ""},
		{"GET", "/api/metrics", 405, "method not allowed", "DELETE, POST"},
		{"DELETE", "/health", 405, "method not allowed", "GET, HEAD"},
		{"POST", "/api/metrics/summary", 405, "method not allowed", "GET, HEAD"},
		{"HEAD", "/external", 405, "", "GET"}, // a HEAD must not call the service
	} {
		if tc.method == "HEAD" {
			r := send(t, tc.method, base+tc.path, "", "")
			if r.status != tc.status || r.header.Get("Allow") != tc.allow {
				t.Errorf("%s %s = %d Allow %q, want %d Allow %q", tc.method, tc.path, r.status, r.header.Get("Allow"), tc.status, tc.allow)
			}
			continue
		}
		r := send(t, tc.method, base+tc.path, "", "")
		if r.status != tc.status || r.header.Get("Content-Type") != "application/json" || r.json(t)["detail"] != tc.detail {
			t.Errorf("%s %s = %d %s %q, want %d application/json detail %q", tc.method, tc.path,
				r.status, r.header.Get("Content-Type"), r.body, tc.status, tc.detail)
		}
		if got := r.header.Get("Allow"); got != tc.allow {
			t.Errorf("%s %s: Allow = %q, want %q", tc.method, tc.path, got, tc.allow)
		}
	}
}

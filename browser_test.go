package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The dashboard in a real browser: chromium, driven through chromedriver's
// WebDriver API (JSON over HTTP), with nothing but net/http.

// needBrowser returns the chromedriver binary, skipping the test when it
// or chromium is missing, unless REQUIRE_BROWSER=1 makes that a failure.
func needBrowser(t *testing.T) string {
	t.Helper()
	driver, err := exec.LookPath("chromedriver")
	if err == nil {
		_, err = exec.LookPath("chromium")
	}
	if err != nil {
		if os.Getenv("REQUIRE_BROWSER") == "1" {
			t.Fatalf("REQUIRE_BROWSER=1 but chromium or chromedriver is missing: %v", err)
		}
		t.Skip("chromium and chromedriver are not on PATH (Debian: apt-get install chromium chromium-driver)")
	}
	return driver
}

// webDriver is one browser session.
type webDriver struct {
	t    *testing.T
	base string // the driver's URL with /session/<id>
}

// startBrowser starts chromedriver on a free port and opens a headless
// session, both ended after the test.
func startBrowser(t *testing.T) *webDriver {
	t.Helper()
	driver := needBrowser(t)
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(driver, "--port="+strconv.Itoa(port))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) { // polling for readiness
		res, err := http.Get(url + "/status")
		if err == nil {
			res.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("chromedriver did not answer within 10s: %v", err)
		}
	}
	wd := &webDriver{t: t, base: url}
	var session struct {
		SessionID string `json:"sessionId"`
	}
	wd.call("POST", "/session", map[string]any{"capabilities": map[string]any{"alwaysMatch": map[string]any{
		"goog:chromeOptions": map[string]any{"args": []string{"--headless=new", "--no-sandbox", "--disable-gpu",
			"--disable-dev-shm-usage", "--disable-background-networking", "--window-size=1280,1000"}},
		"goog:loggingPrefs": map[string]string{"browser": "ALL"},
	}}}, &session)
	wd.base += "/session/" + session.SessionID
	t.Cleanup(func() { wd.call("DELETE", "", nil, nil) })
	return wd
}

// call sends one WebDriver command and decodes its value into out.
func (wd *webDriver) call(method, path string, body any, out any) {
	wd.t.Helper()
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, wd.base+path, r)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		wd.t.Fatalf("webdriver %s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	var reply struct {
		Value json.RawMessage `json:"value"`
	}
	raw, _ := io.ReadAll(res.Body)
	if err := json.Unmarshal(raw, &reply); err != nil || res.StatusCode != 200 {
		wd.t.Fatalf("webdriver %s %s = %d %s", method, path, res.StatusCode, raw)
	}
	if out != nil {
		if err := json.Unmarshal(reply.Value, out); err != nil {
			wd.t.Fatalf("webdriver %s %s: value %s: %v", method, path, reply.Value, err)
		}
	}
}

// eval runs script in the page and decodes what it returns into out.
func (wd *webDriver) eval(script string, out any) {
	wd.t.Helper()
	wd.call("POST", "/execute/sync", map[string]any{"script": script, "args": []any{}}, out)
}

// waitJS polls script until it returns true, failing after d.
func (wd *webDriver) waitJS(script string, d time.Duration, what string) {
	wd.t.Helper()
	for deadline := time.Now().Add(d); ; time.Sleep(20 * time.Millisecond) { // polling the page's state
		var ok bool
		wd.eval(script, &ok)
		if ok {
			return
		}
		if time.Now().After(deadline) {
			wd.t.Fatalf("not within %s: %s (%s)", d, what, script)
		}
	}
}

// find is the element css selects, as the driver names it.
func (wd *webDriver) find(css string) string {
	wd.t.Helper()
	var el map[string]string
	wd.call("POST", "/element", map[string]string{"using": "css selector", "value": css}, &el)
	for _, id := range el { // the one key is the W3C element identifier
		return id
	}
	wd.t.Fatalf("no element %s", css)
	return ""
}

func (wd *webDriver) click(css string) {
	wd.t.Helper()
	wd.call("POST", "/element/"+wd.find(css)+"/click", map[string]any{}, nil)
}

// typeInto types text into the element, as keystrokes.
func (wd *webDriver) typeInto(css, text string) {
	wd.t.Helper()
	wd.call("POST", "/element/"+wd.find(css)+"/value", map[string]string{"text": text}, nil)
}

// consoleErrors is what the page logged at level SEVERE.
func (wd *webDriver) consoleErrors() []string {
	wd.t.Helper()
	var entries []struct {
		Level, Message string
	}
	wd.call("POST", "/se/log", map[string]string{"type": "browser"}, &entries)
	var out []string
	for _, e := range entries {
		if e.Level == "SEVERE" {
			out = append(out, e.Message)
		}
	}
	return out
}

func TestDashboardInBrowser(t *testing.T) {
	wd := startBrowser(t)
	cfg := testConfig(t)
	e := storeEnv{name: "memory", cfg: cfg, clock: newFakeClock(time.Now())}
	b := newMemoryBackend(cfg, time.Now)
	base := liveServe(t, e, b, nil)

	// Four minutes of data for three types, then 97 more types, so the
	// page holds 100.
	now := time.Now().Truncate(time.Second)
	var batch []sample
	for i := range 240 {
		at := now.Add(-time.Duration(240-i) * time.Second)
		wave := math.Sin(float64(i) / 20)
		for k := range 1 + i%4 {
			batch = append(batch, hostSample("cpu", fmt.Sprint("web-", k%2+1), at, 50+30*wave+float64(k*5)))
		}
		batch = append(batch, hostSample("latency", "", at, 120+60*wave*wave+float64(i%7)*3))
		if i%3 == 0 {
			batch = append(batch, hostSample("mem", "", at, 2048+float64(i)))
		}
	}
	for i := range 97 {
		batch = append(batch, hostSample(fmt.Sprintf("svc.%03d", i), "", now.Add(-time.Minute), float64(i)))
	}
	postSamples(t, base, batch)
	cpuSamples, web2 := 0, 0
	for _, s := range batch {
		if s.typ == "cpu" {
			cpuSamples++
			if strings.Contains(s.series, "web-2") {
				web2++
			}
		}
	}

	wd.call("POST", "/url", map[string]string{"url": base + "/"}, nil)
	wd.eval(`window.sameLoad = true; return true`, nil)
	wd.waitJS(`return document.body.dataset.types === "100"`, 5*time.Second, "the page lists 100 types")
	var names []string
	wd.eval(`return [...document.querySelectorAll('[data-type]')].slice(0, 3).map(e => e.dataset.type)`, &names)
	if strings.Join(names, ",") != "cpu,latency,mem" {
		t.Errorf("the first types listed are %v, want cpu, latency, mem", names)
	}
	cpu := `document.querySelector('[data-type="cpu"] svg')`
	wd.waitJS(`return `+cpu+`.dataset.total === "`+strconv.Itoa(cpuSamples)+`"`, 5*time.Second, "the cpu chart shows every sample")
	wd.waitJS(`return document.body.dataset.stream === "live"`, 5*time.Second, "the stream is live")
	var loaded int
	wd.eval(`return [...document.querySelectorAll('svg')].filter(s => s.dataset.fetches !== "0").length`, &loaded)
	if loaded == 0 || loaded >= 50 {
		t.Errorf("%d of 100 charts read their series at load, want only those in view", loaded)
	}

	// A POST changes the chart from the stream: no reload, no new read.
	var fetches string
	wd.eval(`return `+cpu+`.dataset.fetches`, &fetches)
	var more []sample
	for range 5 {
		more = append(more, hostSample("cpu", "web-1", time.Now(), 99))
	}
	postSamples(t, base, more)
	start := time.Now()
	wd.waitJS(`return `+cpu+`.dataset.total === "`+strconv.Itoa(cpuSamples+5)+`"`, 2*time.Second, "the chart counts the posted samples")
	t.Logf("the chart showed the POST %s after it was answered", time.Since(start).Round(time.Millisecond))
	var same bool
	var after string
	wd.eval(`return window.sameLoad === true`, &same)
	wd.eval(`return `+cpu+`.dataset.fetches`, &after)
	if !same || after != fetches {
		t.Errorf("after the POST: same page load %v, series reads %s then %s; want the stream to have updated it in place", same, fetches, after)
	}
	if errs := wd.consoleErrors(); len(errs) > 0 {
		t.Errorf("console errors: %q", errs)
	}

	var png string
	wd.call("GET", "/screenshot", nil, &png)
	shot := os.Getenv("DASHBOARD_SCREENSHOT")
	if shot == "" {
		shot = filepath.Join(os.TempDir(), "analytics-dashboard.png")
	}
	data, err := base64.StdEncoding.DecodeString(png)
	if err != nil || len(data) < 1000 {
		t.Fatalf("screenshot: %d bytes, %v", len(data), err)
	}
	if err := os.WriteFile(shot, data, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot of the dashboard: %s", shot)

	// The range switch reads the series again, at the range's step.
	wd.click(`input[name="range"][value="1h"]`)
	wd.waitJS(`return `+cpu+`.dataset.step === "10" && `+cpu+`.dataset.total === "`+strconv.Itoa(cpuSamples+5)+`"`,
		2*time.Second, "the 1 h range is drawn at 10 s steps")
	wd.eval(`return `+cpu+`.dataset.fetches`, &after)
	if n, _ := strconv.Atoi(after); n <= mustAtoi(fetches) {
		t.Errorf("after the range switch: %s series reads, want more than %s", after, fetches)
	}

	// Grouped by host: a line per host, the same samples in all.
	wd.click(`[data-type="cpu"] .group`)
	wd.waitJS(`return !!document.querySelector('[data-type="cpu"] .group option[value="host"]')`, 2*time.Second, "the group-by choice offers host")
	wd.click(`[data-type="cpu"] .group option[value="host"]`)
	groups := cpu + `.querySelectorAll('path.group').length`
	wd.waitJS(`return `+groups+` === 2 && `+cpu+`.dataset.total === "`+strconv.Itoa(cpuSamples+5)+`"`, 2*time.Second, "two host lines")
	// Filtered to one host: its samples only.
	wd.typeInto(`[data-type="cpu"] .filter`, "host:web-2\uE007") // Enter commits the field
	wd.waitJS(`return `+groups+` === 1 && `+cpu+`.dataset.total === "`+strconv.Itoa(web2)+`"`, 2*time.Second, "the web-2 line alone")
	// Filtered to a host with no data yet, then a POST of it: the empty
	// chart takes the event as a new group.
	wd.call("POST", "/element/"+wd.find(`[data-type="cpu"] .filter`)+"/clear", map[string]any{}, nil)
	wd.typeInto(`[data-type="cpu"] .filter`, "host:web-3\uE007")
	wd.waitJS(`return `+groups+` === 0 && `+cpu+`.dataset.total === "0"`, 2*time.Second, "an empty chart for web-3")
	postSamples(t, base, []sample{hostSample("cpu", "web-3", time.Now(), 7)})
	wd.waitJS(`return `+groups+` === 1 && `+cpu+`.dataset.total === "1"`, 2*time.Second, "the web-3 sample drawn from its event")

	// With the streams ended, the page says it is disconnected.
	b.hub.shutdown()
	wd.waitJS(`return document.body.dataset.stream === "disconnected" && document.querySelector('#status').textContent.includes('Disconnected')`,
		5*time.Second, "the page shows it is disconnected")
}

func mustAtoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		panic(err)
	}
	return n
}

// TestDashboardAsksForToken: with AUTH_READS the page asks for a token
// once a read is refused, then lists the types and goes live with it.
func TestDashboardAsksForToken(t *testing.T) {
	wd := startBrowser(t)
	cfg := testConfig(t)
	cfg.AuthTokens, cfg.AuthReads = []string{tokenA}, true
	e := storeEnv{name: "memory", cfg: cfg, clock: newFakeClock(time.Now())}
	b := newMemoryBackend(cfg, time.Now)
	base := liveServe(t, e, b, nil)
	if r := sendWith(t, "POST", base+"/api/metrics", metricBody("cpu", time.Now().Add(-time.Minute), 1), "Authorization", "Bearer "+tokenA); r.status != 201 {
		t.Fatalf("POST = %d %s", r.status, r.body)
	}
	wd.call("POST", "/url", map[string]string{"url": base + "/"}, nil)
	wd.waitJS(`return !document.querySelector('#token-form').hidden`, 5*time.Second, "the page asks for a token")
	wd.typeInto("#token", "wrong")
	wd.click("#token-form button")
	wd.waitJS(`return !document.querySelector('#token-form').hidden && document.querySelector('#token-why').textContent.includes('refused')`, 5*time.Second, "a wrong token is refused")
	wd.typeInto("#token", tokenA)
	wd.click("#token-form button")
	wd.waitJS(`return document.body.dataset.types === "1" && document.querySelector('#token-form').hidden`, 5*time.Second, "the types listed with the token")
	wd.waitJS(`return document.body.dataset.stream === "live"`, 5*time.Second, "the stream live with the token")
}

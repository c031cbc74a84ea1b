package main

import (
	"encoding/json"
	"html"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestOpenAPIMatchesRoutes: every route the server has is in
// openapi.json, and every operation there is a route.
func TestOpenAPIMatchesRoutes(t *testing.T) {
	cfg := testConfig(t)
	tel := newTelemetry()
	newHandler(discardLogger(), cfg, tel, newMemoryBackend(cfg, time.Now))
	routed := map[string]bool{}
	for pattern := range tel.routes {
		method, path, ok := strings.Cut(pattern, " ")
		if !ok || method == "HEAD" { // HEAD /external only refuses
			continue
		}
		routed[strings.ToLower(method)+" "+strings.TrimSuffix(path, "{$}")] = true
	}
	var doc apiDoc
	if err := json.Unmarshal(openAPIDoc, &doc); err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for path, ops := range doc.Paths {
		for method := range ops {
			documented[method+" "+path] = true
		}
	}
	for _, r := range slices.Sorted(maps.Keys(routed)) {
		if !documented[r] {
			t.Errorf("route %s is not in openapi.json", r)
		}
	}
	for _, d := range slices.Sorted(maps.Keys(documented)) {
		if !routed[d] {
			t.Errorf("openapi.json has %s, which is not a route", d)
		}
	}
	if len(routed) < 15 {
		t.Fatalf("only %d routes: %v", len(routed), routed)
	}
}

// TestOpenAPIDocs: the document is served as it is, and /docs shows
// each of its operations, with no asset from elsewhere.
func TestOpenAPIDocs(t *testing.T) {
	cfg := testConfig(t)
	base := serve(t, cfg, newMemoryBackend(cfg, time.Now))
	r := get(t, base+"/openapi.json")
	if r.status != 200 || r.header.Get("Content-Type") != "application/json" || r.body != string(openAPIDoc) {
		t.Fatalf("/openapi.json = %d %s", r.status, r.header.Get("Content-Type"))
	}
	r = get(t, base+"/docs")
	if r.status != 200 || !strings.HasPrefix(r.header.Get("Content-Type"), "text/html") || r.header.Get("Content-Security-Policy") != dashboardPolicy {
		t.Fatalf("/docs = %d %v", r.status, r.header)
	}
	var doc apiDoc
	json.Unmarshal(openAPIDoc, &doc)
	page := html.UnescapeString(r.body)
	for path, ops := range doc.Paths {
		for method, op := range ops {
			if !strings.Contains(page, strings.ToUpper(method)+" "+path) || !strings.Contains(page, op.Summary) {
				t.Errorf("/docs lacks %s %s (%s)", method, path, op.Summary)
			}
		}
	}
	if strings.Contains(r.body, "http://") || strings.Contains(r.body, "https://") {
		t.Errorf("/docs refers to something elsewhere")
	}
}

package main

import (
	"embed"
	"net/http"
	"path"
	"strings"
)

// web holds the dashboard: one page, its script and its style sheet,
// written by hand, with no build step and nothing fetched from elsewhere,
// so the binary serves it as it is, offline too.
//
//go:embed web/index.html web/app.js web/style.css
var web embed.FS

// dashboardPolicy lets the page load only what the binary serves and call
// only its API.
const dashboardPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

var contentTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".css":  "text/css; charset=utf-8",
}

// handleDashboard serves the page at / and its files under /assets/.
func handleDashboard() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The path, not r.PathValue: instrument finds the route with
		// ServeMux.Handler, which sets no path values.
		name := "index.html"
		if r.URL.Path != "/" {
			name = strings.TrimPrefix(r.URL.Path, "/assets/")
		}
		body, err := web.ReadFile("web/" + name)
		if err != nil || name == "index.html" && r.URL.Path != "/" {
			writeError(w, http.StatusNotFound, "not found")
			return
		}
		h := w.Header()
		h.Set("Content-Type", contentTypes[path.Ext(name)])
		h.Set("Content-Security-Policy", dashboardPolicy)
		// The files change only with the binary; revalidating on each
		// load keeps a browser from running an old script.
		h.Set("Cache-Control", "no-cache")
		w.Write(body)
	})
}

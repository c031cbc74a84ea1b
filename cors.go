package main

import (
	"net/http"
	"strings"
)

// corsPolicy lets pages served from other origins call the API
// (CORS_ORIGINS). With no origins configured it adds nothing, so a browser
// keeps refusing cross-origin reads, as the same-origin policy means it to.
type corsPolicy struct {
	any     bool            // "*": every origin
	origins map[string]bool // exact origins, as browsers send them
}

func newCORSPolicy(origins []string) *corsPolicy {
	if len(origins) == 0 {
		return nil
	}
	p := &corsPolicy{origins: map[string]bool{}}
	for _, o := range origins {
		if o == "*" {
			p.any = true
		}
		p.origins[o] = true
	}
	return p
}

// apply adds the CORS headers a request from an allowed origin gets, and
// answers a preflight itself, which it reports, when routed tells that the
// method it asks about has a route at the path. A nil policy does nothing.
func (p *corsPolicy) apply(w http.ResponseWriter, r *http.Request, routed func(method string) bool) (answered bool) {
	if p == nil {
		return false
	}
	h := w.Header()
	origin := r.Header.Get("Origin")
	if !p.any {
		h.Add("Vary", "Origin") // the answer depends on who asks
	}
	if origin == "" || !p.any && !p.origins[origin] {
		return false
	}
	if p.any {
		h.Set("Access-Control-Allow-Origin", "*")
	} else {
		h.Set("Access-Control-Allow-Origin", origin)
	}
	h.Set("Access-Control-Expose-Headers", "Idempotent-Replayed, Retry-After, X-Request-Id, X-Circuit-State, X-Ratelimit-Limit, X-Ratelimit-Remaining, X-Ratelimit-Reset")
	method := r.Header.Get("Access-Control-Request-Method")
	if r.Method != http.MethodOptions || method == "" || !routed(method) {
		return false
	}
	h.Set("Access-Control-Allow-Methods", "GET, POST, DELETE")
	h.Set("Access-Control-Allow-Headers", "Authorization, Content-Type, Idempotency-Key, X-Request-ID")
	h.Set("Access-Control-Max-Age", "600")
	w.WriteHeader(http.StatusNoContent)
	return true
}

// origins reads a comma-separated list of origins (scheme://host[:port],
// as a browser's Origin header has them) or "*".
func (p *envParser) origins(name string) []string {
	var out []string
	for _, f := range strings.Split(p.getenv(name), ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if f != "*" && !validOrigin(f) {
			p.fail(name, f, "must be a comma-separated list of origins such as https://app.example.com, or *")
			continue
		}
		// As a browser sends it: lower case, without the scheme's
		// default port.
		o := strings.ToLower(f)
		if strings.HasPrefix(o, "https://") {
			o = strings.TrimSuffix(o, ":443")
		} else {
			o = strings.TrimSuffix(o, ":80")
		}
		out = append(out, o)
	}
	return out
}

func validOrigin(s string) bool {
	scheme, host, ok := strings.Cut(s, "://")
	return ok && (scheme == "http" || scheme == "https") && host != "" &&
		!strings.ContainsAny(host, "/?#@ ")
}

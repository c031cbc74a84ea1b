package main

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

// tokenSet is AUTH_TOKENS: the tokens a write may carry. It keeps their
// SHA-256 digests, in order, so comparing costs the same whatever a
// guess's length or how much of it matches, and no token is kept in the
// clear past start.
type tokenSet struct {
	digests [][sha256.Size]byte
}

func newTokenSet(tokens []string) *tokenSet {
	s := &tokenSet{}
	for _, t := range tokens {
		s.digests = append(s.digests, sha256.Sum256([]byte(t)))
	}
	slices.SortFunc(s.digests, func(a, b [sha256.Size]byte) int { return bytes.Compare(a[:], b[:]) })
	s.digests = slices.Compact(s.digests)
	return s
}

// enabled reports whether tokens are required at all.
func (s *tokenSet) enabled() bool { return s != nil && len(s.digests) > 0 }

// match reports whether given is one of the tokens, comparing with every
// one of them each time, and names it by its place among their digests:
// what the rate limit counts it under, so that nothing derived from a
// token is written anywhere, and instances with the same AUTH_TOKENS,
// in any order, agree on it.
func (s *tokenSet) match(given string) (id string, ok bool) {
	if given == "" {
		return "", false
	}
	d := sha256.Sum256([]byte(given))
	at := -1
	for i, t := range s.digests {
		if subtle.ConstantTimeCompare(d[:], t[:]) == 1 {
			at = i
		}
	}
	if at < 0 {
		return "", false
	}
	return strconv.Itoa(at), true
}

// readGate makes the reads need a token when AUTH_READS is set: an
// Authorization: Bearer header or, for the event stream, whose browser
// API cannot send headers, an access_token query parameter. Without
// AUTH_READS it is next itself.
//
// A read without a valid token counts against its address's rate limit, as
// a write does, so reads are no faster a way to guess a token; past the
// limit it is 429.
func (g *writeGate) readGate(next http.Handler) http.Handler {
	if !g.cfg.AuthReads || !g.tokens.enabled() {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t := bearerToken(r)
		if t == "" {
			t = r.URL.Query().Get("access_token")
		}
		if _, ok := g.tokens.match(t); ok {
			next.ServeHTTP(w, r)
			return
		}
		d, err := g.clients.allow(r.Context(), clientKey(r, g.cfg.TrustedProxies), g.now())
		if err == nil && !d.allowed {
			g.tel.rateLimitRejected.Add(1)
			w.Header().Set("Retry-After", strconv.FormatInt(ceilSeconds(d.reset), 10))
			writeError(w, http.StatusTooManyRequests, "Too many requests")
			return
		}
		w.Header().Set("WWW-Authenticate", "Bearer")
		writeError(w, http.StatusUnauthorized, "a token from AUTH_TOKENS is needed to read (AUTH_READS): Authorization: Bearer <token>")
	})
}

// bearerToken is the token of an Authorization: Bearer header; "" for
// none.
func bearerToken(r *http.Request) string {
	return schemeToken(r.Header.Get("Authorization"), "Bearer")
}

// influxToken is a token as the InfluxDB clients send one: Authorization
// Token or Bearer (v2), or the password of basic auth or of the p query
// parameter (v1).
func influxToken(r *http.Request) string {
	h := r.Header.Get("Authorization")
	if t := schemeToken(h, "Token"); t != "" {
		return t
	}
	if t := schemeToken(h, "Bearer"); t != "" {
		return t
	}
	if _, p, ok := r.BasicAuth(); ok {
		return p
	}
	return r.URL.Query().Get("p")
}

// schemeToken is the credentials of header h when its scheme is scheme
// (compared without case, as HTTP's schemes are).
func schemeToken(h, scheme string) string {
	if len(h) > len(scheme) && strings.EqualFold(h[:len(scheme)], scheme) && h[len(scheme)] == ' ' {
		return strings.TrimSpace(h[len(scheme)+1:])
	}
	return ""
}

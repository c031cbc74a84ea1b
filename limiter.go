package main

import (
	"context"
	_ "embed"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gomodule/redigo/redis"
)

// limiter is a fixed-window rate limiter: time is cut into windows of one
// length aligned to the Unix epoch, and each client may make limit requests
// per window. Every request counts, admitted or not. The window comes from
// the time passed in, so the caller's clock decides it, and every instance
// sharing one Redis agrees on it.
type limiter interface {
	allow(ctx context.Context, client string, now time.Time) (decision, error)
}

// decision is the limiter's answer for one request.
type decision struct {
	allowed   bool
	limit     int
	remaining int
	reset     time.Duration // until the window ends
}

// windowOf returns the index of the window now falls in and the time left
// in it.
func windowOf(now time.Time, length time.Duration) (int64, time.Duration) {
	ns := now.UnixNano()
	idx := ns / int64(length)
	if ns < 0 && ns%int64(length) != 0 {
		idx-- // floor, not truncation, before 1970
	}
	return idx, time.Duration((idx+1)*int64(length) - ns)
}

// decide turns the n-th request of a window into a decision.
func decide(n int64, limit int, reset time.Duration) decision {
	return decision{
		allowed:   n <= int64(limit),
		limit:     limit,
		remaining: int(max(0, int64(limit)-n)),
		reset:     reset,
	}
}

// writeGate is what a write passes before its body is read: the token
// check, when AUTH_TOKENS is set, and the rate limit, per token at
// TOKEN_RATE_LIMIT for a valid token and per client address at RATE_LIMIT
// otherwise (a wrong token counts against its address, then gets 401).
// Every response carries the X-RateLimit headers.
type writeGate struct {
	log      *slog.Logger
	cfg      config
	tel      *telemetry
	clients  limiter // per address
	perToken limiter // per valid token; nil without AUTH_TOKENS
	tokens   *tokenSet
	now      func() time.Time
}

// guard applies the gate to next. credential finds the request's token;
// fail answers the gate's own errors (writeError, or the InfluxDB form).
// When the limiter's store fails, the request goes on
// (RATE_LIMIT_FAIL_CLOSED=false) or gets 503.
func (g *writeGate) guard(credential func(*http.Request) string, fail func(http.ResponseWriter, int, string), challenge string, next http.Handler) http.Handler {
	var lastLogged atomic.Int64
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t := g.now()
		lim, key, limit, authorized := g.clients, "", g.cfg.RateLimit, true
		if g.tokens.enabled() {
			var id string
			if id, authorized = g.tokens.match(credential(r)); authorized {
				lim, key, limit = g.perToken, "token:"+id, g.cfg.TokenRateLimit
			}
		}
		if key == "" {
			key = clientKey(r, g.cfg.TrustedProxies)
		}
		d, err := lim.allow(r.Context(), key, t)
		if err != nil {
			g.tel.rateLimitStoreErrs.Add(1)
			// Logged at most once a second: during an outage every request
			// fails the same way.
			if sec := t.Unix(); lastLogged.Swap(sec) != sec {
				g.log.Warn("rate limiter store unavailable", "err", err, "fail_closed", g.cfg.RateLimitFailClosed)
			}
			_, reset := windowOf(t, g.cfg.RateWindow)
			// Nothing was counted, so the whole limit is shown as remaining.
			d = decision{allowed: true, limit: limit, remaining: limit, reset: reset}
		}
		// Set directly in canonical form, as Header.Set would store them,
		// without canonicalising on every request.
		h := w.Header()
		h["X-Ratelimit-Limit"] = []string{strconv.Itoa(d.limit)}
		h["X-Ratelimit-Remaining"] = []string{strconv.Itoa(d.remaining)}
		resetSecs := strconv.FormatInt(ceilSeconds(d.reset), 10)
		h["X-Ratelimit-Reset"] = []string{resetSecs}
		switch {
		case err != nil && g.cfg.RateLimitFailClosed:
			h.Set("Retry-After", "1")
			fail(w, http.StatusServiceUnavailable, "rate limiter unavailable, try again shortly")
		case !d.allowed:
			g.tel.rateLimitRejected.Add(1)
			h.Set("Retry-After", resetSecs)
			fail(w, http.StatusTooManyRequests, "Too many requests")
		case !authorized:
			h.Set("WWW-Authenticate", challenge)
			fail(w, http.StatusUnauthorized, "a token from AUTH_TOKENS is needed: Authorization: "+challenge+" <token>")
		case g.tokens.enabled():
			// The handler learns whose request it is (onceScope).
			next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), tokenScope{}, key)))
		default:
			next.ServeHTTP(w, r)
		}
	})
}

// ceilSeconds rounds up, and to at least 1, so a client that waits that
// long is always in the next window.
func ceilSeconds(d time.Duration) int64 {
	return max(1, int64((d+time.Second-1)/time.Second))
}

// ---- memory ----

// memoryLimiter counts each client's requests in the current window with an
// atomic counter, so concurrent requests are admitted exactly. Counters of
// past windows are dropped by sweep, which run calls in the background:
// never by allow, since a sweep ranges over every counter (a third of a
// second after a million clients) and no request should wait for that.
type memoryLimiter struct {
	limit  int
	window time.Duration

	counts sync.Map     // limiterKey -> *atomic.Int64
	swept  atomic.Int64 // the window of the last sweep
}

type limiterKey struct {
	client string
	window int64
}

func newMemoryLimiter(limit int, window time.Duration) *memoryLimiter {
	m := &memoryLimiter{limit: limit, window: window}
	m.swept.Store(math.MinInt64) // the first sweep runs, whatever the window
	return m
}

func (m *memoryLimiter) allow(_ context.Context, client string, now time.Time) (decision, error) {
	idx, reset := windowOf(now, m.window)
	k := limiterKey{client, idx}
	v, ok := m.counts.Load(k)
	if !ok {
		v, _ = m.counts.LoadOrStore(k, new(atomic.Int64))
	}
	return decide(v.(*atomic.Int64).Add(1), m.limit, reset), nil
}

// sweep drops the counters of windows before the one preceding now's. The
// previous window's counters stay one window more: a request that read the
// time just before the boundary may still be counting in it, and must not
// find its counter gone. Only the first sweep in a window does any work, so
// it can be called often.
func (m *memoryLimiter) sweep(now time.Time) {
	idx, _ := windowOf(now, m.window)
	prev := m.swept.Load()
	if prev >= idx || !m.swept.CompareAndSwap(prev, idx) {
		return
	}
	m.counts.Range(func(k, _ any) bool {
		if k.(limiterKey).window < idx-1 {
			m.counts.Delete(k)
		}
		return true
	})
}

// limiterSweepEvery is how often run calls the memory limiter's sweep: four
// times a window, so a window's counters go within a quarter window of
// the moment they may, but not more often than every 100 ms however short
// the window.
func limiterSweepEvery(window time.Duration) time.Duration {
	return max(window/4, 100*time.Millisecond)
}

// ---- Redis ----

// redisLimiter keeps one counter per client and window, created with its
// expiry in the same script call, so no key can outlive its window for
// long, whatever fails between calls.
type redisLimiter struct {
	pool    *redisPool
	keys    keys
	limit   int
	window  time.Duration
	timeout time.Duration // LIMITER_TIMEOUT: the most one decision may wait
}

func newRedisLimiter(pool *redisPool, prefix string, limit int, window, timeout time.Duration) *redisLimiter {
	return &redisLimiter{pool: pool, keys: keys{prefix}, limit: limit, window: window, timeout: timeout}
}

//go:embed lua/limit.lua
var limitLua string

var limitScript = newScript(limitLua)

// limiterClockSkew keeps a counter a little past its window's end, so an
// instance whose clock runs behind still finds it.
const limiterClockSkew = time.Second

func (l *redisLimiter) key(client string, idx int64) string {
	return l.keys.limiter(client, idx)
}

func (l *redisLimiter) allow(ctx context.Context, client string, now time.Time) (d decision, err error) {
	idx, reset := windowOf(now, l.window)
	ttl := (reset + limiterClockSkew).Milliseconds()
	ctx, cancel := context.WithTimeout(ctx, l.timeout)
	defer cancel()
	err = l.pool.with(ctx, "ratelimit", func(c redis.Conn, deadline time.Time) error {
		n, err := redis.Int64(limitScript.run(c, deadline, []string{l.key(client, idx)}, ttl))
		d = decide(n, l.limit, reset)
		return err
	})
	return d, err
}

// Command analytics is a small realtime metrics service: it ingests samples,
// serves per-type summaries through a read-through cache, rate-limits
// clients and guards an external service with a circuit breaker. State lives
// in this process (STORE=memory) or in Redis (STORE=redis), where any number
// of instances share it.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	switch act, code := parseCommandLine(os.Args[1:], os.Stdout, os.Stderr); act {
	case actExit:
		os.Exit(code)
	case actHealthcheck:
		if err := healthcheck(os.Getenv); err != nil {
			fmt.Fprintln(os.Stderr, "unhealthy:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(context.Background(), os.Getenv, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "analytics:", err)
		os.Exit(1)
	}
}

// shutdownTimeout bounds how long in-flight requests may take to finish
// after SIGTERM. Orchestrators' stop grace periods must be longer.
const shutdownTimeout = 10 * time.Second

// run is the whole program: it returns when ctx is cancelled or a signal
// arrives (nil after a clean shutdown), or at once when the configuration
// is invalid or the address is taken.
func run(ctx context.Context, getenv func(string) string, stdout io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	cfg, err := loadConfig(getenv)
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	logOut := newLogBuffer(stdout)
	defer logOut.stop()
	log := slog.New(slog.NewJSONHandler(logOut, &slog.HandlerOptions{Level: cfg.LogLevel}))

	tel := newTelemetry()
	b, closeBackend, err := openBackend(cfg, tel, log)
	if err != nil {
		return err
	}
	defer closeBackend()

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("ADDR=%q: %w", cfg.Addr, err)
	}
	srv := &http.Server{
		Handler:           newHandler(log, cfg, tel, b),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		// Long enough for the slowest answer: an external call that runs
		// to EXTERNAL_TIMEOUT, then its fallback.
		WriteTimeout:   max(15*time.Second, cfg.ExternalTimeout+5*time.Second),
		IdleTimeout:    60 * time.Second,
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	// Streams end when shutdown begins: Shutdown waits for handlers, and a
	// stream's would not return by itself.
	srv.RegisterOnShutdown(b.hub.shutdown)
	// Deferred after closeBackend, so it runs first: the upkeep has
	// stopped before the backend closes.
	stopUpkeep := startUpkeep(ctx, cfg, b, log)
	defer stopUpkeep()

	log.Info("listening", "addr", ln.Addr().String(), "store", cfg.Store)
	logOut.Flush()

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	stop() // a second signal now ends the process at once
	log.Info("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	log.Info("stopped")
	return nil
}

// backend is every stateful component, all in memory or all in Redis.
type backend struct {
	store   metricStore
	reader  *reader
	limiter limiter // per client address, at RATE_LIMIT
	// tokenLimiter counts the writes of each valid token, at
	// TOKEN_RATE_LIMIT.
	tokenLimiter limiter
	ping         func(context.Context) error
	now          func() time.Time
	// hub sends the live streams what ingests add. announce hands it an
	// acknowledged ingest, in process; nil for Redis, whose ingest script
	// publishes to every instance's subscriber, which listen runs (nil
	// for memory).
	hub      *hub
	announce func([]typeBatch, time.Time)
	listen   func(ctx context.Context, log *slog.Logger)
	// sweep drops what has expired from the memory store, cache and
	// limiter; run calls it in the background. Nil for Redis, whose keys
	// expire by themselves.
	sweep func(time.Time)
	// compact merges the records of grown Redis buckets; run calls it in
	// the background. Nil for memory.
	compact func(context.Context) error
	// deleted tells this instance's streams that a type lost data; nil for
	// Redis, whose delete script tells every instance's.
	deleted func(typ string)
	// reclaim deletes, a few at a time, the keys Redis deletes leave;
	// run calls it in the background too.
	reclaim func(context.Context) error
}

// openBackend builds the configured backend and returns the function that
// releases it. With Redis it does not wait for Redis to be reachable: the
// pool dials on demand, so the service answers 503 until Redis is up.
func openBackend(cfg config, tel *telemetry, log *slog.Logger) (backend, func(), error) {
	switch cfg.Store {
	case "redis":
		pool := newRedisPool(cfg, tel)
		return newRedisBackend(pool, cfg.RedisPrefix, cfg, time.Now), func() {
			if err := pool.Close(); err != nil {
				log.Warn("closing redis pool", "err", err)
			}
		}, nil
	default:
		return newMemoryBackend(cfg, time.Now), func() {}, nil
	}
}

func newMemoryBackend(cfg config, now func() time.Time) backend {
	s := newMemoryStore(cfg.Retention, cfg.MaxTypes, cfg.MaxSeries)
	s.forget = graveLifetime(cfg.CacheTTL)
	c := newMemoryCacheStore(s.version, cfg.CacheTTL, cfg.CacheMaxEntries, now)
	lim := newMemoryLimiter(cfg.RateLimit, cfg.RateWindow)
	tokenLim := newMemoryLimiter(cfg.TokenRateLimit, cfg.RateWindow)
	h := newHub(cfg.MaxStreams)
	return backend{
		hub: h,
		announce: func(batches []typeBatch, t time.Time) {
			if !h.idle() {
				h.publish(updatesOf(batches, t.Unix(), cfg.Retention))
			}
		},
		deleted: func(typ string) {
			if !h.idle() {
				h.publish([]update{{typ: typ, resync: resyncDeleted}})
			}
		},
		store:        s,
		reader:       &reader{store: s, cache: newReadCache(c), horizon: cfg.Retention, now: now},
		limiter:      lim,
		tokenLimiter: tokenLim,
		ping:         func(context.Context) error { return nil },
		now:          now,
		sweep: func(t time.Time) {
			s.sweep(t)
			c.sweep(t)
			lim.sweep(t)
			tokenLim.sweep(t)
		},
	}
}

// newRedisBackend keeps every key under prefix, so deployments (and tests)
// can share one redis-server without touching each other's data.
func newRedisBackend(pool *redisPool, prefix string, cfg config, now func() time.Time) backend {
	k := keys{prefix: prefix}
	s := newRedisStore(pool, k, cfg.Retention, cfg.MaxTypes, cfg.MaxSeries)
	s.cluster = pool.cluster != nil
	s.grouped = cfg.RedisPipeline
	s.cacheTTL = cfg.CacheTTL
	h := newHub(cfg.MaxStreams)
	return backend{
		hub: h,
		listen: func(ctx context.Context, log *slog.Logger) {
			sub := &subscriber{dial: pool.dialOwn, channel: k.streamChannel(), hub: h, tel: pool.tel, log: log,
				timeout: pool.timeout, pingEvery: 5 * time.Second, pongWait: 10 * time.Second,
				retryFirst: 100 * time.Millisecond, retryMax: time.Second}
			sub.run(ctx)
		},
		store:        s,
		reader:       &reader{store: s, cache: newReadCache(newRedisCacheStore(pool, k, cfg.CacheTTL, cfg.CacheMaxEntries)), horizon: cfg.Retention, now: now},
		limiter:      newRedisLimiter(pool, prefix, cfg.RateLimit, cfg.RateWindow, cfg.LimiterTimeout),
		tokenLimiter: newRedisLimiter(pool, prefix, cfg.TokenRateLimit, cfg.RateWindow, cfg.LimiterTimeout),
		ping:         pool.ping,
		now:          now,
		compact:      s.compact,
		reclaim:      s.reclaim,
	}
}

// newHandler lists every route in one place.
func newHandler(log *slog.Logger, cfg config, tel *telemetry, b backend) http.Handler {
	// The breaker is per process whatever STORE is, like every mainstream
	// breaker: it reacts to what this instance sees of the service.
	brk := newBreaker(breakerSettings{
		threshold:    cfg.BreakerThreshold,
		resetTimeout: cfg.BreakerResetTimeout,
		now:          b.now,
		log:          log,
		onTransition: tel.transition,
	})
	mux := http.NewServeMux()
	handle := func(pattern string, h http.Handler) {
		tel.addRoute(pattern)
		mux.Handle(pattern, h)
	}
	handle("GET /health", handleHealth(log, b.ping))
	gate := &writeGate{log: log, cfg: cfg, tel: tel, clients: b.limiter, perToken: b.tokenLimiter, tokens: newTokenSet(cfg.AuthTokens), now: b.now}
	handle("POST /api/metrics", gate.guard(bearerToken, writeError, "Bearer", handleIngest(log, cfg, tel, b.store, b.announce, b.now)))
	// The InfluxDB write APIs, v1 and v2: one handler, one limit.
	lines := gate.guard(influxToken, writeInfluxError, "Token", handleLineProtocol(log, cfg, tel, b.store, b.announce, b.now))
	handle("POST /write", lines)
	handle("POST /api/v2/write", lines)
	// Deleting needs a token, so it needs AUTH_TOKENS: refused without,
	// counted against the rate limit all the same.
	deleting := handleDeleteRefused()
	if gate.tokens.enabled() {
		deleting = handleDelete(log, b.store, b.reader.cache, b.deleted, b.now)
	}
	handle("DELETE /api/metrics", gate.guard(bearerToken, writeError, "Bearer", deleting))
	handle("GET /api/metrics/summary", gate.readGate(handleSummary(log, b.reader)))
	handle("GET /api/metrics/series", gate.readGate(handleSeries(log, b.reader)))
	handle("GET /api/metrics/types", gate.readGate(handleTypes(log, b.reader)))
	handle("GET /api/metrics/labels", gate.readGate(handleLabels(log, b.reader)))
	handle("GET /api/metrics/stream", gate.readGate(handleStream(log, b.hub)))
	handle("GET /{$}", handleDashboard())
	handle("GET /assets/{file}", handleDashboard())
	handle("GET /external", handleExternal(log, brk, newExternalService(cfg), cfg.ExternalTimeout))
	// GET patterns also match HEAD, and a HEAD must not call the service
	// and move the breaker.
	handle("HEAD /external", methodNotAllowed("GET"))
	handle("GET /metrics", handleMetrics(tel, b.reader.cache, brk, b.hub))
	handle("GET /openapi.json", handleOpenAPI())
	handle("GET /docs", handleDocs())
	return instrument(log, tel, mux, newCORSPolicy(cfg.CORSOrigins))
}

func handleHealth(log *slog.Logger, ping func(context.Context) error) http.Handler {
	ok := []byte(`{"status":"ok"}` + "\n")
	down := []byte(`{"status":"unavailable","detail":"store unavailable"}` + "\n")
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := ping(r.Context()); err != nil {
			// The cause (addresses, errors) goes to the log, not to callers.
			log.Warn("health check failed", "err", err)
			writeRaw(w, http.StatusServiceUnavailable, down)
			return
		}
		writeRaw(w, http.StatusOK, ok)
	})
}

func methodNotAllowed(allow string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", allow)
		writeError(w, http.StatusMethodNotAllowed, "method not allowed")
	})
}

// writeJSON answers with v as JSON. Encoding errors can only come from the
// connection, so they are not reported.
func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		// Only a programming error gets here: every type written is plain.
		panic(fmt.Sprintf("writeJSON %T: %v", v, err))
	}
	writeRaw(w, status, append(body, '\n'))
}

var jsonContentType = []string{"application/json"}

// writeRaw answers with a body that is already JSON. Headers are set in
// canonical form directly, as Header.Set would store them, to skip the
// canonicalisation on every answer.
func writeRaw(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	h["Content-Type"] = jsonContentType
	h["Content-Length"] = []string{strconv.Itoa(len(body))}
	w.WriteHeader(status)
	w.Write(body)
}

// writeError answers with the project's one error shape.
func writeError(w http.ResponseWriter, status int, detail string) {
	writeJSON(w, status, errorBody{Detail: detail})
}

type errorBody struct {
	Detail string `json:"detail"`
}

// requestError is a problem with the request itself: its status is a 4xx
// and its message is safe to show the client.
type requestError struct {
	status int
	detail string
}

func (e *requestError) Error() string { return e.detail }

func unprocessable(format string, args ...any) error {
	return &requestError{status: http.StatusUnprocessableEntity, detail: fmt.Sprintf(format, args...)}
}

// writeFailure is the one place an error becomes a status. A requestError
// is the client's; anything else means a dependency (the store) failed, and
// it is logged here, once, and answered with 503.
func writeFailure(w http.ResponseWriter, r *http.Request, log *slog.Logger, err error) {
	var re *requestError
	if errors.As(err, &re) {
		if re.status == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", "1")
		}
		writeError(w, re.status, re.detail)
		return
	}
	log.Warn("store unavailable", "method", r.Method, "path", r.URL.Path, "err", err)
	w.Header().Set("Retry-After", "1")
	if stored := storedTypes(err); stored != nil {
		writeJSON(w, http.StatusServiceUnavailable, partlyStoredBody{Detail: partlyStoredDetail, Stored: stored})
		return
	}
	writeError(w, http.StatusServiceUnavailable, "store unavailable, try again shortly")
}

// partlyStoredDetail is the 503 of an ingest that a Redis Cluster stored
// only part of: the types it names are stored.
const partlyStoredDetail = "store unavailable: only the types in stored were stored; retry with the same Idempotency-Key to store the rest"

type partlyStoredBody struct {
	Detail string   `json:"detail"`
	Stored []string `json:"stored"`
}

// storedTypes is the types a partly stored ingest stored; nil for any other
// error.
func storedTypes(err error) []string {
	var ps *partlyStoredError
	if errors.As(err, &ps) {
		return ps.stored
	}
	return nil
}

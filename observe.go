package main

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"runtime/debug"
	"strconv"
	"sync"
	"time"
)

// instrument is the outermost handler. It finds the request's route, gives
// the request an id, turns a panic into a 500, answers the mux's own 404
// and 405 as JSON, and writes one access log line and the request's
// metrics, all labelled with the route pattern, never the raw path.
//
// It also applies the CORS policy, which may answer a preflight itself.
func instrument(log *slog.Logger, tel *telemetry, mux *http.ServeMux, cors *corsPolicy) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		h, route := mux.Handler(r)
		rec := &recorder{ResponseWriter: w}
		if route == "" {
			route = unmatchedRoute // the mux's own 404 or 405
		}
		id := requestID(r.Header.Get("X-Request-ID"))
		w.Header()["X-Request-Id"] = []string{id}

		defer func() {
			p := recover()
			abort := p == http.ErrAbortHandler
			if p != nil && !abort {
				log.Error("panic serving request", "route", route, "request_id", id,
					"panic", fmt.Sprint(p), "stack", string(debug.Stack()))
				if rec.code == 0 {
					writeError(rec, http.StatusInternalServerError, "internal error")
				} else {
					abort = true // the answer had begun: all that is left is to cut it
				}
			}
			if rec.code == 0 {
				rec.code = http.StatusOK // a handler that wrote nothing
			}
			d := time.Since(start)
			tel.observe(route, rec.code, d)
			if log.Enabled(r.Context(), slog.LevelInfo) {
				log.LogAttrs(r.Context(), slog.LevelInfo, "request",
					slog.String("method", r.Method),
					slog.String("route", route),
					slog.Int("status", rec.code),
					slog.Float64("duration_ms", float64(d.Microseconds())/1000),
					slog.String("client", r.RemoteAddr),
					slog.String("request_id", id))
			}
			if abort {
				panic(http.ErrAbortHandler)
			}
		}()
		routed := func(method string) bool {
			probe := *r
			probe.Method = method
			_, pattern := mux.Handler(&probe)
			return pattern != ""
		}
		if !cors.apply(rec, r, routed) {
			h.ServeHTTP(rec, r)
		}
	})
}

// recorder remembers the status a handler answered with. It also turns
// the answers ServeMux writes itself, in plain text or HTML, into JSON: a
// 404, a 405 (keeping Allow) and the redirect to a cleaned path (keeping
// Location). The service's own handlers always answer in JSON or, for
// /metrics, with a 200.
type recorder struct {
	http.ResponseWriter
	code    int
	discard bool // drop the mux's own body that follows
}

var muxAnswers = map[int]string{
	http.StatusNotFound:          "not found",
	http.StatusMethodNotAllowed:  "method not allowed",
	http.StatusMovedPermanently:  "moved: use the path in Location",
	http.StatusTemporaryRedirect: "moved: use the path in Location",
	http.StatusPermanentRedirect: "moved: use the path in Location",
}

func (r *recorder) WriteHeader(code int) {
	if r.code != 0 {
		return
	}
	r.code = code
	if detail, ok := muxAnswers[code]; ok && r.Header().Get("Content-Type") != "application/json" {
		r.discard = true
		r.Header().Del("X-Content-Type-Options")
		writeError(r.ResponseWriter, code, detail)
		return
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.code == 0 {
		r.WriteHeader(http.StatusOK)
	}
	if r.discard {
		return len(p), nil
	}
	return r.ResponseWriter.Write(p)
}

// FlushError sends what is buffered, for streams; a handler that flushes
// before writing answers 200, as net/http's own writer would.
func (r *recorder) FlushError() error {
	if r.code == 0 {
		r.WriteHeader(http.StatusOK)
	}
	return http.NewResponseController(r.ResponseWriter).Flush()
}

// Flush is FlushError for callers that look for http.Flusher.
func (r *recorder) Flush() { r.FlushError() }

// Unwrap lets http.ResponseController reach the connection's writer.
func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// requestID returns the client's X-Request-ID when it is sane (1 to 128
// characters from A-Z a-z 0-9 . _ -), or a new random one.
func requestID(given string) string {
	if len(given) > 0 && len(given) <= 128 {
		ok := true
		for i := 0; i < len(given) && ok; i++ {
			c := given[i]
			ok = 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-'
		}
		if ok {
			return given
		}
	}
	var b [16]byte
	return string(strconv.AppendUint(b[:0], rand.Uint64(), 36))
}

// healthcheck asks the server at ADDR for /health. It is the container's
// health check (-healthcheck), since the image has no curl.
func healthcheck(getenv func(string) string) error {
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	host, port, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return fmt.Errorf("ADDR=%q: %w", cfg.Addr, err)
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1" // listening on every address includes loopback
	}
	client := &http.Client{Timeout: 3 * time.Second}
	res, err := client.Get("http://" + net.JoinHostPort(host, port) + "/health")
	if err != nil {
		return err
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /health: %s", res.Status)
	}
	return nil
}

// logBuffer batches log lines into fewer writes: a write to stdout for
// every access line cost about a twentieth of a request's CPU. Lines reach
// the output within logFlushEvery, or sooner when the buffer fills; stop
// writes out the rest.
type logBuffer struct {
	mu   sync.Mutex
	w    *bufio.Writer
	done chan struct{}
	wg   sync.WaitGroup
}

const logFlushEvery = 100 * time.Millisecond

func newLogBuffer(out io.Writer) *logBuffer {
	b := &logBuffer{w: bufio.NewWriterSize(out, 64<<10), done: make(chan struct{})}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		t := time.NewTicker(logFlushEvery)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				b.Flush()
			case <-b.done:
				return
			}
		}
	}()
	return b
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.w.Write(p)
}

func (b *logBuffer) Flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.w.Flush()
}

// stop ends the periodic flushing and writes out what is buffered.
func (b *logBuffer) stop() {
	close(b.done)
	b.wg.Wait()
	b.Flush()
}

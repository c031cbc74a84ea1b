package main

import (
	"bufio"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"sync/atomic"
	"time"
)

// telemetry holds the counters GET /metrics exposes. Everything on a
// request's path is an atomic add on a series that exists before the first
// request, so counting never takes a lock that all requests share.
type telemetry struct {
	routes map[string]*routeStats // by route pattern; fixed once serving starts

	ingested           atomic.Uint64
	rateLimitRejected  atomic.Uint64
	rateLimitStoreErrs atomic.Uint64
	transitions        [3][3]atomic.Uint64 // [from][to]

	storeErrs map[string]*atomic.Uint64 // by op, one of storeOps
	refusals  map[string]*atomic.Uint64 // samples refused, by reason, one of refusalReasons

	redisConns *atomic.Int64 // the Redis pool's open connections; nil without Redis

	pipeBatches  sizeHistogram // commands per write of the Redis pipeline
	ingestGroups sizeHistogram // ingests per run of the Redis ingest script
}

// sizeHistogram counts sizes (commands in a write, ingests in a run) per
// sizeBuckets, not cumulative, the last for more, and adds them up.
type sizeHistogram struct {
	counts [len(sizeBuckets) + 1]atomic.Uint64
	sum    atomic.Uint64
}

// sizeBuckets are the upper bounds of a sizeHistogram's buckets.
var sizeBuckets = [...]float64{1, 2, 4, 8, 16, 32, 64, 128, 256}

// observe counts one size n.
func (h *sizeHistogram) observe(n int) {
	i := 0
	for i < len(sizeBuckets) && float64(n) > sizeBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sum.Add(uint64(n))
}

// storeOps are the store operations whose failures are counted.
var storeOps = []string{"ingest", "read", "delete", "reclaim", "compact", "cache_get", "cache_put", "cache_purge", "ratelimit", "ping", "subscribe", "cluster_slots"}

// refusalReasons are why samples are refused for a limit.
var refusalReasons = []string{"max_types", "max_series", "retention", "future"}

// unmatchedRoute labels requests no route matched (404, 405), so that raw
// paths never become label values.
const unmatchedRoute = "unmatched"

// durationBuckets are the upper bounds, in seconds, of the request
// duration histogram: from a cache hit to a request at its deadline.
var durationBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

type routeStats struct {
	codes    [600]atomic.Uint64 // by status code
	buckets  []atomic.Uint64    // per durationBuckets, not cumulative
	count    atomic.Uint64
	sumNanos atomic.Int64
}

func newTelemetry() *telemetry {
	t := &telemetry{routes: make(map[string]*routeStats), storeErrs: make(map[string]*atomic.Uint64),
		refusals: make(map[string]*atomic.Uint64)}
	t.addRoute(unmatchedRoute)
	for _, op := range storeOps {
		t.storeErrs[op] = new(atomic.Uint64)
	}
	for _, r := range refusalReasons {
		t.refusals[r] = new(atomic.Uint64)
	}
	return t
}

// addRoute makes a route's series. It must not run once requests are being
// served: the map is read without a lock.
func (t *telemetry) addRoute(pattern string) {
	t.routes[pattern] = &routeStats{buckets: make([]atomic.Uint64, len(durationBuckets))}
}

// observe counts one finished request.
func (t *telemetry) observe(route string, code int, d time.Duration) {
	rs := t.routes[route]
	if rs == nil {
		rs = t.routes[unmatchedRoute]
	}
	if code >= 100 && code < len(rs.codes) {
		rs.codes[code].Add(1)
	}
	secs := d.Seconds()
	if i, _ := slices.BinarySearch(durationBuckets, secs); i < len(durationBuckets) {
		rs.buckets[i].Add(1)
	}
	rs.count.Add(1)
	rs.sumNanos.Add(int64(d))
}

// storeError counts one failed store operation. A nil telemetry counts
// nothing, for components used without a server.
func (t *telemetry) storeError(op string) {
	if t != nil {
		t.storeErrs[op].Add(1)
	}
}

// refused counts n samples refused for reason.
func (t *telemetry) refused(reason string, n int) {
	t.refusals[reason].Add(uint64(n))
}

func (t *telemetry) transition(from, to state) {
	t.transitions[from][to].Add(1)
}

var breakerStates = []state{stateClosed, stateOpen, stateHalfOpen}

// handleMetrics writes the Prometheus text exposition format, version 0.0.4.
// Families come in a fixed order and series in sorted order, so two
// scrapes differ only in their numbers.
func handleMetrics(t *telemetry, cache *readCache, brk *breaker, h *hub) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		bw := bufio.NewWriter(w)
		p := promWriter{bw}
		routes := slices.Sorted(maps.Keys(t.routes))

		p.family("http_requests_total", "counter", "HTTP requests answered, by route pattern and status code.")
		for _, route := range routes {
			rs := t.routes[route]
			for code := range rs.codes {
				if n := rs.codes[code].Load(); n > 0 {
					p.sample("http_requests_total", n, "route", route, "code", strconv.Itoa(code))
				}
			}
		}

		p.family("http_request_duration_seconds", "histogram", "Time to answer an HTTP request, by route pattern.")
		for _, route := range routes {
			rs := t.routes[route]
			var cum uint64
			for i, le := range durationBuckets {
				cum += rs.buckets[i].Load()
				p.sample("http_request_duration_seconds_bucket", cum, "route", route, "le", strconv.FormatFloat(le, 'g', -1, 64))
			}
			n := rs.count.Load()
			p.sample("http_request_duration_seconds_bucket", n, "route", route, "le", "+Inf")
			p.sampleFloat("http_request_duration_seconds_sum", time.Duration(rs.sumNanos.Load()).Seconds(), "route", route)
			p.sample("http_request_duration_seconds_count", n, "route", route)
		}

		for _, c := range []struct {
			name, help string
			v          uint64
		}{
			{"metrics_ingested_total", "Samples stored; a batch counts each of its samples.", t.ingested.Load()},
			{"summary_cache_hits_total", "Summaries and series served from the cache.", cache.hits.Load()},
			{"summary_cache_misses_total", "Summaries and series computed from the store.", cache.misses.Load()},
			{"ratelimit_rejected_total", "Requests refused with 429 by the rate limiter.", t.rateLimitRejected.Load()},
			{"ratelimit_store_errors_total", "Rate limiter store failures, whether the request then failed open or closed.", t.rateLimitStoreErrs.Load()},
			{"stream_dropped_total", "Event streams resynced or closed for falling too far behind.", h.dropped.Load()},
		} {
			p.family(c.name, "counter", c.help)
			p.sample(c.name, c.v)
		}

		p.family("breaker_state", "gauge", "The external service breaker's state: 1 for the current one, 0 for the others.")
		current := brk.state()
		for _, s := range breakerStates {
			p.sample("breaker_state", boolUint(s == current), "state", s.String())
		}
		p.family("breaker_transitions_total", "counter", "Breaker state changes, by from and to state.")
		for _, from := range breakerStates {
			for _, to := range breakerStates {
				if from != to {
					p.sample("breaker_transitions_total", t.transitions[from][to].Load(), "from", from.String(), "to", to.String())
				}
			}
		}

		p.family("stream_clients", "gauge", "Event streams open on this instance.")
		p.sample("stream_clients", uint64(h.open.Load()))

		if t.redisConns != nil {
			p.family("redis_connections_open", "gauge", "Connections open to Redis.")
			p.sample("redis_connections_open", uint64(max(0, t.redisConns.Load())))
		}

		p.histogram("redis_pipeline_batch_size", "Commands per write of the Redis pipeline.", &t.pipeBatches)
		p.histogram("redis_ingest_group_size", "Ingests applied together by one run of the Redis ingest script.", &t.ingestGroups)

		p.family("ingest_refused_total", "counter", "Samples refused for a limit, by reason; a refused batch counts each of its samples.")
		for _, r := range refusalReasons {
			p.sample("ingest_refused_total", t.refusals[r].Load(), "reason", r)
		}

		p.family("store_errors_total", "counter", "Failed store operations, by operation.")
		for _, op := range slices.Sorted(maps.Keys(t.storeErrs)) {
			p.sample("store_errors_total", t.storeErrs[op].Load(), "op", op)
		}
		bw.Flush()
	})
}

func boolUint(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

// promWriter writes lines of the text format. Label values here are route
// patterns, status codes and names from the code, so they never hold the
// characters the format would need escaped; escape handles them anyway.
type promWriter struct{ w *bufio.Writer }

// histogram writes h as the histogram name.
func (p promWriter) histogram(name, help string, h *sizeHistogram) {
	p.family(name, "histogram", help)
	var cum uint64
	for i, le := range sizeBuckets {
		cum += h.counts[i].Load()
		p.sample(name+"_bucket", cum, "le", strconv.FormatFloat(le, 'g', -1, 64))
	}
	cum += h.counts[len(sizeBuckets)].Load()
	p.sample(name+"_bucket", cum, "le", "+Inf")
	p.sample(name+"_sum", h.sum.Load())
	p.sample(name+"_count", cum)
}

func (p promWriter) family(name, typ, help string) {
	p.w.WriteString("# HELP " + name + " " + help + "\n# TYPE " + name + " " + typ + "\n")
}

func (p promWriter) labels(kv []string) {
	if len(kv) == 0 {
		return
	}
	p.w.WriteByte('{')
	for i := 0; i < len(kv); i += 2 {
		if i > 0 {
			p.w.WriteByte(',')
		}
		p.w.WriteString(kv[i] + `="` + escapeLabel(kv[i+1]) + `"`)
	}
	p.w.WriteByte('}')
}

func (p promWriter) sample(name string, v uint64, kv ...string) {
	p.w.WriteString(name)
	p.labels(kv)
	p.w.WriteString(" " + strconv.FormatUint(v, 10) + "\n")
}

func (p promWriter) sampleFloat(name string, v float64, kv ...string) {
	p.w.WriteString(name)
	p.labels(kv)
	p.w.WriteString(" " + strconv.FormatFloat(v, 'g', -1, 64) + "\n")
}

func escapeLabel(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\\':
			out = append(out, '\\', '\\')
		case '"':
			out = append(out, '\\', '"')
		case '\n':
			out = append(out, '\\', 'n')
		default:
			out = append(out, c)
		}
	}
	return string(out)
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gomodule/redigo/redis"
)

// sample is one validated metric sample.
type sample struct {
	typ   string
	at    int64 // Unix microseconds, UTC
	value float64
}

// window selects samples with from <= at < to; open ends are the extremes
// of int64, so the zero window is not "everything": use allTime.
type window struct{ from, to int64 }

var allTime = window{math.MinInt64, math.MaxInt64}

// stats are the running aggregates of a set of samples.
type stats struct {
	count    int64
	sum      float64
	min, max float64
}

func (s *stats) add(v float64) {
	if s.count == 0 || v < s.min {
		s.min = v
	}
	if s.count == 0 || v > s.max {
		s.max = v
	}
	s.count++
	s.sum += v
}

// metricStore keeps samples and answers summaries. add is atomic: a
// concurrent summarize sees all of one call's samples of a type or none.
// summarize also returns the type's version, a number that every add of
// that type increases, read in the same atomic step as the stats.
type metricStore interface {
	add(ctx context.Context, samples []sample) error
	summarize(ctx context.Context, typ string, w window) (stats, uint64, error)
}

// tooManyTypesError refuses an ingest that would create a metric type
// beyond MAX_TYPES; typ is the first such type, in name order.
type tooManyTypesError struct{ typ string }

func (e *tooManyTypesError) Error() string { return "too many metric types: " + e.typ }

// ---- HTTP handlers ----

var (
	storedOne = []byte(`{"message":"Metric stored successfully"}` + "\n")
)

func handleIngest(log *slog.Logger, cfg config, tel *telemetry, store metricStore) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		samples, batch, err := readSamples(w, r, cfg)
		if err == nil {
			err = store.add(r.Context(), samples)
		}
		if tm := (*tooManyTypesError)(nil); errors.As(err, &tm) {
			err = unprocessable("%stype %q is new, and the limit of %d distinct metric types is reached",
				itemPrefix(samples, batch, tm.typ), tm.typ, cfg.MaxTypes)
		}
		if err != nil {
			writeFailure(w, r, log, err)
			return
		}
		tel.ingested.Add(uint64(len(samples)))
		if !batch {
			writeRaw(w, http.StatusCreated, storedOne)
			return
		}
		writeJSON(w, http.StatusCreated, struct {
			Message string `json:"message"`
			Count   int    `json:"count"`
		}{"Metrics stored successfully", len(samples)})
	})
}

// itemPrefix names the first sample of type typ, for messages about a
// batch.
func itemPrefix(samples []sample, batch bool, typ string) string {
	if !batch {
		return ""
	}
	for i, s := range samples {
		if s.typ == typ {
			return fmt.Sprintf("item %d: ", i)
		}
	}
	return ""
}

func handleSummary(log *slog.Logger, summaries *summaryCache) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		typ, win, err := parseSummaryQuery(r.URL.Query())
		if err != nil {
			writeFailure(w, r, log, err)
			return
		}
		body, err := summaries.get(r.Context(), typ, win)
		if err != nil {
			writeFailure(w, r, log, err)
			return
		}
		writeRaw(w, http.StatusOK, body)
	})
}

// ---- validation ----

// readSamples reads and validates the body of an ingest: one metric object
// or an array of them. It reports whether the body was an array.
func readSamples(w http.ResponseWriter, r *http.Request, cfg config) ([]sample, bool, error) {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			return nil, false, &requestError{http.StatusUnsupportedMediaType, "Content-Type must be application/json"}
		}
	}
	tooLarge := &requestError{http.StatusRequestEntityTooLarge, fmt.Sprintf("body exceeds %d bytes", cfg.MaxBodyBytes)}
	if r.ContentLength > cfg.MaxBodyBytes {
		return nil, false, tooLarge
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, cfg.MaxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, false, tooLarge
		}
		return nil, false, &requestError{http.StatusBadRequest, "could not read the body"}
	}
	return parseSamples(body, cfg.MaxBatch)
}

// parseSamples decodes and validates a whole body; it is the part of
// ingest that sees untrusted bytes.
func parseSamples(body []byte, maxBatch int) ([]sample, bool, error) {
	if !json.Valid(body) {
		return nil, false, unprocessable("body is not valid JSON")
	}
	switch firstByte(body) {
	case '{':
		s, err := parseSample(body)
		if err != nil {
			return nil, false, unprocessable("%s", err)
		}
		return []sample{s}, false, nil
	case '[':
		var items []json.RawMessage
		if err := json.Unmarshal(body, &items); err != nil {
			return nil, true, unprocessable("body is not valid JSON")
		}
		if len(items) == 0 {
			return nil, true, unprocessable("batch is empty")
		}
		if len(items) > maxBatch {
			return nil, true, unprocessable("batch has %d metrics, more than the limit of %d", len(items), maxBatch)
		}
		samples := make([]sample, len(items))
		for i, item := range items {
			s, err := parseSample(item)
			if err != nil {
				return nil, true, unprocessable("item %d: %s", i, err)
			}
			samples[i] = s
		}
		return samples, true, nil
	default:
		return nil, false, unprocessable("body must be a metric object or an array of them")
	}
}

func firstByte(b []byte) byte {
	for _, c := range b {
		if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return c
		}
	}
	return 0
}

// maxAbsValue keeps every sum finite in practice: a type would need more
// than 1e8 samples at this magnitude to overflow float64.
const maxAbsValue = 1e300

func parseSample(raw []byte) (sample, error) {
	var in struct {
		Timestamp *string  `json:"timestamp"`
		Value     *float64 `json:"value"`
		Type      *string  `json:"type"`
	}
	if firstByte(raw) != '{' {
		return sample{}, errors.New("must be a metric object")
	}
	if err := json.Unmarshal(raw, &in); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			switch te.Field {
			case "value":
				return sample{}, errors.New("value must be a finite JSON number")
			case "timestamp", "type":
				return sample{}, fmt.Errorf("%s must be a string", te.Field)
			}
		}
		return sample{}, errors.New("must be a metric object")
	}
	switch {
	case in.Timestamp == nil:
		return sample{}, errors.New("timestamp is required")
	case in.Value == nil:
		return sample{}, errors.New("value is required")
	case in.Type == nil:
		return sample{}, errors.New("type is required")
	}
	at, err := parseTimestamp(*in.Timestamp)
	if err != nil {
		return sample{}, fmt.Errorf("timestamp %w", err)
	}
	v := *in.Value
	if math.IsNaN(v) || math.Abs(v) > maxAbsValue {
		return sample{}, fmt.Errorf("value must be a finite number of magnitude at most %g", maxAbsValue)
	}
	if v == 0 {
		v = 0 // -0 is stored as 0, so a minimum never reads "-0"
	}
	if err := validType(*in.Type); err != nil {
		return sample{}, err
	}
	return sample{typ: *in.Type, at: at, value: v}, nil
}

// Timestamps are kept to the microsecond, which Redis sorted-set scores (a
// float64) hold exactly across the accepted range of years.
var (
	minTimestamp = time.Date(1900, 1, 1, 0, 0, 0, 0, time.UTC)
	maxTimestamp = time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC)
)

// parseTimestamp accepts RFC 3339 with or without a zone; no zone means UTC.
// RFC 3339 allows a lowercase "t" and "z", which Go's layout does not.
func parseTimestamp(s string) (int64, error) {
	u := strings.ToUpper(s)
	t, err := time.Parse(time.RFC3339Nano, u)
	if err != nil {
		t, err = time.ParseInLocation("2006-01-02T15:04:05.999999999", u, time.UTC)
	}
	if err != nil {
		return 0, fmt.Errorf("must be RFC 3339, such as 2025-01-01T10:00:00Z or 2025-01-01T10:00:00 (UTC); got %q", truncate(s, 40))
	}
	if t.Before(minTimestamp) || !t.Before(maxTimestamp) {
		return 0, errors.New("must be from the year 1900 up to, not including, 2200")
	}
	return t.UnixMicro(), nil
}

func validType(t string) error {
	if len(t) == 0 || len(t) > 64 {
		return errors.New("type must be 1 to 64 characters")
	}
	for i := 0; i < len(t); i++ {
		c := t[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '.' || c == '-') {
			return errors.New("type may contain only A-Z, a-z, 0-9, '_', '.' and '-'")
		}
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

func parseSummaryQuery(q url.Values) (string, window, error) {
	typ := q.Get("metric_type")
	if typ == "" {
		return "", window{}, unprocessable("metric_type is required")
	}
	if err := validType(typ); err != nil {
		return "", window{}, unprocessable("metric_type: %s", strings.TrimPrefix(err.Error(), "type "))
	}
	w := allTime
	for _, b := range []struct {
		name string
		dst  *int64
	}{{"from", &w.from}, {"to", &w.to}} {
		if s := q.Get(b.name); s != "" {
			at, err := parseTimestamp(s)
			if err != nil {
				return "", window{}, unprocessable("%s %s", b.name, err)
			}
			*b.dst = at
		}
	}
	if w.from > w.to {
		return "", window{}, unprocessable("from must not be after to")
	}
	return typ, w, nil
}

// render is the summary's JSON body. A type with no samples has no min or
// max.
func (s stats) render(typ string) []byte {
	out := struct {
		Type    string   `json:"type"`
		Count   int64    `json:"count"`
		Average float64  `json:"average"`
		Sum     float64  `json:"sum"`
		Min     *float64 `json:"min,omitempty"`
		Max     *float64 `json:"max,omitempty"`
	}{Type: typ, Count: s.count, Sum: finite(s.sum)}
	if s.count > 0 {
		out.Average = finite(s.sum / float64(s.count))
		out.Min, out.Max = &s.min, &s.max
	}
	body, _ := json.Marshal(out) // cannot fail: every float is finite
	return append(body, '\n')
}

// finite clamps a sum that overflowed float64 to the largest finite value,
// since JSON has no infinity.
func finite(f float64) float64 {
	return math.Max(-math.MaxFloat64, math.Min(math.MaxFloat64, f))
}

// ---- memory store ----

// memoryStore keeps each type's samples in a series of its own, so writers
// of different types never contend.
type memoryStore struct {
	series   sync.Map // type name -> *series
	mu       sync.Mutex
	types    int // guarded by mu: series are only created under it
	maxTypes int
}

type series struct {
	version atomic.Uint64 // written under mu, read without it by the cache

	mu     sync.RWMutex
	agg    stats
	points []point // sorted by at when sorted is true
	sorted bool
}

type point struct {
	at    int64
	value float64
}

func newMemoryStore(maxTypes int) *memoryStore {
	return &memoryStore{maxTypes: maxTypes}
}

func (m *memoryStore) lookup(typ string) *series {
	if s, ok := m.series.Load(typ); ok {
		return s.(*series)
	}
	return nil
}

// version is the type's current version; 0 for a type never written.
func (m *memoryStore) version(typ string) uint64 {
	if s := m.lookup(typ); s != nil {
		return s.version.Load()
	}
	return 0
}

func (m *memoryStore) add(_ context.Context, samples []sample) error {
	groups := groupByType(samples)
	all, err := m.seriesFor(groups)
	if err != nil {
		return err
	}
	// Lock every series of the batch, in name order so two batches cannot
	// deadlock, so that a reader sees each type's part whole or not at all.
	for _, s := range all {
		s.mu.Lock()
	}
	for i, g := range groups {
		s := all[i]
		for _, smp := range g {
			if n := len(s.points); n > 0 && smp.at < s.points[n-1].at {
				s.sorted = false
			}
			s.points = append(s.points, point{smp.at, smp.value})
			s.agg.add(smp.value)
		}
		s.version.Add(uint64(len(g)))
	}
	for _, s := range all {
		s.mu.Unlock()
	}
	return nil
}

// groupByType splits samples by type, types in name order, keeping each
// type's samples in the order given.
func groupByType(samples []sample) [][]sample {
	if len(samples) == 1 {
		return [][]sample{samples}
	}
	sorted := slices.Clone(samples)
	slices.SortStableFunc(sorted, func(a, b sample) int { return strings.Compare(a.typ, b.typ) })
	var groups [][]sample
	for start := 0; start < len(sorted); {
		end := start + 1
		for end < len(sorted) && sorted[end].typ == sorted[start].typ {
			end++
		}
		groups = append(groups, sorted[start:end])
		start = end
	}
	return groups
}

// seriesFor returns the series of each group, creating missing ones unless
// that would pass maxTypes; then it creates none.
func (m *memoryStore) seriesFor(groups [][]sample) ([]*series, error) {
	out := make([]*series, len(groups))
	missing := 0
	for i, g := range groups {
		if out[i] = m.lookup(g[0].typ); out[i] == nil {
			missing++
		}
	}
	if missing == 0 {
		return out, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var fresh []int
	for i, g := range groups {
		if out[i] == nil {
			if out[i] = m.lookup(g[0].typ); out[i] == nil {
				fresh = append(fresh, i)
			}
		}
	}
	if m.types+len(fresh) > m.maxTypes {
		return nil, &tooManyTypesError{groups[fresh[0]][0].typ}
	}
	for _, i := range fresh {
		out[i] = &series{sorted: true}
		m.series.Store(groups[i][0].typ, out[i])
	}
	m.types += len(fresh)
	return out, nil
}

func (m *memoryStore) summarize(_ context.Context, typ string, w window) (stats, uint64, error) {
	s := m.lookup(typ)
	if s == nil {
		return stats{}, 0, nil
	}
	if w == allTime {
		s.mu.RLock()
		defer s.mu.RUnlock()
		return s.agg, s.version.Load(), nil
	}
	s.mu.RLock()
	if !s.sorted {
		// Out-of-order samples are sorted on the first windowed read
		// after them, not on every write.
		s.mu.RUnlock()
		s.mu.Lock()
		slices.SortStableFunc(s.points, func(a, b point) int { return cmpInt64(a.at, b.at) })
		s.sorted = true
		s.mu.Unlock()
		s.mu.RLock()
	}
	defer s.mu.RUnlock()
	lo, _ := slices.BinarySearchFunc(s.points, w.from, func(p point, t int64) int { return cmpInt64(p.at, t) })
	hi, _ := slices.BinarySearchFunc(s.points, w.to, func(p point, t int64) int { return cmpInt64(p.at, t) })
	var st stats
	for _, p := range s.points[lo:hi] {
		st.add(p.value)
	}
	return st, s.version.Load(), nil
}

func cmpInt64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// ---- Redis store ----

// redisStore keeps each type in two keys sharing the type's hash tag:
// {type}:agg, a hash of the running aggregates and the version, and
// {type}:ts, a sorted set of samples scored by timestamp. A set of known
// type names enforces MAX_TYPES.
type redisStore struct {
	pool     *redisPool
	prefix   string
	maxTypes int
}

func newRedisStore(pool *redisPool, prefix string, maxTypes int) *redisStore {
	return &redisStore{pool: pool, prefix: prefix, maxTypes: maxTypes}
}

func (s *redisStore) aggKey(typ string) string { return typeKey(s.prefix, typ, "agg") }
func (s *redisStore) tsKey(typ string) string  { return typeKey(s.prefix, typ, "ts") }
func (s *redisStore) typesKey() string         { return s.prefix + "types" }

// typeKey names one of a type's keys; the braces are its Redis Cluster
// hash tag, so every key of a type lives in one slot.
func typeKey(prefix, typ, kind string) string {
	return prefix + "{" + typ + "}:" + kind
}

// ingestScript applies a whole ingest, every type of it, in one atomic step.
// KEYS: the type-name set, then per type its agg hash and its sample set.
// ARGV: MAX_TYPES, the fence (Unix microseconds), then per type its name,
// its sample count n, and n pairs of timestamp and value. A sample's member
// in the sorted set is its value and its sequence number in the type, so
// equal samples stay distinct; the sequence number is also the type's
// version.
//
// The fence keeps a 503 honest: a script that reaches Redis after the
// service has given up on it (Redis stalled, or the network) stores
// nothing, instead of storing samples the client was told were not stored.
var ingestScript = newScript(`
redis.replicate_commands()
local now = redis.call('TIME')
if tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[2]) then
  return redis.error_reply('FENCED ingest reached Redis after its deadline')
end
local maxTypes = tonumber(ARGV[1])
local new, firstNew, a = 0, nil, 3
for k = 2, #KEYS, 2 do
  if redis.call('SISMEMBER', KEYS[1], ARGV[a]) == 0 then
    new = new + 1
    firstNew = firstNew or ARGV[a]
  end
  a = a + 2 + 2 * tonumber(ARGV[a + 1])
end
if new > 0 and redis.call('SCARD', KEYS[1]) + new > maxTypes then
  return redis.error_reply('TOOMANYTYPES ' .. firstNew)
end
a = 3
for k = 2, #KEYS, 2 do
  local agg, ts, name, n = KEYS[k], KEYS[k + 1], ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  if new > 0 then redis.call('SADD', KEYS[1], name) end
  local cur = redis.call('HMGET', agg, 'ver', 'count', 'sum', 'min', 'max')
  local ver, count, sum = tonumber(cur[1]) or 0, tonumber(cur[2]) or 0, tonumber(cur[3]) or 0
  local mn, mx = tonumber(cur[4]), tonumber(cur[5])
  local z = {}
  for i = 1, n do
    local at, vs = ARGV[a], ARGV[a + 1]
    a = a + 2
    local v = tonumber(vs)
    sum = sum + v
    if mn == nil or v < mn then mn = v end
    if mx == nil or v > mx then mx = v end
    z[#z + 1] = at
    z[#z + 1] = vs .. ':' .. (ver + i)
    if #z >= 2000 then
      redis.call('ZADD', ts, unpack(z))
      z = {}
    end
  end
  if #z > 0 then redis.call('ZADD', ts, unpack(z)) end
  redis.call('HSET', agg, 'ver', ver + n, 'count', count + n,
    'sum', string.format('%.17g', sum), 'min', string.format('%.17g', mn), 'max', string.format('%.17g', mx))
end
return 1
`)

func (s *redisStore) add(ctx context.Context, samples []sample) error {
	groups := groupByType(samples)
	keys := make([]string, 0, 1+2*len(groups))
	args := make([]any, 0, 2+2*len(groups)+2*len(samples))
	keys = append(keys, s.typesKey())
	args = append(args, s.maxTypes, 0) // the fence is set below
	for _, g := range groups {
		keys = append(keys, s.aggKey(g[0].typ), s.tsKey(g[0].typ))
		args = append(args, g[0].typ, len(g))
		for _, smp := range g {
			args = append(args, smp.at, strconv.FormatFloat(smp.value, 'g', -1, 64))
		}
	}
	return s.pool.with(ctx, "ingest", func(c redis.Conn, deadline time.Time) error {
		// The script must start early enough for its answer to come back
		// before the deadline; a fifth of the round trip's budget is kept
		// for the run and the answer.
		args[1] = deadline.Add(-s.pool.timeout / 5).UnixMicro()
		_, err := ingestScript.run(c, deadline, keys, args...)
		if rerr, ok := err.(redis.Error); ok {
			if typ, found := strings.CutPrefix(string(rerr), "TOOMANYTYPES "); found {
				return &tooManyTypesError{typ}
			}
		}
		return err
	})
}

func (s *redisStore) summarize(ctx context.Context, typ string, w window) (st stats, version uint64, err error) {
	err = s.pool.with(ctx, "summary", func(c redis.Conn, deadline time.Time) error {
		if w == allTime {
			vals, err := redis.Strings(do(c, deadline, "HMGET", s.aggKey(typ), "ver", "count", "sum", "min", "max"))
			if err != nil {
				return err
			}
			st, version, err = parseAgg(vals)
			return err
		}
		c.Send("MULTI")
		c.Send("HGET", s.aggKey(typ), "ver")
		c.Send("ZRANGEBYSCORE", s.tsKey(typ), scoreBound(w.from, true), scoreBound(w.to, false))
		reply, err := redis.Values(do(c, deadline, "EXEC"))
		if err != nil {
			return err
		}
		if version, err = parseVersion(reply[0]); err != nil {
			return err
		}
		members, err := redis.ByteSlices(reply[1], nil)
		if err != nil {
			return err
		}
		for _, m := range members {
			v, err := memberValue(m)
			if err != nil {
				return err
			}
			st.add(v)
		}
		return nil
	})
	return st, version, err
}

// scoreBound is a ZRANGEBYSCORE bound: from is inclusive, to exclusive.
func scoreBound(at int64, from bool) string {
	switch {
	case at == math.MinInt64:
		return "-inf"
	case at == math.MaxInt64:
		return "+inf"
	case from:
		return strconv.FormatInt(at, 10)
	}
	return "(" + strconv.FormatInt(at, 10)
}

// memberValue reads the value out of a sorted-set member "value:seq".
func memberValue(m []byte) (float64, error) {
	i := strings.LastIndexByte(string(m), ':')
	if i < 0 {
		return 0, fmt.Errorf("malformed sample member %q", m)
	}
	return strconv.ParseFloat(string(m[:i]), 64)
}

func parseVersion(reply any) (uint64, error) {
	if reply == nil {
		return 0, nil
	}
	return redis.Uint64(reply, nil)
}

// parseAgg reads HMGET ver count sum min max; all empty for a new type.
func parseAgg(vals []string) (stats, uint64, error) {
	if vals[0] == "" {
		return stats{}, 0, nil
	}
	var (
		st   stats
		errs [5]error
		ver  uint64
	)
	ver, errs[0] = strconv.ParseUint(vals[0], 10, 64)
	st.count, errs[1] = strconv.ParseInt(vals[1], 10, 64)
	st.sum, errs[2] = strconv.ParseFloat(vals[2], 64)
	st.min, errs[3] = strconv.ParseFloat(vals[3], 64)
	st.max, errs[4] = strconv.ParseFloat(vals[4], 64)
	if err := errors.Join(errs[:]...); err != nil {
		return stats{}, 0, fmt.Errorf("malformed aggregate: %w", err)
	}
	return st, ver, nil
}

package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
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

// ---- memory ----

// memoryStore keeps each type's samples in a series of its own, so writers
// of different types never contend.
type memoryStore struct {
	series   sync.Map // type name -> *series
	mu       sync.Mutex
	types    int // guarded by mu: series are only created under it
	maxTypes int
}

type series struct {
	version atomic.Uint64 // written under series.mu, read without it by the cache

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
	if s.sorted {
		defer s.mu.RUnlock()
		return s.window(w), s.version.Load(), nil
	}
	// Out-of-order samples are sorted on the first windowed read after
	// them, not on every write. The window is read under the same write
	// lock: a writer slipping in between could unsort the points again.
	s.mu.RUnlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.sorted {
		slices.SortStableFunc(s.points, func(a, b point) int { return cmpInt64(a.at, b.at) })
		s.sorted = true
	}
	return s.window(w), s.version.Load(), nil
}

// window sums the points in w; the points must be sorted and s.mu held.
func (s *series) window(w window) stats {
	lo, _ := slices.BinarySearchFunc(s.points, w.from, func(p point, t int64) int { return cmpInt64(p.at, t) })
	hi, _ := slices.BinarySearchFunc(s.points, w.to, func(p point, t int64) int { return cmpInt64(p.at, t) })
	var st stats
	for _, p := range s.points[lo:hi] {
		st.add(p.value)
	}
	return st
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

// ---- Redis ----

// redisStore keeps each type in four keys sharing the type's hash tag:
//
//	{t}:agg  hash: the type's version and all-time count, sum, min, max
//	{t}:ts   sorted set: one member "value:id" per sample, scored by its
//	         timestamp in microseconds; the id keeps equal samples apart
//	{t}:b    hash: per minute bucket, "count sum min max" of its samples
//	{t}:bi   sorted set: the bucket numbers, to find a window's buckets
//
// A windowed summary reads the whole buckets inside its window and only
// the samples of the part-buckets at its two edges, so its cost grows with
// the window's length in minutes and two minutes' samples, not with every
// sample in it. A set of type names enforces MAX_TYPES.
type redisStore struct {
	pool     *redisPool
	prefix   string
	maxTypes int

	idPrefix string        // random per store, so ids of instances differ
	nextID   atomic.Uint64 // with idPrefix, names each sample
}

// bucketWidth is the width of a bucket, in microseconds.
const bucketWidth = int64(time.Minute / time.Microsecond)

func newRedisStore(pool *redisPool, prefix string, maxTypes int) *redisStore {
	return &redisStore{
		pool: pool, prefix: prefix, maxTypes: maxTypes,
		idPrefix: strconv.FormatUint(rand.Uint64()>>16, 36) + "-",
	}
}

func (s *redisStore) typesKey() string { return s.prefix + "types" }

// typeKey names one of a type's keys; the braces are its Redis Cluster
// hash tag, so every key of a type lives in one slot. (The ingest script
// also touches the set of type names, and a batch may hold several types,
// so it needs one Redis, not a Cluster; reads of one type stay in a slot.)
func typeKey(prefix, typ, kind string) string {
	return prefix + "{" + typ + "}:" + kind
}

// ingestScript applies a whole ingest, every type of it, in one atomic step.
// The service does the per-sample work (aggregates, bucket totals, member
// names), so the script's own work per sample is one ZADD element.
//
// KEYS: the type-name set, then per type its agg, ts, b and bi keys.
// ARGV: MAX_TYPES, the fence (Unix microseconds), then per type: its name,
// sample count n, bucket count nb, the samples' count sum min max; nb
// groups of bucket count sum min max; n pairs of timestamp and member.
//
// The fence keeps a 503 honest: a script that reaches Redis after the
// service has given up on it (Redis stalled, or the network) stores
// nothing, instead of storing samples the client was told were not stored.
// It is on Redis's clock (see redisPool.clockOffset).
var ingestScript = newScript(`
redis.replicate_commands()
local now = redis.call('TIME')
if tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[2]) then
  return redis.error_reply('FENCED ingest reached Redis after its deadline')
end
local function merge(c, s, lo, hi, c2, s2, lo2, hi2)
  if c == 0 then return c2, s2, lo2, hi2 end
  return c + c2, s + s2, math.min(lo, lo2), math.max(hi, hi2)
end
local function num(x) return string.format('%.17g', x) end
local maxTypes = tonumber(ARGV[1])
local new, firstNew, a = 0, nil, 3
for k = 2, #KEYS, 4 do
  if redis.call('SISMEMBER', KEYS[1], ARGV[a]) == 0 then
    new = new + 1
    firstNew = firstNew or ARGV[a]
  end
  a = a + 7 + 5 * tonumber(ARGV[a + 2]) + 2 * tonumber(ARGV[a + 1])
end
if new > 0 and redis.call('SCARD', KEYS[1]) + new > maxTypes then
  return redis.error_reply('TOOMANYTYPES ' .. firstNew)
end
a = 3
for k = 2, #KEYS, 4 do
  local agg, ts, b, bi = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local n, nb = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if new > 0 then redis.call('SADD', KEYS[1], ARGV[a]) end
  local cur = redis.call('HMGET', agg, 'ver', 'count', 'sum', 'min', 'max')
  local c, s, lo, hi = merge(tonumber(cur[2]) or 0, tonumber(cur[3]) or 0, tonumber(cur[4]), tonumber(cur[5]),
    tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]))
  redis.call('HSET', agg, 'ver', string.format('%d', (tonumber(cur[1]) or 0) + n), 'count', string.format('%d', c),
    'sum', num(s), 'min', num(lo), 'max', num(hi))
  a = a + 7
  for j = 1, nb do
    local id = ARGV[a]
    local old = redis.call('HGET', b, id)
    local oc, os, ol, oh = 0, 0, nil, nil
    if old then
      oc, os, ol, oh = string.match(old, '(%S+) (%S+) (%S+) (%S+)')
      oc, os, ol, oh = tonumber(oc), tonumber(os), tonumber(ol), tonumber(oh)
    else
      redis.call('ZADD', bi, id, id) -- a new bucket
    end
    c, s, lo, hi = merge(oc, os, ol, oh, tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]))
    redis.call('HSET', b, id, string.format('%d', c) .. ' ' .. num(s) .. ' ' .. num(lo) .. ' ' .. num(hi))
    a = a + 5
  end
  local last = a + 2 * n - 1
  while a <= last do
    local e = math.min(a + 1999, last)
    redis.call('ZADD', ts, unpack(ARGV, a, e))
    a = e + 1
  end
end
return 1
`)

func (s *redisStore) add(ctx context.Context, samples []sample) error {
	groups := groupByType(samples)
	keys := make([]string, 0, 1+4*len(groups))
	args := make([]any, 0, 2+7*len(groups)+2*len(samples)+5*len(groups))
	keys = append(keys, s.typesKey())
	args = append(args, s.maxTypes, 0) // the fence is set below
	for _, g := range groups {
		typ := g[0].typ
		keys = append(keys, typeKey(s.prefix, typ, "agg"), typeKey(s.prefix, typ, "ts"),
			typeKey(s.prefix, typ, "b"), typeKey(s.prefix, typ, "bi"))
		var all stats
		buckets := map[int64]*stats{}
		for _, smp := range g {
			all.add(smp.value)
			id := floorDiv(smp.at, bucketWidth)
			if buckets[id] == nil {
				buckets[id] = &stats{}
			}
			buckets[id].add(smp.value)
		}
		args = append(args, typ, len(g), len(buckets))
		args = appendStats(args, all)
		for id, st := range buckets {
			args = appendStats(append(args, id), *st)
		}
		base := s.nextID.Add(uint64(len(g))) - uint64(len(g))
		for i, smp := range g {
			member := fmtFloat(smp.value) + ":" + s.idPrefix + strconv.FormatUint(base+uint64(i), 36)
			args = append(args, smp.at, member)
		}
	}
	return s.pool.with(ctx, "ingest", func(c redis.Conn, deadline time.Time) error {
		// The script must start early enough for its answer to come back
		// before the deadline; a fifth of the round trip's budget is kept
		// for the run and the answer.
		args[1] = s.pool.redisMicros(deadline.Add(-s.pool.timeout / 5))
		_, err := ingestScript.run(c, deadline, keys, args...)
		if rerr, ok := err.(redis.Error); ok {
			if typ, found := strings.CutPrefix(string(rerr), "TOOMANYTYPES "); found {
				return &tooManyTypesError{typ}
			}
		}
		return err
	})
}

func appendStats(args []any, st stats) []any {
	return append(args, st.count, fmtFloat(st.sum), fmtFloat(st.min), fmtFloat(st.max))
}

func fmtFloat(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }

// floorDiv is a / b rounded down, also for negative a.
func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}

// windowScript sums a window: the samples of its part-buckets from {t}:ts
// and its whole buckets from {t}:b, with the version, in one atomic step.
// KEYS: agg, ts, b, bi. ARGV: the number r of sample ranges, r pairs of
// ZRANGEBYSCORE bounds, then the bounds of the bucket range ("" for none).
// It answers strings: version, count, sum, min, max ("" when empty).
var windowScript = newScript(`
local count, sum, mn, mx = 0, 0, nil, nil
local function add(c, s, lo, hi)
  count, sum = count + c, sum + s
  if mn == nil or lo < mn then mn = lo end
  if mx == nil or hi > mx then mx = hi end
end
local r = tonumber(ARGV[1])
for i = 0, r - 1 do
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[2 + 2 * i], ARGV[3 + 2 * i])) do
    local v = tonumber(string.match(m, '^[^:]+'))
    add(1, v, v, v)
  end
end
local blo, bhi = ARGV[2 + 2 * r], ARGV[3 + 2 * r]
if blo ~= '' then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[4], blo, bhi)
  for i = 1, #ids, 1000 do
    for _, b in ipairs(redis.call('HMGET', KEYS[3], unpack(ids, i, math.min(i + 999, #ids)))) do
      if b then
        local c, s, lo, hi = string.match(b, '(%S+) (%S+) (%S+) (%S+)')
        add(tonumber(c), tonumber(s), tonumber(lo), tonumber(hi))
      end
    end
  end
end
local function num(x) if x == nil then return '' end return string.format('%.17g', x) end
return {redis.call('HGET', KEYS[1], 'ver') or '0', string.format('%d', count), num(sum), num(mn), num(mx)}
`)

func (s *redisStore) summarize(ctx context.Context, typ string, w window) (st stats, version uint64, err error) {
	err = s.pool.with(ctx, "summary", func(c redis.Conn, deadline time.Time) error {
		if w == allTime {
			vals, err := redis.Strings(do(c, deadline, "HMGET", typeKey(s.prefix, typ, "agg"), "ver", "count", "sum", "min", "max"))
			if err != nil {
				return err
			}
			st, version, err = parseAgg(vals)
			return err
		}
		keys := []string{typeKey(s.prefix, typ, "agg"), typeKey(s.prefix, typ, "ts"),
			typeKey(s.prefix, typ, "b"), typeKey(s.prefix, typ, "bi")}
		vals, err := redis.Strings(windowScript.run(c, deadline, keys, windowPlan(w)...))
		if err != nil {
			return err
		}
		st, version, err = parseAgg(vals)
		return err
	})
	return st, version, err
}

// windowPlan splits w into the whole buckets inside it and the sample
// ranges left at its edges, as windowScript's ARGV.
func windowPlan(w window) []any {
	first, end := int64(math.MinInt64), int64(math.MaxInt64) // whole buckets [first, end)
	if w.from != allTime.from {
		first = -floorDiv(-w.from, bucketWidth) // rounded up
	}
	if w.to != allTime.to {
		end = floorDiv(w.to, bucketWidth)
	}
	if first != math.MinInt64 && end != math.MaxInt64 && first >= end {
		// No whole bucket: the window is within two buckets' samples.
		return []any{1, scoreBound(w.from, true), scoreBound(w.to, false), "", ""}
	}
	var ranges []any
	if first != math.MinInt64 && first*bucketWidth > w.from {
		ranges = append(ranges, scoreBound(w.from, true), scoreBound(first*bucketWidth, false))
	}
	if end != math.MaxInt64 && end*bucketWidth < w.to {
		ranges = append(ranges, scoreBound(end*bucketWidth, true), scoreBound(w.to, false))
	}
	return append(append([]any{len(ranges) / 2}, ranges...), scoreBound(first, true), scoreBound(end, false))
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

func parseVersion(reply any) (uint64, error) {
	if reply == nil {
		return 0, nil
	}
	return redis.Uint64(reply, nil)
}

// parseAgg reads ver count sum min max, as HMGET of {t}:agg or windowScript
// answers them: all empty for a type never written, min and max empty for
// a window with no samples.
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
	if st.count > 0 {
		st.min, errs[3] = strconv.ParseFloat(vals[3], 64)
		st.max, errs[4] = strconv.ParseFloat(vals[4], 64)
	}
	if err := errors.Join(errs[:]...); err != nil {
		return stats{}, 0, fmt.Errorf("malformed aggregate: %w", err)
	}
	return st, ver, nil
}

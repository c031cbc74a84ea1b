package main

import (
	"cmp"
	"fmt"
	"maps"
	"math"
	"slices"
)

// sample is one validated metric sample.
type sample struct {
	typ    string
	series string // the id of its labels (labels.go); "" for none
	at     int64  // Unix microseconds, UTC
	value  float64
}

// second is the Unix second the sample falls in.
func (s sample) second() int64 { return floorDiv(s.at, 1_000_000) }

// stats are the count, sum, min and max of a set of samples.
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

// merge adds o's samples. Sums are added in the order merges happen, which
// both stores keep the same, so their answers agree to the bit.
func (s *stats) merge(o stats) {
	if o.count == 0 {
		return
	}
	if s.count == 0 {
		*s = o
		return
	}
	s.count += o.count
	s.sum += o.sum
	s.min = math.Min(s.min, o.min)
	s.max = math.Max(s.max, o.max)
}

// bucketDelta is what one ingest adds to one bucket: its samples' stats,
// zeros and sketch bins (sorted by code, already bounded as a bucket's bins
// are, so the store only merges).
type bucketDelta struct {
	res   resolution
	start int64
	stats
	zero uint64
	bins []binCount
}

// typeBatch is one type's part of an ingest, aggregated per bucket so that
// the store does one update per touched bucket, not one per sample.
type typeBatch struct {
	typ           string
	samples       int
	first, newest int64 // the earliest and latest sample, Unix microseconds
	// keepUntil is the earliest anchor (Unix seconds) at which some sample
	// of the batch would no longer be kept by any resolution; never when
	// some resolution keeps everything forever.
	keepUntil int64
	deltas    []bucketDelta // the type-wide buckets, by resolution, then start
	series    []seriesBatch // by id
}

// seriesBatch is one series' part of a typeBatch. When the type's batch is
// all of one series, as an agent's usually is, its deltas are the type's
// (the same slice, read only).
type seriesBatch struct {
	id            string
	samples       int
	first, newest int64
	// until is the anchor from which retention keeps none of the series'
	// samples of this batch: the series holds no data from there on,
	// unless later samples came.
	until  int64
	deltas []bucketDelta
}

// aggregate splits samples by type (types in name order) and sums each
// type's samples into the buckets of every resolution, plus the running
// total when h keeps days forever.
func aggregate(samples []sample, h retention) []typeBatch {
	// Positions grouped by type, by counting: a batch is often of one type,
	// or of runs of one, so a run costs one map lookup, not one a sample.
	runs := func(each func(typ string, from, to int)) {
		for i := 0; i < len(samples); {
			j := i + 1
			for j < len(samples) && samples[j].typ == samples[i].typ {
				j++
			}
			each(samples[i].typ, i, j)
			i = j
		}
	}
	count := map[string]int{}
	runs(func(typ string, from, to int) { count[typ] += to - from })
	names := make([]string, 0, len(count))
	for name := range count {
		names = append(names, name)
	}
	slices.Sort(names)
	next := make(map[string]int, len(names))
	at := 0
	for _, name := range names {
		next[name] = at
		at += count[name]
	}
	idx := make([]int32, len(samples))
	runs(func(typ string, from, to int) {
		pos := next[typ]
		for i := from; i < to; i++ {
			idx[pos] = int32(i)
			pos++
		}
		next[typ] = pos
	})
	a := newRollup(samples, h)
	out := make([]typeBatch, len(names))
	at = 0
	for k, name := range names {
		out[k] = a.typeBatch(idx[at : at+count[name]])
		out[k].series = a.seriesBatches(idx[at:at+count[name]], out[k])
		at += count[name]
	}
	return out
}

// seriesBatches sums a type's samples (idx) per series, given the type's
// own sums b.
func (a *rollup) seriesBatches(idx []int32, b typeBatch) []seriesBatch {
	until := func(newest int64) int64 { return a.h.lastKept(floorDiv(newest, 1_000_000)) }
	one := a.samples[idx[0]].series
	if !slices.ContainsFunc(idx, func(i int32) bool { return a.samples[i].series != one }) {
		return []seriesBatch{{id: one, samples: b.samples, first: b.first, newest: b.newest, until: until(b.newest), deltas: b.deltas}}
	}
	byID := map[string][]int32{}
	for _, i := range idx {
		id := a.samples[i].series
		byID[id] = append(byID[id], i)
	}
	out := make([]seriesBatch, 0, len(byID))
	for _, id := range slices.Sorted(maps.Keys(byID)) {
		sb := a.typeBatch(byID[id])
		out = append(out, seriesBatch{id: id, samples: sb.samples, first: sb.first, newest: sb.newest, until: until(sb.newest), deltas: sb.deltas})
	}
	return out
}

// rollup sums a batch's samples into buckets, one type at a time. It holds
// each sample's second and bin code, and for each resolution (finest
// first) the bucket being summed and a bin counter, reused from type to
// type.
type rollup struct {
	samples  []sample
	secs     []int64
	codes    []int32
	h        retention
	levels   []resolution // res1s to res1d, then resAll when kept forever
	cur      [numRes + 1]bucketDelta
	open     [numRes + 1]bool
	counters [numRes + 1]binCounter
	done     [numRes + 1][]bucketDelta // finished buckets, by level, in time order
	arena    []binCount                // the bins of finished buckets, allocated together
}

var (
	timedLevels = []resolution{res1s, res1m, res1h, res1d}
	allLevels   = []resolution{res1s, res1m, res1h, res1d, resAll}
)

func newRollup(samples []sample, h retention) *rollup {
	a := &rollup{
		samples: samples, h: h, levels: timedLevels,
		secs: make([]int64, len(samples)), codes: make([]int32, len(samples)),
		arena: make([]binCount, 0, len(samples)),
	}
	if h.forever() {
		a.levels = allLevels
	}
	lo, hi := int32(math.MaxInt32), int32(math.MinInt32)
	for i, s := range samples {
		a.secs[i] = s.second()
		if s.value != 0 {
			a.codes[i] = codeOf(s.value)
			lo, hi = min(lo, a.codes[i]), max(hi, a.codes[i])
		}
	}
	for l := range a.levels {
		a.counters[l] = newBinCounter(lo, hi, len(samples))
	}
	return a
}

// typeBatch sums one type's samples (idx, positions in the batch in the
// order given) into buckets. It walks them in time order (sorting only
// when they came out of order), summing each second's samples into its 1 s
// bucket; each finished bucket is added to the bucket of the next coarser
// resolution that holds it, so a sample is added once and a bucket once
// more.
func (a *rollup) typeBatch(idx []int32) typeBatch {
	first := a.samples[idx[0]]
	b := typeBatch{typ: first.typ, samples: len(idx), first: first.at, newest: first.at, keepUntil: never}
	sorted := true
	for k, i := range idx {
		at := a.samples[i].at
		b.first, b.newest = min(b.first, at), max(b.newest, at)
		sorted = sorted && (k == 0 || a.secs[i] >= a.secs[idx[k-1]])
	}
	if !a.h.forever() {
		// Expiry grows with time, so the earliest sample goes first.
		b.keepUntil = a.h.lastKept(floorDiv(b.first, 1_000_000))
	}
	if !sorted {
		idx = secondOrder(idx, a.secs)
	}
	for _, i := range idx {
		sec, v := a.secs[i], a.samples[i].value
		if a.open[0] && a.cur[0].start != sec {
			a.finish(0)
		}
		if !a.open[0] {
			a.cur[0], a.open[0] = bucketDelta{res: res1s, start: sec}, true
		}
		a.cur[0].stats.add(v)
		if v == 0 {
			a.cur[0].zero++
		} else {
			a.counters[0].add(a.codes[i], 1)
		}
	}
	for l := range a.levels {
		if a.open[l] {
			a.finish(l)
		}
	}
	total := 0
	for _, done := range a.done {
		total += len(done)
	}
	b.deltas = make([]bucketDelta, 0, total)
	for l, done := range a.done[:len(a.levels)] {
		b.deltas = append(b.deltas, done...)
		a.done[l] = done[:0]
	}
	return b
}

// finish closes level l's bucket and adds it to the next coarser level.
func (a *rollup) finish(l int) {
	var d bucketDelta
	d, a.arena = a.counters[l].finish(a.cur[l], a.arena)
	a.open[l] = false
	a.done[l] = append(a.done[l], d)
	if l+1 == len(a.levels) {
		return
	}
	up, r := l+1, a.levels[l+1]
	start := int64(0)
	if r != resAll {
		start = floorTo(d.start, r.seconds())
	}
	if a.open[up] && a.cur[up].start != start {
		a.finish(up)
	}
	if !a.open[up] {
		a.cur[up], a.open[up] = bucketDelta{res: r, start: start}, true
	}
	a.cur[up].merge(d.stats)
	a.cur[up].zero += d.zero
	for _, bc := range d.bins {
		a.counters[up].add(bc.code, bc.n)
	}
}

// secondOrder is idx in order of secs[idx[k]], keeping the given order
// within a second: by counting when the seconds span little more than the
// samples, by sorting otherwise.
func secondOrder(idx []int32, secs []int64) []int32 {
	lo, hi := int64(math.MaxInt64), int64(math.MinInt64)
	for _, i := range idx {
		lo, hi = min(lo, secs[i]), max(hi, secs[i])
	}
	order := make([]int32, len(idx))
	if hi-lo < 4*int64(len(idx))+1024 {
		starts := make([]int32, hi-lo+2)
		for _, i := range idx {
			starts[secs[i]-lo+1]++
		}
		for j := 1; j < len(starts); j++ {
			starts[j] += starts[j-1]
		}
		for _, i := range idx {
			order[starts[secs[i]-lo]] = i
			starts[secs[i]-lo]++
		}
		return order
	}
	copy(order, idx)
	slices.SortStableFunc(order, func(x, y int32) int { return cmp.Compare(secs[x], secs[y]) })
	return order
}

// binCounter counts bin codes for one bucket at a time: in an array over
// the batch's range of codes when that is small next to the samples, in a
// map otherwise.
type binCounter struct {
	lo      int32
	dense   []uint64
	touched []int32
	sparse  map[int32]uint64
}

func newBinCounter(lo, hi int32, samples int) binCounter {
	if hi >= lo && int64(hi)-int64(lo) < min(1<<16, 4*int64(samples)+64) {
		return binCounter{lo: lo, dense: make([]uint64, int(hi-lo)+1)}
	}
	return binCounter{sparse: map[int32]uint64{}}
}

func (c *binCounter) add(code int32, n uint64) {
	if c.sparse != nil {
		c.sparse[code] += n
		return
	}
	if c.dense[code-c.lo] == 0 {
		c.touched = append(c.touched, code)
	}
	c.dense[code-c.lo] += n
}

// finish gives d the bins counted since the last finish, sorted and
// bounded as a bucket's bins are (which changes nothing in the result: the
// bound depends only on the bins' union), appended to arena, and starts
// counting afresh.
func (c *binCounter) finish(d bucketDelta, arena []binCount) (bucketDelta, []binCount) {
	from := len(arena)
	if c.sparse != nil {
		for code, n := range c.sparse {
			arena = append(arena, binCount{code, n})
		}
		clear(c.sparse)
		slices.SortFunc(arena[from:], func(a, b binCount) int { return cmp.Compare(a.code, b.code) })
	} else {
		slices.Sort(c.touched)
		for _, code := range c.touched {
			arena = append(arena, binCount{code, c.dense[code-c.lo]})
			c.dense[code-c.lo] = 0
		}
		c.touched = c.touched[:0]
	}
	// The full slice expression keeps later appends to arena off d's bins.
	bins := boundBins(arena[from:len(arena):len(arena)], maxBinsPerSign)
	d.bins = bins[:len(bins):len(bins)]
	return d, arena[:from+len(bins)]
}

// tooManyTypesError refuses an ingest that would create a metric type
// beyond MAX_TYPES; typ is the first such type, in name order.
type tooManyTypesError struct{ typ string }

func (e *tooManyTypesError) Error() string { return "too many metric types: " + e.typ }

// tooManySeriesError refuses an ingest that would create a series of typ
// beyond MAX_SERIES; id is the first such series, by id.
type tooManySeriesError struct{ typ, id string }

func (e *tooManySeriesError) Error() string { return "too many series of " + e.typ + ": " + e.id }

// tooOldError refuses an ingest with a sample that no resolution would
// keep at the type's anchor (Unix seconds).
type tooOldError struct {
	typ    string
	anchor int64
}

func (e *tooOldError) Error() string {
	return fmt.Sprintf("sample of %s older than retention keeps (anchor %d)", e.typ, e.anchor)
}

// typeMeta is what a store knows of a type besides its buckets.
type typeMeta struct {
	name          string
	version       uint64 // bumped by every ingest of the type; 0: never written
	first, newest int64  // Unix microseconds of its oldest and newest sample
	total         stats  // the running total, when days are kept forever
	series        int    // how many series hold data
	deleted       bool   // deleted, its version kept (lua/delete.lua)
	rebuilding    bool   // its type-wide buckets wrong until reclaimed: read its series
}

// anchor is the second retention is measured back from: the earlier of
// the type's newest sample and now (Unix microseconds).
func (m typeMeta) anchor(now int64) int64 { return anchorOf(m.newest, now) }

// anchorOf is the anchor of a type whose newest sample is newest, at now
// (both Unix microseconds), in Unix seconds.
func anchorOf(newest, now int64) int64 { return floorDiv(min(newest, now), 1_000_000) }

// storedBucket is one bucket as a store holds it. Its bins are either
// packed (the memory store's form) or a list (as Redis returns them).
type storedBucket struct {
	res   resolution
	start int64
	stats
	zero   uint64
	packed []byte
	bins   []binCount
}

// aggregateAcc merges buckets into one answer.
type aggregateAcc struct {
	stats
	sketch sketchAcc
}

func (a *aggregateAcc) add(b *storedBucket) {
	a.merge(b.stats)
	a.sketch.addZero(b.zero)
	if b.packed != nil {
		a.sketch.addPacked(b.packed)
	}
	for _, bc := range b.bins {
		a.sketch.add(bc.code, bc.n)
	}
}

func (a *aggregateAcc) reset() {
	a.stats = stats{}
	a.sketch.reset()
}

// percentilesReported are the percentiles every answer with data carries.
var percentilesReported = []float64{50, 90, 95, 99}

// values is the answer's fields: a type or step with no samples has count,
// average and sum 0 and nothing else.
func (a *aggregateAcc) values() aggregateValues {
	v := aggregateValues{Count: a.count, Sum: finite(a.sum)}
	if a.count == 0 {
		return v
	}
	v.Average = finite(a.sum / float64(a.count))
	lo, hi := a.min, a.max
	v.Min, v.Max = &lo, &hi
	if q := a.sketch.quantiles(a.min, a.max, percentilesReported); len(q) == 4 {
		v.P50, v.P90, v.P95, v.P99 = &q[0], &q[1], &q[2], &q[3]
	}
	return v
}

// aggregateValues is the JSON of a summary or a series point.
type aggregateValues struct {
	Count   int64    `json:"count"`
	Average float64  `json:"average"`
	Sum     float64  `json:"sum"`
	Min     *float64 `json:"min,omitempty"`
	Max     *float64 `json:"max,omitempty"`
	P50     *float64 `json:"p50,omitempty"`
	P90     *float64 `json:"p90,omitempty"`
	P95     *float64 `json:"p95,omitempty"`
	P99     *float64 `json:"p99,omitempty"`
}

// finite clamps a sum that overflowed float64 to the largest finite value,
// since JSON has no infinity.
func finite(f float64) float64 {
	return math.Max(-math.MaxFloat64, math.Min(math.MaxFloat64, f))
}

package main

import (
	"cmp"
	"fmt"
	"math"
	"slices"
)

// sample is one validated metric sample.
type sample struct {
	typ   string
	at    int64 // Unix microseconds, UTC
	value float64
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
	deltas    []bucketDelta // by resolution, then start
}

// aggregate splits samples by type (types in name order) and sums each
// type's samples into the buckets of every resolution, plus the running
// total when h keeps days forever.
func aggregate(samples []sample, h retention) []typeBatch {
	byType := map[string][]int{}
	for i, s := range samples {
		byType[s.typ] = append(byType[s.typ], i)
	}
	names := make([]string, 0, len(byType))
	for name := range byType {
		names = append(names, name)
	}
	slices.Sort(names)
	out := make([]typeBatch, len(names))
	for k, name := range names {
		out[k] = aggregateType(samples, byType[name], h)
	}
	return out
}

// aggregateType sums one type's samples (idx into samples) into buckets.
// It walks the samples in time order (sorting them only when they came out
// of order), so each resolution's buckets are runs; within a bucket, bins
// are counted in an array indexed by code, with the codes it touched noted
// so that emptying it costs what was put in.
func aggregateType(samples []sample, idx []int, h retention) typeBatch {
	first := samples[idx[0]]
	b := typeBatch{typ: first.typ, samples: len(idx), first: first.at, newest: first.at, keepUntil: never}
	codes := make([]int32, len(idx))
	loCode, hiCode := int32(math.MaxInt32), int32(math.MinInt32)
	sorted := true
	for k, i := range idx {
		s := samples[i]
		b.first, b.newest = min(b.first, s.at), max(b.newest, s.at)
		if s.value != 0 {
			codes[k] = codeOf(s.value)
			loCode, hiCode = min(loCode, codes[k]), max(hiCode, codes[k])
		}
		if k > 0 && s.second() < samples[idx[k-1]].second() {
			sorted = false
		}
	}
	order := secondOrder(samples, idx, sorted, floorDiv(b.first, 1_000_000), floorDiv(b.newest, 1_000_000))
	levels := []resolution{res1s, res1m, res1h, res1d}
	if h.forever() {
		levels = append(levels, resAll)
	}
	widths := make([]int64, len(levels))
	for l, r := range levels {
		widths[l] = r.secondsOr1()
	}
	builders := make([]binCounter, len(levels))
	for l := range builders {
		builders[l] = newBinCounter(loCode, hiCode, len(idx))
	}
	current := make([]bucketDelta, len(levels))
	started := make([]bool, len(levels))
	for _, k := range order {
		s := samples[idx[k]]
		sec := s.second()
		if !h.forever() {
			until := int64(math.MinInt64)
			for r := res1s; r < numRes; r++ {
				until = max(until, h.expiry(r, floorTo(sec, r.seconds())))
			}
			b.keepUntil = min(b.keepUntil, until)
		}
		for l, r := range levels {
			d := &current[l]
			if !started[l] || r != resAll && (sec < d.start || sec >= d.start+widths[l]) {
				if started[l] {
					b.deltas = append(b.deltas, builders[l].finish(*d))
				}
				start := int64(0)
				if r != resAll {
					start = floorTo(sec, widths[l])
				}
				*d, started[l] = bucketDelta{res: r, start: start}, true
			}
			d.stats.add(s.value)
			if s.value == 0 {
				d.zero++
			} else {
				builders[l].add(codes[k])
			}
		}
	}
	for l := range levels {
		b.deltas = append(b.deltas, builders[l].finish(current[l]))
	}
	slices.SortFunc(b.deltas, func(x, y bucketDelta) int {
		return cmp.Or(cmp.Compare(x.res, y.res), cmp.Compare(x.start, y.start))
	})
	return b
}

// secondOrder is the positions in idx in order of their samples' second,
// keeping the given order within a second: by counting when the seconds
// span little more than the samples, by sorting otherwise.
func secondOrder(samples []sample, idx []int, sorted bool, lo, hi int64) []int {
	order := make([]int, len(idx))
	if sorted {
		for k := range order {
			order[k] = k
		}
		return order
	}
	if hi-lo < 4*int64(len(idx))+1024 {
		starts := make([]int, hi-lo+2)
		for _, i := range idx {
			starts[samples[i].second()-lo+1]++
		}
		for j := 1; j < len(starts); j++ {
			starts[j] += starts[j-1]
		}
		for k, i := range idx {
			j := samples[i].second() - lo
			order[starts[j]] = k
			starts[j]++
		}
		return order
	}
	for k := range order {
		order[k] = k
	}
	slices.SortStableFunc(order, func(x, y int) int { return cmp.Compare(samples[idx[x]].second(), samples[idx[y]].second()) })
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

func (c *binCounter) add(code int32) {
	if c.sparse != nil {
		c.sparse[code]++
		return
	}
	if c.dense[code-c.lo] == 0 {
		c.touched = append(c.touched, code)
	}
	c.dense[code-c.lo]++
}

// finish gives d the bins counted since the last finish, sorted and
// bounded as a bucket's bins are (which changes nothing in the result: the
// bound depends only on the bins' union), and starts counting afresh.
func (c *binCounter) finish(d bucketDelta) bucketDelta {
	if c.sparse != nil {
		for code, n := range c.sparse {
			d.bins = append(d.bins, binCount{code, n})
		}
		clear(c.sparse)
		slices.SortFunc(d.bins, func(a, b binCount) int { return cmp.Compare(a.code, b.code) })
	} else {
		slices.Sort(c.touched)
		d.bins = make([]binCount, len(c.touched))
		for i, code := range c.touched {
			d.bins[i] = binCount{code, c.dense[code-c.lo]}
			c.dense[code-c.lo] = 0
		}
		c.touched = c.touched[:0]
	}
	d.bins = boundBins(d.bins, maxBinsPerSign)
	return d
}

// tooManyTypesError refuses an ingest that would create a metric type
// beyond MAX_TYPES; typ is the first such type, in name order.
type tooManyTypesError struct{ typ string }

func (e *tooManyTypesError) Error() string { return "too many metric types: " + e.typ }

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

// Mergeable quantile sketch: percentiles within 1% relative error, from bins
// that any number of buckets, processes and stores can add together.
//
// The sketch is the base-2 exponential histogram of OpenTelemetry and
// Prometheus native histograms, at scale 6: bin i holds the values in
// (base^i, base^(i+1)] with base = 2^(2^-6) = 2^(1/64).
//
//   - Accuracy: a bin answers its harmonic midpoint, whose relative distance
//     to any value in the bin is at most (base-1)/(base+1) ≈ 0.54%, well
//     under the 1% promise.
//   - Determinism: the index comes from math.Frexp and a literal table of
//     2^(k/64), never from math.Log, so every process (and the Lua script
//     that mirrors this file for the Redis store) computes identical indexes,
//     and the Redis and memory stores agree bit for bit.
//   - Interoperability: an OTLP or Prometheus native histogram at scale
//     s >= 6 maps into scale 6 without loss by merging 2^(s-6) adjacent bins,
//     so such histograms could later be merged in.
package main

import (
	"cmp"
	"encoding/binary"
	"math"
	"math/bits"
	"slices"
)

const sketchScale = 6

// maxBinsPerSign bounds the bins one bucket keeps for each sign: 4096 bins at
// scale 6 span 64 binary octaves, about 19 orders of magnitude.
const maxBinsPerSign = 4096

const binsPerOctave = 1 << sketchScale

// The indexes finite values can have: 5e-324 = 2^-1074 is the top of bin
// 64*-1074-1, and math.MaxFloat64 lies in the last bin below 2^1024.
const (
	minBinIndex = -1074*binsPerOctave - 1
	maxBinIndex = 1024*binsPerOctave - 1
)

// octaveTable[k] is math.Exp2(float64(k)/64), written out so the bounds are
// part of the format rather than of some platform's exp2. It is never written.
var octaveTable = [binsPerOctave + 1]float64{
	1, 1.0108892860517005, 1.0218971486541166, 1.0330248790212284,
	1.0442737824274138, 1.0556451783605572, 1.0671404006768237, 1.0787607977571199,
	1.0905077326652577, 1.102382583307841, 1.1143867425958924, 1.1265216186082418,
	1.1387886347566916, 1.1511892299529827, 1.1637248587775775, 1.1763969916502812,
	1.189207115002721, 1.202156731452703, 1.215247359980469, 1.22848053610687,
	1.241857812073484, 1.255380757024691, 1.2690509571917332, 1.2828700160787783,
	1.2968395546510096, 1.3109612115247644, 1.3252366431597413, 1.339667524053303,
	1.3542555469368927, 1.3690024229745905, 1.3839098819638318, 1.398979672538311,
	1.414213562373095, 1.42961333839197, 1.4451808069770467, 1.460917794180647,
	1.4768261459394993, 1.4929077282912648, 1.5091644275934226, 1.5255981507445382,
	1.542210825407941, 1.559004400237837, 1.5759808451078865, 1.593142151342267,
	1.6104903319492543, 1.6280274218573478, 1.6457554781539647, 1.6636765803267364,
	1.6817928305074292, 1.7001063537185235, 1.718619298122478, 1.7373338352737062,
	1.7562521603732995, 1.7753764925265212, 1.7947090750031072, 1.8142521755003989,
	1.8340080864093424, 1.8539791250833857, 1.8741676341103, 1.8945759815869656,
	1.9152065613971474, 1.9360617934922943, 1.9571441241754002, 1.978456026387951,
	2,
}

// binIndex is the scale-6 index of x > 0 (finite, possibly subnormal): the i
// with base^i < x <= base^(i+1) (OpenTelemetry's convention: upper bound
// inclusive), where the bounds are those of octaveTable.
func binIndex(x float64) int32 {
	frac, exp := math.Frexp(x)
	m, e := 2*frac, int32(exp-1)
	if m == 1 {
		// An exact power of two is the inclusive top of the bin below.
		return e*binsPerOctave - 1
	}
	lo, hi := 0, binsPerOctave // octaveTable[lo] < m <= octaveTable[hi]
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		if m <= octaveTable[mid] {
			hi = mid
		} else {
			lo = mid
		}
	}
	return e*binsPerOctave + int32(lo)
}

// binLower is base^i, the exclusive lower bound of bin i, computed as
// math.Ldexp(table[i mod 64], i div 64) with floor division.
func binLower(i int32) float64 {
	return math.Ldexp(octaveTable[i&(binsPerOctave-1)], int(i>>sketchScale))
}

// binValue is the representative value of bin i: the harmonic midpoint
// 2*lo*hi/(lo+hi) of (lo, hi] = (base^i, base^(i+1)], whose relative distance
// to any value in the bin is at most (base-1)/(base+1). It is computed on the
// mantissas and then scaled, so it cannot overflow in the last bin.
func binValue(i int32) float64 {
	lo, hi := octaveTable[i&(binsPerOctave-1)], octaveTable[i&(binsPerOctave-1)+1]
	return math.Ldexp(2*lo*hi/(lo+hi), int(i>>sketchScale))
}

// A bin code packs the sign with the index so one integer names a bin: 2*i
// for positive values, 2*i+1 for negative values (i may be negative).
// Finite values give codes within about ±137,500, far from int32's limits.
func binCode(i int32, negative bool) int32 {
	if negative {
		return 2*i + 1
	}
	return 2 * i
}

// splitCode inverts binCode with floor division: code -5 -> i=-3, negative.
func splitCode(code int32) (i int32, negative bool) {
	return code >> 1, code&1 == 1
}

// codeOf is the bin code of a nonzero finite v (binIndex of |v|, with v's
// sign). Zero has no code: callers count zeros separately.
func codeOf(v float64) int32 {
	return binCode(binIndex(math.Abs(v)), v < 0)
}

type binCount struct {
	code int32
	n    uint64
}

// Packed bins, the form the memory store keeps per bucket: bins sorted by
// code ascending, each as the varint of its code minus the previous code (the
// first relative to 0) followed by the uvarint of its count, never zero.
// Because codes are delta-encoded, bytes after an edited entry's successor
// stay valid verbatim, which is what makes single-bin inserts cheap.

func uvarintLen(x uint64) int { return (bits.Len64(x|1) + 6) / 7 }

func varintLen(x int64) int { return uvarintLen(uint64(x<<1) ^ uint64(x>>63)) }

func binSize(prev, code int32, n uint64) int {
	return varintLen(int64(code)-int64(prev)) + uvarintLen(n)
}

func appendBin(dst []byte, prev, code int32, n uint64) []byte {
	dst = binary.AppendVarint(dst, int64(code)-int64(prev))
	return binary.AppendUvarint(dst, n)
}

// binReader walks packed bins. A malformed tail reads as the end, so damaged
// bytes lose their own bins and nothing else. The hot paths spend their time
// here, so one-byte varints, the usual case, are decoded by hand.
type binReader struct {
	b    []byte
	pos  int
	code int32
}

func (r *binReader) next() (code int32, n uint64, ok bool) {
	b, p := r.b, r.pos
	var d int64
	if p < len(b) && b[p] < 0x80 {
		d, p = int64(b[p]>>1)^-int64(b[p]&1), p+1
	} else if v, k := binary.Varint(b[p:]); k > 0 {
		d, p = v, p+k
	} else {
		return 0, 0, false
	}
	if p < len(b) && b[p] < 0x80 {
		n, p = uint64(b[p]), p+1
	} else if p+1 < len(b) && b[p+1] < 0x80 {
		n, p = uint64(b[p]&0x7f)|uint64(b[p+1])<<7, p+2
	} else if v, k := binary.Uvarint(b[p:]); k > 0 {
		n, p = v, p+k
	} else {
		return 0, 0, false
	}
	r.pos, r.code = p, r.code+int32(d)
	return r.code, n, true
}

// seek advances to the first bin whose code is at least target and reports
// whether it passed a bin of target's sign. It is addOne's scan, kept in one
// loop without calls.
func (r *binReader) seek(target int32) (passedSign bool) {
	b, p, code := r.b, r.pos, r.code
	for p < len(b) {
		q, d := p, int32(0)
		if b[q] < 0x80 {
			d, q = int32(b[q]>>1)^-int32(b[q]&1), q+1
		} else if v, k := binary.Varint(b[q:]); k > 0 {
			d, q = int32(v), q+k
		} else {
			break
		}
		if code+d >= target {
			break
		}
		for q < len(b) && b[q] >= 0x80 {
			q++
		}
		if q == len(b) {
			break
		}
		code += d
		passedSign = passedSign || code&1 == target&1
		p = q + 1
	}
	r.pos, r.code = p, code
	return passedSign
}

// eachBin calls fn for every bin of packed in code order.
func eachBin(packed []byte, fn func(code int32, n uint64)) {
	r := binReader{b: packed}
	for code, n, ok := r.next(); ok; code, n, ok = r.next() {
		fn(code, n)
	}
}

// addBins merges delta (sorted by code ascending, distinct codes; zero counts
// are skipped) into packed, applies the bound, and returns the new packed
// bins. It never modifies packed or delta and always returns a fresh slice,
// so readers holding the old packed bins need no lock. packed must be nil or
// come from addBins with the same maxBins.
//
// The bound, exact and deterministic, which the Lua script mirrors: for each
// sign separately, let top be the largest index of that sign after merging
// and floor = top - maxBins + 1; every bin of that sign with index < floor is
// removed and its count added to the bin at floor (created if absent). Top
// bins are never collapsed, so top never decreases and the result depends
// only on the multiset of bins ever added, not on their order or grouping.
func addBins(packed []byte, delta []binCount, maxBins int) []byte {
	if len(delta) == 1 && delta[0].n > 0 {
		if out, ok := addOne(packed, delta[0]); ok {
			return out
		}
	}
	return encodeBins(boundBins(mergeBins(packed, delta), maxBins))
}

// addOne is the ingest hot path: one bin into bins that already satisfy the
// bound. When the new bin has bins of its sign both below and at or above it,
// neither top nor floor moves, so the result is a splice: the prefix, the new
// entry, the successor's re-encoded delta, and the rest verbatim. It reports
// false when the bound might change, leaving that to the general path.
func addOne(packed []byte, b binCount) ([]byte, bool) {
	r := binReader{b: packed}
	below := r.seek(b.code)
	at, prev := r.pos, r.code
	code, n, ok := r.next()
	switch {
	case !ok:
		return nil, false // b would be a new top
	case code == b.code:
		out := make([]byte, 0, at+binSize(prev, code, n+b.n)+len(packed)-r.pos)
		out = appendBin(append(out, packed[:at]...), prev, code, n+b.n)
		return append(out, packed[r.pos:]...), true
	case !below:
		return nil, false // b would be a new bottom, maybe below floor
	}
	for c := code; c&1 != b.code&1; {
		if c, _, ok = r.next(); !ok {
			return nil, false // b would be a new top
		}
	}
	countAt := at + varintLen(int64(code)-int64(prev))
	out := make([]byte, 0, at+binSize(prev, b.code, b.n)+varintLen(int64(code)-int64(b.code))+len(packed)-countAt)
	out = appendBin(append(out, packed[:at]...), prev, b.code, b.n)
	out = binary.AppendVarint(out, int64(code)-int64(b.code))
	return append(out, packed[countAt:]...), true
}

func mergeBins(packed []byte, delta []binCount) []binCount {
	// Every packed entry takes at least two bytes.
	out := make([]binCount, 0, len(packed)/2+len(delta))
	r := binReader{b: packed}
	code, n, ok := r.next()
	for _, d := range delta {
		if d.n == 0 {
			continue
		}
		for ok && code < d.code {
			out = append(out, binCount{code, n})
			code, n, ok = r.next()
		}
		if ok && code == d.code {
			d.n += n
			code, n, ok = r.next()
		}
		out = append(out, d)
	}
	for ; ok; code, n, ok = r.next() {
		out = append(out, binCount{code, n})
	}
	return out
}

// boundBins applies the bound (see addBins) to bins sorted by code, distinct,
// in place. Bounding any subset of a bucket's bins first changes nothing in
// the bucket, since the bound depends only on the union.
func boundBins(bins []binCount, maxBins int) []binCount {
	// No int32 codes span more than MaxInt32 indexes, so larger bounds mean the
	// same, and clamping keeps the floor arithmetic from overflowing.
	maxBins = min(max(maxBins, 1), math.MaxInt32)
	var first, last [2]int64
	var seen [2]bool
	for _, b := range bins {
		s := b.code & 1
		if !seen[s] {
			first[s], seen[s] = int64(b.code), true
		}
		last[s] = int64(b.code)
	}
	var floor [2]int64 // floor codes: 2*(top-maxBins+1)+sign
	collapse := false
	for s := range 2 {
		floor[s] = last[s] - 2*int64(maxBins-1)
		collapse = collapse || seen[s] && first[s] < floor[s]
	}
	if !collapse {
		return bins
	}
	order := [2]int{0, 1} // the lower floor code must be written first
	if floor[1] < floor[0] {
		order = [2]int{1, 0}
	}
	// Writing in place is safe: each floor bin written stands for at least
	// one bin already dropped, so writes never overtake reads.
	out := bins[:0]
	var carry [2]uint64
	for _, b := range bins {
		s := b.code & 1
		if int64(b.code) < floor[s] {
			carry[s] += b.n
			continue
		}
		for _, f := range order {
			if carry[f] == 0 || floor[f] > int64(b.code) {
				continue
			}
			if floor[f] == int64(b.code) {
				b.n += carry[f]
			} else {
				out = append(out, binCount{int32(floor[f]), carry[f]})
			}
			carry[f] = 0
		}
		out = append(out, b)
	}
	return out // each sign's top bin is at or above its floor: no carry remains
}

func encodeBins(bins []binCount) []byte {
	if len(bins) == 0 {
		return nil
	}
	size, prev := 0, int32(0)
	for _, b := range bins {
		size, prev = size+binSize(prev, b.code, b.n), b.code
	}
	out, prev := make([]byte, 0, size), 0
	for _, b := range bins {
		out, prev = appendBin(out, prev, b.code, b.n), b.code
	}
	return out
}

// sketchAcc accumulates bins of many buckets for one answer. The zero value
// is ready to use; reset lets one be reused. Counts are kept in dense runs by
// index, one per sign: a query adds every bin of many buckets, indexing an
// array costs well under half what a map update does, and a sign's indexes
// span a few thousand at most in practice (at most about 134,000: 1 MiB).
type sketchAcc struct {
	zero, n  uint64
	pos, neg binRun
}

// binRun counts by index: counts[k] belongs to index first+k.
type binRun struct {
	first  int32
	counts []uint64
}

func (r *binRun) add(i int32, n uint64) {
	if k := uint(int(i) - int(r.first)); k < uint(len(r.counts)) {
		r.counts[k] += n
		return
	}
	r.counts[r.grow(i)] += n
}

// grow extends the run to cover i, doubling it so growth is amortised but
// never past the indexes finite values can have, and returns i's position.
func (r *binRun) grow(i int32) int {
	// Codes no finite value has can only come from damaged input; clamping
	// keeps them from demanding a huge run.
	i = min(max(i, minBinIndex), maxBinIndex)
	lo, hi := int(r.first), int(r.first)+len(r.counts)
	switch {
	case len(r.counts) == 0:
		lo, hi = int(i)-32, int(i)+32
	case int(i) < lo:
		lo = min(int(i), hi-2*len(r.counts))
	case int(i) >= hi:
		hi = max(int(i)+1, lo+2*len(r.counts))
	default:
		return int(i) - lo
	}
	lo, hi = max(lo, minBinIndex), min(hi, maxBinIndex+1)
	counts := make([]uint64, hi-lo)
	if len(r.counts) > 0 {
		copy(counts[int(r.first)-lo:], r.counts)
	}
	r.first, r.counts = int32(lo), counts
	return int(i) - lo
}

func (a *sketchAcc) addZero(n uint64) { a.zero += n; a.n += n }

func (a *sketchAcc) add(code int32, n uint64) {
	if n == 0 {
		return
	}
	a.n += n
	a.run(code).add(code>>1, n)
}

func (a *sketchAcc) run(code int32) *binRun {
	if code&1 != 0 {
		return &a.neg
	}
	return &a.pos
}

func (a *sketchAcc) addPacked(packed []byte) {
	r := binReader{b: packed}
	for code, n, ok := r.next(); ok; code, n, ok = r.next() {
		a.n += n
		a.run(code).add(code>>1, n)
	}
}

// reset keeps the runs' memory, zeroed, for the next answer.
func (a *sketchAcc) reset() {
	clear(a.pos.counts)
	clear(a.neg.counts)
	a.zero, a.n = 0, 0
}

func (a *sketchAcc) total() uint64 { return a.n }

// quantiles answers, for each p in ps (percent, 0 < p <= 100), the
// nearest-rank percentile: the value at rank ceil(p/100*n) (at least 1) in
// ascending order, n = a.total(). Ascending order is negative bins from the
// largest index down, then zeros, then positive bins from the smallest index
// up; a bin answers ±binValue(i), zeros 0. Each answer is clamped to [lo, hi],
// the exact min and max of the samples, which makes a single sample or
// all-equal samples exact. Returns nil when n == 0.
func (a *sketchAcc) quantiles(lo, hi float64, ps []float64) []float64 {
	if a.n == 0 {
		return nil
	}
	ranks, order, out := make([]uint64, len(ps)), make([]int, len(ps)), make([]float64, len(ps))
	for k, p := range ps {
		ranks[k], order[k] = nearestRank(p, a.n), k
	}
	slices.SortFunc(order, func(x, y int) int { return cmp.Compare(ranks[x], ranks[y]) })
	// Walk the counts in ascending order of value, answering each rank when
	// the running count reaches it; sign 0 stands for the zeros.
	seen := uint64(0)
	visit := func(c uint64, i int32, sign float64) {
		seen += c
		for ; c > 0 && len(order) > 0 && ranks[order[0]] <= seen; order = order[1:] {
			out[order[0]] = min(max(sign*binValue(i), lo), hi)
		}
	}
	for k := len(a.neg.counts) - 1; k >= 0; k-- {
		visit(a.neg.counts[k], a.neg.first+int32(k), -1)
	}
	visit(a.zero, 0, 0)
	for k, c := range a.pos.counts {
		visit(c, a.pos.first+int32(k), 1)
	}
	return out
}

// nearestRank is ceil(p/100*n) clamped to [1, n]. Percentiles with up to six
// decimals (99, 99.9, 99.99) are computed in exact integer arithmetic, since
// in floating point 99/100*n can land just above an integer and skip a rank.
func nearestRank(p float64, n uint64) uint64 {
	if !(p > 0) {
		return 1
	}
	if p >= 100 {
		return n
	}
	for d, den := 0, uint64(100); d <= 6; d, den = d+1, den*10 {
		if s := p * math.Pow10(d); s == math.Trunc(s) {
			hi, lo := bits.Mul64(uint64(s), n)
			q, rem := bits.Div64(hi, lo, den) // q < n since s < den
			if rem != 0 {
				q++
			}
			return max(q, 1)
		}
	}
	return max(min(uint64(math.Ceil(p/100*float64(n))), n), 1)
}

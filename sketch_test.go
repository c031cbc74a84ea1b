package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"math/big"
	"math/rand/v2"
	"slices"
	"testing"
)

// Helpers: a naive model of the packed format and of the bound, written
// independently of the code under test.

func decodeAll(packed []byte) []binCount {
	var out []binCount
	eachBin(packed, func(code int32, n uint64) { out = append(out, binCount{code, n}) })
	return out
}

func naiveEncode(bins []binCount) []byte {
	var out []byte
	prev := int32(0)
	for _, b := range bins {
		out = binary.AppendVarint(out, int64(b.code)-int64(prev))
		out = binary.AppendUvarint(out, b.n)
		prev = b.code
	}
	return out
}

func sortedBins(m map[int32]uint64) []binCount {
	out := make([]binCount, 0, len(m))
	for code, n := range m {
		if n > 0 {
			out = append(out, binCount{code, n})
		}
	}
	slices.SortFunc(out, func(a, b binCount) int { return int(a.code) - int(b.code) })
	return out
}

// naiveBound applies the documented bound to a whole multiset at once.
func naiveBound(m map[int32]uint64, maxBins int) []byte {
	top := map[int32]int32{}
	seen := map[int32]bool{}
	for code, n := range m {
		if n == 0 {
			continue
		}
		i, neg := splitCode(code)
		s := int32(0)
		if neg {
			s = 1
		}
		if !seen[s] || i > top[s] {
			top[s], seen[s] = i, true
		}
	}
	out := map[int32]uint64{}
	for code, n := range m {
		i, neg := splitCode(code)
		s := int32(0)
		if neg {
			s = 1
		}
		if floor := top[s] - int32(maxBins) + 1; i < floor {
			i = floor
		}
		out[binCode(i, neg)] += n
	}
	return naiveEncode(sortedBins(out))
}

// checkPacked verifies the invariants every addBins result must hold.
func checkPacked(t testing.TB, packed []byte, maxBins int, wantTotal uint64) {
	t.Helper()
	bins := decodeAll(packed)
	if got := naiveEncode(bins); !bytes.Equal(got, packed) {
		t.Fatalf("naiveEncode(eachBin(%x)) = %x, want the same bytes", packed, got)
	}
	var total uint64
	var first, last [2]int32
	var seen [2]bool
	for k, b := range bins {
		if k > 0 && b.code <= bins[k-1].code {
			t.Fatalf("bin[%d].code = %d, want > %d", k, b.code, bins[k-1].code)
		}
		if b.n == 0 {
			t.Fatalf("bin[%d].n = 0 (code %d), want > 0", k, b.code)
		}
		total += b.n
		i, neg := splitCode(b.code)
		s := 0
		if neg {
			s = 1
		}
		if !seen[s] {
			first[s], seen[s] = i, true
		}
		last[s] = i
	}
	if total != wantTotal {
		t.Fatalf("total count = %d, want %d", total, wantTotal)
	}
	for s := range 2 {
		if seen[s] && int(last[s]-first[s]) >= maxBins {
			t.Fatalf("index span of sign %d = %d..%d, want at most %d bins", s, first[s], last[s], maxBins)
		}
	}
}

func logUniform(r *rand.Rand, lo, hi float64) float64 {
	return math.Exp(math.Log(lo) + r.Float64()*(math.Log(hi)-math.Log(lo)))
}

func TestOctaveTableExact(t *testing.T) {
	for k, got := range octaveTable {
		if want := math.Exp2(float64(k) / 64); got != want {
			t.Errorf("octaveTable[%d] = %v, want %v", k, got, want)
		}
	}
}

func TestBinIndexBoundaries(t *testing.T) {
	// Across the whole normal range: a lower bound belongs to the bin below
	// (upper bounds are inclusive), the next float up to the bin itself.
	for i := int32(-1022 * binsPerOctave); i <= maxBinIndex; i++ {
		lo := binLower(i)
		if got := binIndex(lo); got != i-1 {
			t.Fatalf("binIndex(binLower(%d) = %v) = %d, want %d", i, lo, got, i-1)
		}
		if up := math.Nextafter(lo, math.Inf(1)); binIndex(up) != i {
			t.Fatalf("binIndex(%v) = %d, want %d", up, binIndex(up), i)
		}
	}
	for e := -1074; e <= 1023; e++ {
		x := math.Ldexp(1, e)
		if got, want := binIndex(x), int32(e*binsPerOctave-1); got != want {
			t.Fatalf("binIndex(2^%d) = %d, want %d", e, got, want)
		}
	}
	for _, c := range []struct {
		x    float64
		want int32
	}{
		{5e-324, minBinIndex},
		{math.SmallestNonzeroFloat64, -68737},
		{math.MaxFloat64, maxBinIndex},
		{math.MaxFloat64, 65535},
		{1, -1},
		{math.Nextafter(1, 2), 0},
		{2, 63},
		{0.5, -65},
	} {
		if got := binIndex(c.x); got != c.want {
			t.Errorf("binIndex(%v) = %d, want %d", c.x, got, c.want)
		}
	}
	for k := -300; k <= 300; k++ {
		x := math.Pow(10, float64(k))
		i := binIndex(x)
		if !(binLower(i) < x && x <= binLower(i+1)) {
			t.Errorf("binIndex(1e%d) = %d, whose bin (%v, %v] misses it", k, i, binLower(i), binLower(i+1))
		}
		if approx := math.Log2(x) * 64; math.Abs(float64(i)-approx) > 1.01 {
			t.Errorf("binIndex(1e%d) = %d, want about %v", k, i, approx)
		}
	}
	// Subnormals: scaling by 2^64 is exact and must move the index by 64*64.
	r := rand.New(rand.NewPCG(7, 7))
	for range 10000 {
		x := math.Float64frombits(1 + r.Uint64N(1<<52-1))
		if got, want := binIndex(x), binIndex(math.Ldexp(x, 64))-64*64; got != want {
			t.Fatalf("binIndex(%v) = %d, want %d", x, got, want)
		}
	}
}

func TestBinValue(t *testing.T) {
	const maxRel = 0.0055
	for i := int32(-1022 * binsPerOctave); i < maxBinIndex; i++ {
		lo, hi, v := binLower(i), binLower(i+1), binValue(i)
		if !(lo < v && v < hi) {
			t.Fatalf("binValue(%d) = %v, want inside (%v, %v)", i, v, lo, hi)
		}
		if d := (v - lo) / lo; d > maxRel {
			t.Fatalf("binValue(%d) relative distance to lower bound = %v, want <= %v", i, d, maxRel)
		}
		if d := (hi - v) / hi; d > maxRel {
			t.Fatalf("binValue(%d) relative distance to upper bound = %v, want <= %v", i, d, maxRel)
		}
	}
	// The last bin's upper bound, 2^1024, overflows: check it halved.
	i := int32(maxBinIndex)
	lo, v := binLower(i)/2, binValue(i)/2
	if hi := math.Ldexp(1, 1023); !(lo < v && v < hi) || (v-lo)/lo > maxRel || (hi-v)/hi > maxRel || math.IsInf(binValue(i), 0) {
		t.Errorf("binValue(%d) = %v, want finite and within %v of (%v, 2^1024]", i, binValue(i), maxRel, binLower(i))
	}
}

func TestBinCodes(t *testing.T) {
	for _, c := range []struct {
		code int32
		i    int32
		neg  bool
	}{
		{-5, -3, true}, {-4, -2, false}, {-1, -1, true}, {0, 0, false},
		{1, 0, true}, {2, 1, false}, {7, 3, true},
	} {
		i, neg := splitCode(c.code)
		if i != c.i || neg != c.neg {
			t.Errorf("splitCode(%d) = %d, %v, want %d, %v", c.code, i, neg, c.i, c.neg)
		}
		if got := binCode(c.i, c.neg); got != c.code {
			t.Errorf("binCode(%d, %v) = %d, want %d", c.i, c.neg, got, c.code)
		}
	}
	for _, c := range []struct {
		v    float64
		want int32
	}{
		{5e-324, 2 * minBinIndex}, {-5e-324, 2*minBinIndex + 1},
		{math.MaxFloat64, 2 * maxBinIndex}, {-math.MaxFloat64, 2*maxBinIndex + 1},
		{1.5, 2 * binIndex(1.5)}, {-1.5, 2*binIndex(1.5) + 1},
	} {
		if got := codeOf(c.v); got != c.want {
			t.Errorf("codeOf(%v) = %d, want %d", c.v, got, c.want)
		}
	}
	if lo, hi := int64(2*minBinIndex), int64(2*maxBinIndex+1); lo < -1<<20 || hi > 1<<20 {
		t.Errorf("code range = [%d, %d], want well inside int32", lo, hi)
	}
}

func TestNearestRank(t *testing.T) {
	huge := new(big.Int).SetUint64(math.MaxUint64)
	huge.Mul(huge, big.NewInt(99))
	huge.Add(huge, big.NewInt(99))
	huge.Div(huge, big.NewInt(100))
	for _, c := range []struct {
		p    float64
		n    uint64
		want uint64
	}{
		{50, 1, 1}, {50, 2, 1}, {50, 3, 2}, {99, 100, 99}, {99, 101, 100},
		{99.9, 1000, 999}, {99.9, 1001, 1000}, {99.99, 10000, 9999}, {0.1, 1000, 1},
		{1, 100000, 1000}, {100, 7, 7}, {1e-9, 1000, 1}, {0, 5, 1}, {-3, 5, 1},
		{math.NaN(), 5, 1}, {150, 5, 5}, {99, 1e12, 99e10}, {99, 1e12 + 1, 99e10 + 1},
		{99, math.MaxUint64, huge.Uint64()}, {100.0 / 3, 3, 1}, {200.0 / 3, 3, 2},
	} {
		if got := nearestRank(c.p, c.n); got != c.want {
			t.Errorf("nearestRank(%v, %d) = %d, want %d", c.p, c.n, got, c.want)
		}
	}
}

func TestAddBins(t *testing.T) {
	pos := func(i int32, n uint64) binCount { return binCount{binCode(i, false), n} }
	neg := func(i int32, n uint64) binCount { return binCount{binCode(i, true), n} }
	for _, c := range []struct {
		name    string
		packed  []binCount
		delta   []binCount
		maxBins int
		want    []binCount
	}{
		{"into empty", nil, []binCount{pos(5, 1)}, 8, []binCount{pos(5, 1)}},
		{"increment", []binCount{pos(1, 2), pos(5, 1), pos(9, 4)}, []binCount{pos(5, 300)}, 16,
			[]binCount{pos(1, 2), pos(5, 301), pos(9, 4)}},
		{"between", []binCount{pos(1, 2), pos(9, 4)}, []binCount{pos(5, 1)}, 16,
			[]binCount{pos(1, 2), pos(5, 1), pos(9, 4)}},
		{"between across signs", []binCount{pos(1, 2), neg(3, 1), pos(9, 4)}, []binCount{pos(5, 1)}, 16,
			[]binCount{pos(1, 2), neg(3, 1), pos(5, 1), pos(9, 4)}},
		{"new top past a bin of the other sign", []binCount{pos(1, 2), neg(4, 1), neg(5, 1)}, []binCount{pos(3, 1)}, 2,
			[]binCount{pos(2, 2), pos(3, 1), neg(4, 1), neg(5, 1)}},
		{"new top collapses", []binCount{pos(1, 2), pos(3, 1), pos(6, 4)}, []binCount{pos(8, 1)}, 6,
			[]binCount{pos(3, 3), pos(6, 4), pos(8, 1)}},
		{"new top creates floor", []binCount{pos(1, 2), pos(2, 1), pos(6, 4)}, []binCount{pos(8, 1)}, 6,
			[]binCount{pos(3, 3), pos(6, 4), pos(8, 1)}},
		{"new bottom below floor", []binCount{pos(3, 2), pos(8, 1)}, []binCount{pos(-100, 5)}, 6,
			[]binCount{pos(3, 7), pos(8, 1)}},
		{"signs bounded apart", []binCount{neg(0, 1), pos(0, 1), neg(10, 1)}, []binCount{pos(20, 1)}, 4,
			[]binCount{neg(7, 1), neg(10, 1), pos(17, 1), pos(20, 1)}},
		{"one bin per sign", []binCount{neg(-3, 1), pos(-2, 2)}, []binCount{neg(4, 1), pos(9, 1)}, 1,
			[]binCount{neg(4, 2), pos(9, 3)}},
		{"huge bound", []binCount{pos(-60000, 1), neg(-60000, 1)}, []binCount{pos(60000, 1), neg(60000, 1)}, math.MaxInt,
			[]binCount{pos(-60000, 1), neg(-60000, 1), pos(60000, 1), neg(60000, 1)}},
		{"bound below one", []binCount{pos(1, 1)}, []binCount{pos(3, 1)}, -5, []binCount{pos(3, 2)}},
		{"skips zero counts", []binCount{pos(1, 1)}, []binCount{pos(0, 0), pos(2, 0)}, 8, []binCount{pos(1, 1)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			packed := naiveEncode(c.packed)
			packedCopy := slices.Clone(packed)
			deltaCopy := slices.Clone(c.delta)
			got := decodeAll(addBins(packed, c.delta, c.maxBins))
			if !slices.Equal(got, c.want) {
				t.Errorf("addBins(%v, %v, %d) = %v, want %v", c.packed, c.delta, c.maxBins, got, c.want)
			}
			if !bytes.Equal(packed, packedCopy) || !slices.Equal(c.delta, deltaCopy) {
				t.Errorf("inputs after addBins = %x, %v, want unchanged %x, %v", packed, c.delta, packedCopy, deltaCopy)
			}
		})
	}
}

func TestPackedRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for trial := range 200 {
		m := map[int32]uint64{}
		for range r.IntN(500) {
			code := int32(r.IntN(2*(maxBinIndex-minBinIndex))) + 2*minBinIndex
			m[code] = 1 + r.Uint64N(1<<uint(1+r.IntN(63)))
		}
		d := sortedBins(m)
		if got := decodeAll(addBins(nil, d, math.MaxInt32)); !slices.Equal(got, d) && len(d) > 0 {
			t.Fatalf("trial %d: eachBin(addBins(nil, d, big)) = %v, want %v", trial, got, d)
		}
	}
}

// TestBoundOrderIndependent adds one multiset in many orders and groupings,
// with bounds tight enough to collapse, and wants identical bytes each time.
func TestBoundOrderIndependent(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	for _, maxBins := range []int{1, 2, 7, 64, maxBinsPerSign} {
		for trial := range 20 {
			var samples []binCount
			m := map[int32]uint64{}
			var total uint64
			for range 1 + r.IntN(2000) {
				code := int32(r.IntN(600)) - 300
				if r.IntN(10) == 0 {
					code *= 100
				}
				n := 1 + r.Uint64N(5)
				samples = append(samples, binCount{code, n})
				m[code] += n
				total += n
			}
			want := naiveBound(m, maxBins)
			for order := range 4 {
				r.Shuffle(len(samples), func(a, b int) { samples[a], samples[b] = samples[b], samples[a] })
				var packed []byte
				for rest := samples; len(rest) > 0; {
					k := 1 + r.IntN(min(len(rest), []int{1, 4, 50, 400}[order]))
					batch := map[int32]uint64{}
					for _, s := range rest[:k] {
						batch[s.code] += s.n
					}
					packed, rest = addBins(packed, sortedBins(batch), maxBins), rest[k:]
				}
				checkPacked(t, packed, maxBins, total)
				if !bytes.Equal(packed, want) {
					t.Fatalf("maxBins %d trial %d order %d: addBins in batches = %v, want %v", maxBins, trial, order, decodeAll(packed), decodeAll(want))
				}
			}
		}
	}
}

// sketchOf builds one bucket from pre-aggregated counts.
func sketchOf(values []float64) (packed []byte, zeros uint64) {
	m := map[int32]uint64{}
	for _, v := range values {
		if v == 0 {
			zeros++
		} else {
			m[codeOf(v)]++
		}
	}
	return addBins(nil, sortedBins(m), maxBinsPerSign), zeros
}

func TestQuantileAccuracy(t *testing.T) {
	ps := []float64{1, 10, 50, 90, 95, 99, 100}
	gen := func(seed uint64, n int, f func(r *rand.Rand) float64) []float64 {
		r := rand.New(rand.NewPCG(seed, seed))
		out := make([]float64, n)
		for k := range out {
			out[k] = f(r)
		}
		return out
	}
	worst := 0.0
	for _, c := range []struct {
		name   string
		values []float64
		exact  bool
	}{
		{"log-uniform 1e-3..1e9", gen(1, 100000, func(r *rand.Rand) float64 { return logUniform(r, 1e-3, 1e9) }), false},
		{"negative log-uniform", gen(2, 100000, func(r *rand.Rand) float64 { return -logUniform(r, 1e-3, 1e9) }), false},
		{"mixed sign with zeros", gen(3, 100000, func(r *rand.Rand) float64 {
			switch r.IntN(10) {
			case 0:
				return 0
			case 1, 2, 3:
				return -logUniform(r, 1e-6, 1e6)
			}
			return logUniform(r, 1e-6, 1e6)
		}), false},
		{"all equal", gen(4, 1000, func(*rand.Rand) float64 { return 3.7 }), true},
		{"all equal negative", gen(4, 1000, func(*rand.Rand) float64 { return -1e-7 }), true},
		{"single sample", []float64{42.42}, true},
		{"1e6 samples", gen(5, 1000000, func(r *rand.Rand) float64 { return logUniform(r, 1e-2, 1e4) }), false},
		{"15 orders 1e-3..1e12", gen(6, 200000, func(r *rand.Rand) float64 { return logUniform(r, 1e-3, 1e12) }), false},
		{"small integers", gen(7, 100000, func(r *rand.Rand) float64 { return float64(1 + r.IntN(1000)) }), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			packed, zeros := sketchOf(c.values)
			var a sketchAcc
			a.addPacked(packed)
			a.addZero(zeros)
			sorted := slices.Sorted(slices.Values(c.values))
			n := uint64(len(sorted))
			if a.total() != n {
				t.Fatalf("total() = %d, want %d", a.total(), n)
			}
			lo, hi := sorted[0], sorted[n-1]
			got := a.quantiles(lo, hi, ps)
			for k, p := range ps {
				want := sorted[(uint64(p)*n+99)/100-1]
				if c.exact && got[k] != want {
					t.Errorf("quantile(%v) = %v, want %v exactly", p, got[k], want)
				}
				if got[k] < lo || got[k] > hi {
					t.Errorf("quantile(%v) = %v, want within [%v, %v]", p, got[k], lo, hi)
				}
				rel := 0.0
				if want != 0 {
					rel = math.Abs(got[k]-want) / math.Abs(want)
				} else if got[k] != 0 {
					rel = math.Inf(1)
				}
				worst = max(worst, rel)
				if rel > 0.01 {
					t.Errorf("quantile(%v) = %v, want %v within 1%% (off by %.4f%%)", p, got[k], want, 100*rel)
				}
			}
		})
	}
	t.Logf("worst relative error: %.4f%%", 100*worst)
}

// TestMergeHalves splits data in two buckets built in random batches and
// wants the merge to equal the whole, byte for byte and answer for answer.
func TestMergeHalves(t *testing.T) {
	r := rand.New(rand.NewPCG(21, 22))
	for _, maxBins := range []int{maxBinsPerSign, 100} {
		values := make([]float64, 50000)
		for k := range values {
			switch r.IntN(20) {
			case 0:
				values[k] = 0
			case 1, 2:
				values[k] = -logUniform(r, 1e-4, 1e8)
			default:
				values[k] = logUniform(r, 1e-4, 1e8)
			}
		}
		build := func(vs []float64) (packed []byte, zeros uint64) {
			for rest := vs; len(rest) > 0; {
				k := 1 + r.IntN(min(len(rest), []int{1, 1, 10, 500}[r.IntN(4)]))
				batch := map[int32]uint64{}
				for _, v := range rest[:k] {
					if v == 0 {
						zeros++
					} else {
						batch[codeOf(v)]++
					}
				}
				packed, rest = addBins(packed, sortedBins(batch), maxBins), rest[k:]
			}
			return packed, zeros
		}
		r.Shuffle(len(values), func(a, b int) { values[a], values[b] = values[b], values[a] })
		half := r.IntN(len(values))
		pa, za := build(values[:half])
		pb, zb := build(values[half:])
		whole, zw := build(values)
		if merged := addBins(pa, decodeAll(pb), maxBins); !bytes.Equal(merged, whole) || za+zb != zw {
			t.Errorf("maxBins %d: addBins(half a, half b) = %x (zeros %d), want the whole's %x (zeros %d)", maxBins, merged, za+zb, whole, zw)
		}
		var parts, all sketchAcc
		parts.addPacked(pa)
		parts.addPacked(pb)
		parts.addZero(za + zb)
		all.addPacked(whole)
		all.addZero(zw)
		ps := []float64{1, 10, 50, 90, 95, 99, 99.9, 100}
		lo, hi := slices.Min(values), slices.Max(values)
		if got, want := parts.quantiles(lo, hi, ps), all.quantiles(lo, hi, ps); !slices.Equal(got, want) {
			t.Errorf("maxBins %d: quantiles of halves = %v, want %v", maxBins, got, want)
		}
	}
}

func TestSketchAcc(t *testing.T) {
	var a sketchAcc
	if got := a.quantiles(0, 1, []float64{50}); got != nil {
		t.Errorf("quantiles of empty = %v, want nil", got)
	}
	for _, v := range []float64{-10, -1, 1, 10} {
		a.add(codeOf(v), 1)
	}
	a.addZero(2)
	a.add(codeOf(5), 0)
	ps := []float64{100, 1, 50, 16, 33, 66, 83}
	want := []float64{10, -10, 0, -10, -1, 0, 1}
	for k, v := range a.quantiles(-10, 10, ps) {
		if math.Abs(v-want[k]) > 0.0055*math.Abs(want[k]) || (want[k] == 0) != (v == 0) {
			t.Errorf("quantile(%v) = %v, want about %v", ps[k], v, want[k])
		}
	}
	if got := a.quantiles(-2, 2, []float64{1, 100}); !slices.Equal(got, []float64{-2, 2}) {
		t.Errorf("clamped quantiles = %v, want [-2 2]", got)
	}
	a.reset()
	if a.total() != 0 || a.quantiles(0, 1, []float64{50}) != nil {
		t.Errorf("after reset: total() = %d, quantiles = %v, want 0, nil", a.total(), a.quantiles(0, 1, []float64{50}))
	}

	// Runs growing both ways, by far jumps and near ones, keep every count.
	r := rand.New(rand.NewPCG(5, 6))
	m := map[int32]uint64{}
	for range 20000 {
		code := int32(r.IntN(2*(maxBinIndex-minBinIndex))) + 2*minBinIndex
		if r.IntN(4) > 0 {
			code = int32(r.IntN(400)) - 200
		}
		m[code]++
		a.add(code, 1)
	}
	got := map[int32]uint64{}
	for s, run := range []binRun{a.pos, a.neg} {
		for k, n := range run.counts {
			if n > 0 {
				got[binCode(run.first+int32(k), s == 1)] = n
			}
		}
	}
	if g, w := sortedBins(got), sortedBins(m); !slices.Equal(g, w) {
		t.Errorf("accumulated bins = %v, want %v", g, w)
	}
	a.add(math.MaxInt32, 1) // damaged input: clamped, not a huge allocation
	a.add(math.MinInt32, 1)
	if len(a.pos.counts)+len(a.neg.counts) > 2*(maxBinIndex-minBinIndex+1) {
		t.Errorf("runs hold %d counts, want a bounded number", len(a.pos.counts)+len(a.neg.counts))
	}
}

func FuzzAddBins(f *testing.F) {
	f.Add([]byte{3, 1, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Add([]byte{0, 255, 255, 1, 0, 0, 1, 128, 0, 7, 127, 255, 3})
	f.Add(bytes.Repeat([]byte{9, 200, 17, 4}, 64))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 || len(data) > 4096 {
			return
		}
		maxBins := 1 + int(data[0]%40)
		if data[0] >= 240 {
			maxBins = maxBinsPerSign
		}
		all := map[int32]uint64{}
		var packed []byte
		var total uint64
		// Each step: batch size, then per bin a 2-byte signed code step and a count.
		for rest := data[1:]; len(rest) > 0; {
			k := 1 + int(rest[0]%8)
			rest = rest[1:]
			batch := map[int32]uint64{}
			for ; k > 0 && len(rest) >= 3; k-- {
				code := int32(int16(binary.LittleEndian.Uint16(rest)))
				if rest[2]&0x80 != 0 {
					code *= 2048
				}
				n := uint64(rest[2] & 0x7f)
				batch[code] += n
				all[code] += n
				total += n
				rest = rest[3:]
			}
			if k > 0 {
				rest = nil
			}
			before := slices.Clone(packed)
			delta := sortedBins(batch)
			deltaCopy := slices.Clone(delta)
			next := addBins(packed, delta, maxBins)
			if !bytes.Equal(packed, before) || !slices.Equal(delta, deltaCopy) {
				t.Fatalf("inputs after addBins = %x, %v, want unchanged %x, %v", packed, delta, before, deltaCopy)
			}
			packed = next
			checkPacked(t, packed, maxBins, total)
		}
		if want := naiveBound(all, maxBins); !bytes.Equal(packed, want) {
			t.Fatalf("addBins in steps = %v, want %v", decodeAll(packed), decodeAll(want))
		}
	})
}

func benchPacked(r *rand.Rand, bins int) []byte {
	m := map[int32]uint64{}
	for i := range bins {
		m[binCode(int32(2*i), false)] = 1 + r.Uint64N(1000)
	}
	return addBins(nil, sortedBins(m), maxBinsPerSign)
}

func BenchmarkAddBins(b *testing.B) {
	for _, size := range []int{1, 200} {
		b.Run(fmt.Sprintf("%d-into-400", size), func(b *testing.B) {
			r := rand.New(rand.NewPCG(1, 2))
			packed := benchPacked(r, 400)
			deltas := make([][]binCount, 64)
			for k := range deltas {
				m := map[int32]uint64{}
				for len(m) < size {
					m[binCode(int32(1+r.IntN(797)), false)] = 1 + r.Uint64N(10)
				}
				deltas[k] = sortedBins(m)
			}
			b.ReportAllocs()
			k := 0
			for b.Loop() {
				_ = addBins(packed, deltas[k%len(deltas)], maxBinsPerSign)
				k++
			}
		})
	}
}

func BenchmarkSketchAccQuantiles(b *testing.B) {
	r := rand.New(rand.NewPCG(3, 4))
	buckets := make([][]byte, 1000)
	for k := range buckets {
		buckets[k] = benchPacked(r, 400)
	}
	ps := []float64{50, 90, 95, 99}
	var a sketchAcc
	b.ReportAllocs()
	for b.Loop() {
		a.reset()
		for _, p := range buckets {
			a.addPacked(p)
		}
		_ = a.quantiles(0, math.MaxFloat64, ps)
	}
}

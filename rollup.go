package main

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// Samples are not kept one by one: every series keeps buckets at four
// resolutions, aligned to the Unix epoch, plus (when days are kept forever)
// one running total. This file holds the arithmetic of that layout, shared
// by both stores: which buckets a window reads, which a series point reads,
// and which retention still keeps. It is pure: values in, values out.

// resolution is a bucket width. res1s..res1d are the stored resolutions;
// resAll is the running total of everything, one bucket at start 0.
type resolution int

const (
	res1s resolution = iota
	res1m
	res1h
	res1d
	resAll

	numRes = 4 // the timed resolutions, res1s..res1d
)

// seconds is the bucket width; resAll has none.
func (r resolution) seconds() int64 {
	switch r {
	case res1s:
		return 1
	case res1m:
		return 60
	case res1h:
		return 3600
	case res1d:
		return 86400
	}
	panic("resolution has no width: " + r.String())
}

// secondsOr1 is the width, or 1 for resAll, whose one bucket starts at 0.
func (r resolution) secondsOr1() int64 {
	if r == resAll {
		return 1
	}
	return r.seconds()
}

func (r resolution) String() string {
	switch r {
	case res1s:
		return "1s"
	case res1m:
		return "1m"
	case res1h:
		return "1h"
	case res1d:
		return "1d"
	case resAll:
		return "all"
	}
	return fmt.Sprintf("resolution(%d)", int(r))
}

// unit names a bucket of r in messages ("per minute").
func (r resolution) unit() string {
	return [...]string{"second", "minute", "hour", "day"}[r]
}

// chunk is how many buckets of r share one entry of the Redis retention
// index (a minute of seconds, an hour of minutes, a day of hours, a month
// of days), so the index costs a sixtieth of the buckets it tracks.
func (r resolution) chunk() int64 {
	return [...]int64{60, 60, 24, 30}[r]
}

// floorTo is t rounded down to a multiple of w (w > 0), also below zero.
func floorTo(t, w int64) int64 {
	q := t / w
	if t%w != 0 && t < 0 {
		q--
	}
	return q * w
}

// ceilTo is t rounded up to a multiple of w.
func ceilTo(t, w int64) int64 {
	return -floorTo(-t, w)
}

// floorDiv is a / b rounded down, also for negative a.
func floorDiv(a, b int64) int64 {
	return floorTo(a, b) / b
}

// retention is the horizon of each timed resolution, in seconds; 0 keeps
// that resolution forever. Coarser resolutions never have shorter horizons
// (config checks it), so whatever a finer one keeps a coarser one keeps too.
//
// A type's horizons are measured back from its anchor: the earlier of its
// newest sample and the server's clock (Unix seconds, rounded down). A
// bucket is kept while its end plus the horizon is after the anchor. The
// anchor never moves back, so a bucket once dropped is never wanted again.
type retention [numRes]int64

func (h retention) keeps(r resolution, start, anchor int64) bool {
	if r == resAll || h[r] == 0 {
		return true
	}
	return start+r.seconds()+h[r] > anchor
}

// firstKept is the start of the earliest bucket of r that is kept at
// anchor; math.MinInt64 when r is kept forever.
func (h retention) firstKept(r resolution, anchor int64) int64 {
	if r == resAll || h[r] == 0 {
		return math.MinInt64
	}
	w := r.seconds()
	return floorTo(anchor-h[r]-w, w) + w
}

// never is the expiry of what is kept forever: later than any anchor.
const never = math.MaxInt64

// expiry is when a bucket of r starting at start stops being kept: the
// anchor at which it goes (Unix seconds), or never.
func (h retention) expiry(r resolution, start int64) int64 {
	if r == resAll || h[r] == 0 {
		return never
	}
	return start + r.seconds() + h[r]
}

// lastKept is the anchor from which no resolution keeps a sample taken in
// second t any more; never when some resolution keeps it forever.
func (h retention) lastKept(t int64) int64 {
	until := int64(math.MinInt64)
	for r := res1s; r < numRes; r++ {
		until = max(until, h.expiry(r, floorTo(t, r.seconds())))
	}
	return until
}

// keepsSample reports whether any resolution keeps a sample taken in second
// t at anchor; a sample no resolution keeps is refused.
func (h retention) keepsSample(t, anchor int64) bool {
	for r := res1s; r < numRes; r++ {
		if h.keeps(r, floorTo(t, r.seconds()), anchor) {
			return true
		}
	}
	return false
}

// forever reports whether days are kept forever, so that the running
// total (resAll) is the all-time summary.
func (h retention) forever() bool { return h[res1d] == 0 }

// span is the buckets of one resolution from start up to end (seconds,
// multiples of the width). left tells which bound of its window the span
// hangs from, for messages.
type span struct {
	res        resolution
	start, end int64
	left       bool
}

// buckets is how many buckets the span covers.
func (s span) buckets() int64 {
	if s.res == resAll {
		return 1
	}
	return (s.end - s.start) / s.res.seconds()
}

// planWindow covers [from, to) with the fewest buckets: whole days in the
// middle, then whole hours, minutes and seconds towards each edge. That is
// at most 2 x (23 + 59 + 59) buckets plus the days, whatever the window's
// length or the samples in it. from and to are whole seconds.
func planWindow(from, to int64) []span {
	var out []span
	var cover func(from, to int64, r resolution, left bool)
	cover = func(from, to int64, r resolution, left bool) {
		if from >= to {
			return
		}
		if r == res1s {
			out = append(out, span{res1s, from, to, left})
			return
		}
		w := r.seconds()
		a, b := ceilTo(from, w), floorTo(to, w)
		if a >= b {
			cover(from, to, r-1, left)
			return
		}
		cover(from, a, r-1, true)
		out = append(out, span{r, a, b, r == res1d || left})
		cover(b, to, r-1, false)
	}
	cover(from, to, res1d, true)
	return out
}

// agedError refuses a window whose bound falls where its resolution has
// aged out but a coarser one is still kept: answering would be approximate.
type agedError struct {
	bound string     // "from" or "to"
	res   resolution // the coarser resolution still kept there
	since int64      // data before this second is kept per res only
	kept  int64      // the first second the bound's own resolution keeps
}

func (e *agedError) Error() string {
	return fmt.Sprintf("%s: data before %s is kept per %s; align %s to a whole %s",
		e.bound, formatTime(e.since), e.res.unit(), e.bound, e.res.unit())
}

// refuseAged refuses, with an agedError, spans that reach back where
// their resolution has aged out at anchor while a coarser one still keeps
// that time: the samples are there, only not at the detail asked for.
// Where no resolution keeps a time any more, the data has aged out
// entirely, and the reader simply leaves out the buckets retention no
// longer keeps. The coarser resolutions are asked about the last second
// aged out, the newest, since the coarser ones keep that one the longest.
func (h retention) refuseAged(spans []span, anchor int64) error {
	for _, s := range spans {
		if s.res == resAll {
			continue
		}
		first := h.firstKept(s.res, anchor)
		if s.start >= first {
			continue
		}
		last := min(first, s.end) - 1
		for c := s.res + 1; c < numRes; c++ {
			if h.keeps(c, floorTo(last, c.seconds()), anchor) {
				bound := "to"
				if s.left {
					bound = "from"
				}
				return &agedError{bound: bound, res: c, since: h.firstKept(c-1, anchor), kept: first}
			}
		}
	}
	return nil
}

// Series limits: Prometheus's cap on points per answer, and a bound on the
// buckets one answer may read.
const (
	maxSeriesPoints  = 11000
	maxSeriesBuckets = 100000
)

// seriesPlan is a chart's worth of points: from, to and step in seconds,
// each point [t, t+step) summed from buckets of res.
type seriesPlan struct {
	from, to, step int64
	res            resolution
}

func (p seriesPlan) points() int64 { return (p.to - p.from) / p.step }

// bucketsRead is how many buckets the plan reads in one series.
func (p seriesPlan) bucketsRead() int64 { return (p.to - p.from) / p.res.seconds() }

// key is the plan in a cache key.
func (p seriesPlan) key() string {
	return strconv.FormatInt(p.from, 10) + "|" + strconv.FormatInt(p.to, 10) + "|" + strconv.FormatInt(p.step, 10)
}

// refuseSeriesCount refuses a plan that would read more than
// maxSeriesBuckets buckets over n series, naming a step that fits.
func (p seriesPlan) refuseSeriesCount(n int) error {
	budget := maxSeriesBuckets / max(int64(n), 1)
	if p.bucketsRead() <= budget {
		return nil
	}
	fits, ok := smallestStep(p.from, p.to, budget)
	if !ok {
		return unprocessable("from: %d series over %d days read more than %d buckets even by the day; shorten the window or filter to fewer series",
			n, (p.to-p.from)/res1d.seconds(), maxSeriesBuckets)
	}
	return unprocessable("step: %s over %d series reads %d buckets, more than %d; use a step of at least %s",
		formatStep(p.step), n, p.bucketsRead()*int64(n), maxSeriesBuckets, formatStep(fits))
}

// coarsestDividing is the coarsest stored resolution whose width divides
// step, so each point adds whole buckets of it.
func coarsestDividing(step int64) resolution {
	for r := res1d; r > res1s; r-- {
		if step%r.seconds() == 0 {
			return r
		}
	}
	return res1s
}

// planSeries aligns [from, to) to step (from down, to up) and checks the
// limits. A refusal names the smallest step that fits, or, when even day
// buckets are too many, the longest window that fits.
func planSeries(from, to, step int64) (seriesPlan, error) {
	p := alignSeries(from, to, step)
	if p.points() <= maxSeriesPoints && p.bucketsRead() <= maxSeriesBuckets {
		return p, nil
	}
	fits, ok := smallestStep(from, to, maxSeriesBuckets)
	if !ok {
		return p, unprocessable("from: the window is %d days long; a series covers at most %d days",
			(to-from)/res1d.seconds(), maxSeriesBuckets)
	}
	if p.points() > maxSeriesPoints {
		return p, unprocessable("step: %s gives %d points, more than %d; use a step of at least %s",
			formatStep(step), p.points(), maxSeriesPoints, formatStep(fits))
	}
	return p, unprocessable("step: %s reads %d %s buckets, more than %d; use a step of at least %s",
		formatStep(step), p.bucketsRead(), p.res, maxSeriesBuckets, formatStep(fits))
}

func alignSeries(from, to, step int64) seriesPlan {
	return seriesPlan{from: floorTo(from, step), to: max(ceilTo(to, step), floorTo(from, step)+step),
		step: step, res: coarsestDividing(step)}
}

// smallestStep is the smallest whole-second step within the points limit
// and maxBuckets for [from, to): for each resolution, the smallest multiple of its width that
// fits, and the least of those. None fits when even day buckets are too
// many; a step longer than the window plus a day never helps, so the
// search stops there.
func smallestStep(from, to, maxBuckets int64) (int64, bool) {
	best := int64(math.MaxInt64)
	limit := to - from + res1d.seconds()
	for r := res1s; r < numRes; r++ {
		w := r.seconds()
		if (to-from)/w > maxBuckets {
			continue // too many buckets of r, whatever the step
		}
		for k := max(1, (to-from)/maxSeriesPoints/w); k*w < best && k*w <= limit; k++ {
			if p := alignSeries(from, to, k*w); p.points() <= maxSeriesPoints && p.bucketsRead() <= maxBuckets {
				best = k * w
				break
			}
		}
	}
	return best, best != math.MaxInt64
}

// formatStep writes a step as a Go duration without zero units ("1m", not
// "1m0s").
func formatStep(secs int64) string {
	s := (time.Duration(secs) * time.Second).String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

func formatTime(secs int64) string {
	return time.Unix(secs, 0).UTC().Format(time.RFC3339)
}

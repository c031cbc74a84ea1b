package main

import (
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

func TestPlanWindowCoversExactly(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	base := testEpoch.Unix()
	for range 2000 {
		from := base + rng.Int64N(40*86400) - 20*86400
		to := from + rng.Int64N([]int64{90, 7200, 3 * 86400, 400 * 86400}[rng.IntN(4)])
		spans := planWindow(from, to)
		at := from
		days, edge := int64(0), int64(0)
		for _, s := range spans {
			if s.start != at || s.end <= s.start || s.start%s.res.seconds() != 0 || s.end%s.res.seconds() != 0 {
				t.Fatalf("planWindow(%d, %d) = %v: span %v does not continue at %d aligned", from, to, spans, s, at)
			}
			at = s.end
			if s.res == res1d {
				days += s.buckets()
			} else {
				edge += s.buckets()
			}
		}
		if at != max(from, to) && from < to {
			t.Fatalf("planWindow(%d, %d) = %v ends at %d", from, to, spans, at)
		}
		if edge > 2*(59+59+23) {
			t.Fatalf("planWindow(%d, %d) reads %d edge buckets, more than 2 x (59+59+23)", from, to, edge)
		}
		if want := (to - from) / 86400; days > want {
			t.Fatalf("planWindow(%d, %d) reads %d days, more than the %d in it", from, to, days, want)
		}
	}
	if got := planWindow(10, 10); len(got) != 0 {
		t.Errorf("planWindow of an empty window = %v, want no spans", got)
	}
}

func TestRetentionKeeps(t *testing.T) {
	h := retention{3600, 7 * 86400, 90 * 86400, 0}
	anchor := int64(1_000_000_000)
	for _, c := range []struct {
		r     resolution
		start int64
		want  bool
	}{
		{res1s, anchor - 3600, true},  // ends at anchor-3599: inside the hour
		{res1s, anchor - 3601, false}, // ends exactly at anchor-3600
		{res1m, floorTo(anchor-7*86400, 60), true},
		{res1m, floorTo(anchor-7*86400, 60) - 60, false},
		{res1d, 0, true}, // forever
		{resAll, 0, true},
	} {
		if got := h.keeps(c.r, c.start, anchor); got != c.want {
			t.Errorf("keeps(%s, %d, %d) = %v, want %v", c.r, c.start, anchor, got, c.want)
		}
		if first := h.firstKept(c.r, anchor); c.r != resAll && (c.start >= first) != c.want {
			t.Errorf("firstKept(%s) = %d disagrees with keeps for %d", c.r, first, c.start)
		}
	}
	if h.keepsSample(0, anchor) != true {
		t.Error("keepsSample with days kept forever = false, want true")
	}
	finite := retention{60, 3600, 86400, 2 * 86400}
	if finite.keepsSample(anchor-3*86400, anchor) {
		t.Error("keepsSample of a sample older than every horizon = true, want false")
	}
}

func TestRefuseAgedWhereOnlyCoarserRemains(t *testing.T) {
	h := retention{3600, 7 * 86400, 90 * 86400, 0}
	anchor := testEpoch.Unix() + 30*86400
	from := anchor - 2*3600 + 17 // its seconds have aged out, its minutes not
	err := h.refuseAged(planWindow(from, anchor), anchor)
	ae, ok := err.(*agedError)
	if !ok || ae.bound != "from" || ae.res != res1m || ae.kept != h.firstKept(res1s, anchor) {
		t.Fatalf("refuseAged of a window from 2h ago at second 17 = %v, want an agedError for from, per minute", err)
	}
	if msg := ae.Error(); !strings.Contains(msg, "from: data before") || !strings.Contains(msg, "align from to a whole minute") {
		t.Errorf("message %q does not say what to do", msg)
	}
	// Aligned to the minute, it is exact and accepted.
	if err := h.refuseAged(planWindow(floorTo(from, 60), anchor), anchor); err != nil {
		t.Errorf("refuseAged of the minute-aligned window = %v, want nil", err)
	}
	// Days kept for a year, hours for 90 days: an hourly span from 400
	// days ago has days to offer for most of its aged part, so it is
	// refused rather than answered with zeros there.
	yearly := retention{3600, 7 * 86400, 90 * 86400, 365 * 86400}
	start := floorTo(anchor-400*86400, 3600)
	if err := yearly.refuseAged([]span{{res1h, start, floorTo(anchor, 3600), true}}, anchor); err == nil {
		t.Error("refuseAged of hours from 400 days ago with days kept a year = nil, want an agedError")
	}
	// Where nothing keeps the time at all, there is nothing to refuse:
	// the reader leaves those buckets out (TestIngestRefusesByTime).
	gone := retention{60, 120, 3600, 86400}
	if err := gone.refuseAged(planWindow(anchor-10*86400+5, anchor), anchor); err != nil {
		t.Errorf("refuseAged where everything aged out = %v, want nil", err)
	}
}

func TestPlanSeries(t *testing.T) {
	day := int64(86400)
	for _, c := range []struct {
		from, to, step int64
		want           seriesPlan
		err            string
	}{
		{0, 3600, 60, seriesPlan{0, 3600, 60, res1m}, ""},
		{7, 3599, 60, seriesPlan{0, 3600, 60, res1m}, ""}, // from down, to up
		{0, 3600, 90, seriesPlan{0, 3600, 90, res1s}, ""}, // 1m does not divide 90s
		{0, 7 * day, 3600, seriesPlan{0, 7 * day, 3600, res1h}, ""},
		{5, 5, 10, seriesPlan{0, 10, 10, res1s}, ""},                                   // an empty window still has its step
		{0, 2 * day, 1, seriesPlan{}, "use a step of at least 1m"},                     // 16s would fit the points, not the 1 s buckets
		{0, 7 * day, 10, seriesPlan{}, "use a step of at least 1m"},                    // 60,480 points fit, 604,800 1 s buckets do not
		{0, 100_001 * day, 86400, seriesPlan{}, "a series covers at most 100000 days"}, // no step fits: refused at once
	} {
		got, err := planSeries(c.from, c.to, c.step)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("planSeries(%d, %d, %d) = %v, want an error saying %q", c.from, c.to, c.step, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("planSeries(%d, %d, %d) = %+v, %v; want %+v", c.from, c.to, c.step, got, err, c.want)
		}
	}
	// The step a refusal names does fit.
	rng := rand.New(rand.NewPCG(3, 4))
	for range 200 {
		from := rng.Int64N(1e6)
		to := from + rng.Int64N(400*day)
		s, ok := smallestStep(from, to, maxSeriesBuckets)
		if _, err := planSeries(from, to, s); !ok || err != nil {
			t.Fatalf("smallestStep(%d, %d) = %d, which planSeries refuses: %v", from, to, s, err)
		}
	}
}

func TestFormatStep(t *testing.T) {
	for secs, want := range map[int64]string{1: "1s", 60: "1m", 90: "1m30s", 3600: "1h", 5400: "1h30m", 86400: "24h"} {
		if got := formatStep(secs); got != want {
			t.Errorf("formatStep(%d) = %q, want %q", secs, got, want)
		}
	}
}

func TestParseDurationDays(t *testing.T) {
	for in, want := range map[string]time.Duration{"7d": 7 * 24 * time.Hour, "1d12h": 36 * time.Hour, "90": 90 * time.Second, "1h": time.Hour} {
		if got, err := parseDuration(in); err != nil || got != want {
			t.Errorf("parseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"d", "xd", "-1d", "1dx"} {
		if _, err := parseDuration(in); err == nil {
			t.Errorf("parseDuration(%q) = nil error, want one", in)
		}
	}
}

func TestRetentionConfig(t *testing.T) {
	env := func(kv map[string]string) func(string) string { return func(k string) string { return kv[k] } }
	cfg, err := loadConfig(env(nil))
	if err != nil || cfg.Retention != (retention{3600, 7 * 86400, 90 * 86400, 0}) {
		t.Fatalf("default retention = %v, %v", cfg.Retention, err)
	}
	for _, bad := range []map[string]string{
		{"RETENTION_1M": "30m"},                     // shorter than 1s's hour
		{"RETENTION_1S": "0"},                       // forever, but minutes are not
		{"RETENTION_1H": "1.5"},                     // not whole seconds
		{"RETENTION_1D": "1d", "RETENTION_1H": "0"}, // hours forever, days not
	} {
		if _, err := loadConfig(env(bad)); err == nil || !strings.Contains(err.Error(), "RETENTION_") {
			t.Errorf("loadConfig(%v) = %v, want an error naming the variable", bad, err)
		}
	}
}

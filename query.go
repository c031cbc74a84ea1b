package main

import (
	"context"
	"errors"
	"math"
	"strconv"
	"strings"
	"time"
)

// reader answers summaries, series and the list of types from the store's
// buckets, through the read-through cache.
type reader struct {
	store   metricStore
	cache   *readCache
	horizon retention
	now     func() time.Time
}

// summaryBody is the answer of GET /api/metrics/summary.
type summaryBody struct {
	Type string `json:"type"`
	aggregateValues
}

// seriesBody is the answer of GET /api/metrics/series.
type seriesBody struct {
	Type   string        `json:"type"`
	From   string        `json:"from"`
	To     string        `json:"to"`
	Step   string        `json:"step"`
	Points []seriesPoint `json:"points"`
}

type seriesPoint struct {
	Time string `json:"time"`
	aggregateValues
}

func (b seriesBody) approxBytes() int { return 100 + 200*len(b.Points) }

// typeInfo is one entry of GET /api/metrics/types.
type typeInfo struct {
	Type   string `json:"type"`
	Count  int64  `json:"count"`
	First  string `json:"first"`
	Last   string `json:"last"`
	Series int    `json:"series"`
}

// summary answers over [from, to) (whole seconds; nil for an open end).
func (q *reader) summary(ctx context.Context, typ string, from, to *int64) (summaryBody, error) {
	body, _, err := q.summaryAnswer(ctx, typ, from, to, false)
	return body, err
}

// summaryAnswer is summary for a handler: with rawOK, an answer cached in
// Redis comes as its JSON.
func (q *reader) summaryAnswer(ctx context.Context, typ string, from, to *int64, rawOK bool) (summaryBody, []byte, error) {
	key := "s|" + optBound(from) + "|" + optBound(to)
	return cachedRead(ctx, q.cache, typ, key, rawOK, func(ctx context.Context) (summaryBody, uint64, error) {
		acc, version, err := q.window(ctx, typ, from, to)
		return summaryBody{Type: typ, aggregateValues: acc.values()}, version, err
	})
}

func optBound(t *int64) string {
	if t == nil {
		return ""
	}
	return strconv.FormatInt(*t, 10)
}

// window merges the buckets of typ that cover [from, to). The version it
// returns is the earliest it read, so the answer holds every write up to
// it.
func (q *reader) window(ctx context.Context, typ string, from, to *int64) (aggregateAcc, uint64, error) {
	var acc aggregateAcc
	version := uint64(math.MaxUint64)
	var spans []span
	if from == nil && to == nil && q.horizon.forever() {
		spans = []span{{res: resAll, end: 1}}
	} else {
		lo, hi := int64(math.MinInt64), int64(math.MaxInt64)
		if from != nil {
			lo = *from
		}
		if to != nil {
			hi = *to
		}
		if from != nil && to != nil {
			spans = planWindow(lo, hi)
		}
		if from == nil || to == nil || bucketsIn(spans) > maxWindowBuckets {
			// An open end reaches to the type's first or newest sample, and
			// a long window need not read the days before or after them:
			// there is nothing there, so the answer stays exact.
			m, err := q.store.meta(ctx, typ)
			if err != nil || m.version == 0 {
				return acc, 0, err
			}
			version = m.version
			lo = max(lo, floorTo(floorDiv(m.first, 1_000_000), res1d.seconds()), q.horizon.firstKept(res1d, m.anchor(q.now().UnixMicro())))
			hi = min(hi, ceilTo(floorDiv(m.newest, 1_000_000)+1, res1d.seconds()))
			spans = planWindow(lo, hi)
		}
	}
	m, buckets, err := q.store.read(ctx, typ, spans)
	if err != nil || m.version == 0 {
		return acc, 0, err
	}
	anchor := m.anchor(q.now().UnixMicro())
	if err := q.horizon.refuseAged(spans, anchor); err != nil {
		return acc, 0, unprocessable("%s", err)
	}
	for i := range buckets {
		if q.horizon.keeps(buckets[i].res, buckets[i].start, anchor) {
			acc.add(&buckets[i])
		}
	}
	return acc, min(version, m.version), nil
}

// maxWindowBuckets is the size of window plan above which the window is
// first cut to the days its type has data in.
const maxWindowBuckets = 1000

func bucketsIn(spans []span) int64 {
	n := int64(0)
	for _, s := range spans {
		n += s.buckets()
	}
	return n
}

// series answers one point per step of p; with rawOK, an answer cached in
// Redis comes as its JSON.
func (q *reader) series(ctx context.Context, typ string, p seriesPlan, rawOK bool) (seriesBody, []byte, error) {
	key := "r|" + strconv.FormatInt(p.from, 10) + "|" + strconv.FormatInt(p.to, 10) + "|" + strconv.FormatInt(p.step, 10)
	return cachedRead(ctx, q.cache, typ, key, rawOK, func(ctx context.Context) (seriesBody, uint64, error) {
		body := seriesBody{Type: typ, From: formatTime(p.from), To: formatTime(p.to), Step: formatStep(p.step)}
		spans := []span{{res: p.res, start: p.from, end: p.to, left: true}}
		m, buckets, err := q.store.read(ctx, typ, spans)
		if err != nil {
			return body, 0, err
		}
		anchor := m.anchor(q.now().UnixMicro())
		var aged *agedError
		if err := q.horizon.refuseAged(spans, anchor); errors.As(err, &aged) {
			return body, 0, unprocessable("from: data before %s is kept per %s; start at %s or later, or use a step of whole %ss",
				formatTime(aged.since), aged.res.unit(), formatTime(aged.kept), aged.res.unit())
		}
		body.Points = make([]seriesPoint, 0, p.points())
		var acc aggregateAcc
		j := 0
		for t := p.from; t < p.to; t += p.step {
			acc.reset()
			for ; j < len(buckets) && buckets[j].start < t+p.step; j++ {
				if q.horizon.keeps(p.res, buckets[j].start, anchor) {
					acc.add(&buckets[j])
				}
			}
			body.Points = append(body.Points, seriesPoint{Time: formatTime(t), aggregateValues: acc.values()})
		}
		return body, m.version, nil
	})
}

// types lists the types with data whose names start with prefix.
func (q *reader) types(ctx context.Context, prefix string) ([]typeInfo, error) {
	metas, err := q.store.types(ctx)
	if err != nil {
		return nil, err
	}
	out := []typeInfo{}
	now := q.now().UnixMicro()
	for _, m := range metas {
		if !strings.HasPrefix(m.name, prefix) {
			continue
		}
		first := floorDiv(m.first, 1_000_000)
		count := m.total.count
		if !q.horizon.forever() {
			// What has aged out cannot be subtracted from a running total:
			// the count is the sum of the days still kept.
			first = max(first, q.horizon.firstKept(res1d, m.anchor(now)))
			s, err := q.summary(ctx, m.name, nil, nil)
			if err != nil {
				return nil, err
			}
			count = s.Count
		}
		out = append(out, typeInfo{Type: m.name, Count: count, First: formatTime(first),
			Last: formatTime(floorDiv(m.newest, 1_000_000)), Series: 1})
	}
	return out, nil
}

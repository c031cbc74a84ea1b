package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"net/http"
	"slices"
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

// groupBody is one group of a grouped answer: the value of the group_by
// label ({} for the series without it) and its values.
type groupBody struct {
	Labels map[string]string `json:"labels"`
	aggregateValues
}

// groupedSummaryBody is the answer of a summary with group_by.
type groupedSummaryBody struct {
	Type   string      `json:"type"`
	Groups []groupBody `json:"groups"`
}

// summary answers over [from, to) (whole seconds; nil for an open end).
func (q *reader) summary(ctx context.Context, typ string, from, to *int64) (summaryBody, error) {
	body, _, err := q.summaryAnswer(ctx, typ, from, to, labelFilter{}, false)
	return body, err
}

// summaryAnswer is summary for a handler, over the series f matches (f
// has no group_by); with rawOK, an answer cached in Redis comes as its
// JSON.
func (q *reader) summaryAnswer(ctx context.Context, typ string, from, to *int64, f labelFilter, rawOK bool) (summaryBody, []byte, error) {
	key := "s|" + optBound(from) + "|" + optBound(to) + f.key()
	return cachedRead(ctx, q.cache, typ, key, rawOK, func(ctx context.Context) (summaryBody, uint64, error) {
		groups, version, err := q.window(ctx, typ, from, to, f)
		body := summaryBody{Type: typ}
		if len(groups) > 0 {
			body.aggregateValues = groups[0].acc.values()
		}
		return body, version, err
	})
}

// groupedSummary is a summary with group_by: one group per value among the
// matching series with samples in the window.
func (q *reader) groupedSummary(ctx context.Context, typ string, from, to *int64, f labelFilter, rawOK bool) (groupedSummaryBody, []byte, error) {
	key := "g|" + optBound(from) + "|" + optBound(to) + f.key()
	return cachedRead(ctx, q.cache, typ, key, rawOK, func(ctx context.Context) (groupedSummaryBody, uint64, error) {
		groups, version, err := q.window(ctx, typ, from, to, f)
		body := groupedSummaryBody{Type: typ, Groups: []groupBody{}}
		for _, g := range groups {
			if g.acc.count > 0 {
				body.Groups = append(body.Groups, groupBody{Labels: g.labels, aggregateValues: g.acc.values()})
			}
		}
		return body, version, err
	})
}

func optBound(t *int64) string {
	if t == nil {
		return ""
	}
	return strconv.FormatInt(*t, 10)
}

// seriesGroup is the series one answer merges: the type-wide buckets for
// a query without labels, or the series a filter matches, one group of
// them per value of its group_by label.
type seriesGroup struct {
	labels map[string]string // the group's label; nil when not grouped
	ids    []string
	acc    aggregateAcc
}

// selectSeries groups the series of typ that f asks for: the series
// without the group_by label first, then by its value. The version is the
// one the list of series is as of.
func (q *reader) selectSeries(ctx context.Context, typ string, f labelFilter) ([]seriesGroup, uint64, error) {
	if !f.filtered() {
		return []seriesGroup{{ids: []string{typeWide}}}, math.MaxUint64, nil
	}
	version, ids, err := q.store.series(ctx, typ, f.match)
	if err != nil {
		return nil, 0, err
	}
	var groups []seriesGroup
	at := map[string]int{} // group value (with a mark for none) -> index
	for _, id := range ids {
		labels, err := parseSeriesID(id)
		if err != nil {
			return nil, 0, err
		}
		key, g := "", map[string]string(nil)
		if f.groupBy != "" {
			g = map[string]string{}
			if v, ok := f.group(labels); ok {
				key, g[f.groupBy] = "="+v, v
			}
		}
		i, ok := at[key]
		if !ok {
			i = len(groups)
			at[key] = i
			groups = append(groups, seriesGroup{labels: g})
		}
		groups[i].ids = append(groups[i].ids, id)
	}
	slices.SortFunc(groups, func(a, b seriesGroup) int {
		av, aok := a.labels[f.groupBy]
		bv, bok := b.labels[f.groupBy]
		return cmp.Or(cmp.Compare(boolInt(aok), boolInt(bok)), strings.Compare(av, bv))
	})
	return groups, version, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// readGroups reads the buckets of every group's series in spans, in one
// atomic read: per group, each series' buckets in the order of ids. While
// a delete's type-wide buckets are being added up again (Redis, after a
// delete), the type-wide group is read from every series instead.
func (q *reader) readGroups(ctx context.Context, typ string, groups []seriesGroup, spans []span) (typeMeta, [][][]storedBucket, error) {
	var ids []string
	for _, g := range groups {
		ids = append(ids, g.ids...)
	}
	m, all, err := q.store.read(ctx, typ, ids, spans)
	if err == nil && m.rebuilding && len(groups) == 1 && slices.Equal(groups[0].ids, []string{typeWide}) {
		var listed uint64
		if listed, ids, err = q.store.series(ctx, typ, nil); err != nil {
			return m, nil, err
		}
		if err := q.fitsRead(ids, spans); err != nil {
			return m, nil, err
		}
		groups[0].ids = ids
		m, all, err = q.store.read(ctx, typ, ids, spans)
		// The answer holds the series as listed: a series made or deleted
		// after the list makes it older than the read.
		m.version = min(m.version, listed)
	}
	out := make([][][]storedBucket, len(groups))
	for i, g := range groups {
		out[i], all = all[:len(g.ids)], all[len(g.ids):]
	}
	return m, out, err
}

// fitsRead refuses a read of the type's series in spans that would read
// more buckets than a series request may.
func (q *reader) fitsRead(ids []string, spans []span) error {
	if n := int64(len(ids)) * bucketsIn(spans); n > maxSeriesBuckets {
		return &requestError{http.StatusServiceUnavailable, fmt.Sprintf("the type is being reclaimed after a delete, and reading its %d series meanwhile would read %d buckets; try again in a moment, or filter by a label", len(ids), n)}
	}
	return nil
}

// window merges, for each group of series f selects, their buckets that
// cover [from, to). The version it returns is the earliest it read, so
// the answer holds every write up to it.
func (q *reader) window(ctx context.Context, typ string, from, to *int64, f labelFilter) ([]seriesGroup, uint64, error) {
	groups, version, err := q.selectSeries(ctx, typ, f)
	if err != nil || len(groups) == 0 {
		return nil, version, err
	}
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
				return nil, 0, err
			}
			version = min(version, m.version)
			lo = max(lo, floorTo(floorDiv(m.first, 1_000_000), res1d.seconds()), q.horizon.firstKept(res1d, m.anchor(q.now().UnixMicro())))
			hi = min(hi, ceilTo(floorDiv(m.newest, 1_000_000)+1, res1d.seconds()))
			spans = planWindow(lo, hi)
		}
	}
	m, buckets, err := q.readGroups(ctx, typ, groups, spans)
	if err != nil || m.version == 0 {
		return nil, 0, err
	}
	anchor := m.anchor(q.now().UnixMicro())
	if err := q.horizon.refuseAged(spans, anchor); err != nil {
		return nil, 0, unprocessable("%s", err)
	}
	for i := range groups {
		for _, list := range buckets[i] {
			for j := range list {
				if q.horizon.keeps(list[j].res, list[j].start, anchor) {
					groups[i].acc.add(&list[j])
				}
			}
		}
	}
	return groups, min(version, m.version), nil
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

// groupedSeriesBody is the answer of a series with group_by.
type groupedSeriesBody struct {
	Type   string             `json:"type"`
	From   string             `json:"from"`
	To     string             `json:"to"`
	Step   string             `json:"step"`
	Groups []groupSeriesPoint `json:"groups"`
}

type groupSeriesPoint struct {
	Labels map[string]string `json:"labels"`
	Points []seriesPoint     `json:"points"`
}

func (b groupedSeriesBody) approxBytes() int {
	n := 100
	for _, g := range b.Groups {
		n += 100 + 200*len(g.Points)
	}
	return n
}

// series answers one point per step of p over the series f matches (f
// has no group_by); with rawOK, an answer cached in Redis comes as its
// JSON.
func (q *reader) series(ctx context.Context, typ string, p seriesPlan, f labelFilter, rawOK bool) (seriesBody, []byte, error) {
	key := "r|" + p.key() + f.key()
	return cachedRead(ctx, q.cache, typ, key, rawOK, func(ctx context.Context) (seriesBody, uint64, error) {
		body := seriesBody{Type: typ, From: formatTime(p.from), To: formatTime(p.to), Step: formatStep(p.step)}
		points, version, err := q.seriesPoints(ctx, typ, p, f)
		body.Points = []seriesPoint{}
		if len(points) > 0 {
			body.Points = points[0].points
		} else if err == nil {
			body.Points = emptyPoints(p)
		}
		return body, version, err
	})
}

// groupedSeries is a series with group_by: one group per value among the
// matching series with samples in [from, to).
func (q *reader) groupedSeries(ctx context.Context, typ string, p seriesPlan, f labelFilter, rawOK bool) (groupedSeriesBody, []byte, error) {
	key := "q|" + p.key() + f.key()
	return cachedRead(ctx, q.cache, typ, key, rawOK, func(ctx context.Context) (groupedSeriesBody, uint64, error) {
		body := groupedSeriesBody{Type: typ, From: formatTime(p.from), To: formatTime(p.to), Step: formatStep(p.step), Groups: []groupSeriesPoint{}}
		groups, version, err := q.seriesPoints(ctx, typ, p, f)
		for _, g := range groups {
			if g.count > 0 {
				body.Groups = append(body.Groups, groupSeriesPoint{Labels: g.labels, Points: g.points})
			}
		}
		return body, version, err
	})
}

// pointsGroup is one group's points of a series answer.
type pointsGroup struct {
	labels map[string]string
	points []seriesPoint
	count  int64 // samples in all its points
}

func emptyPoints(p seriesPlan) []seriesPoint {
	out := make([]seriesPoint, 0, p.points())
	for t := p.from; t < p.to; t += p.step {
		out = append(out, seriesPoint{Time: formatTime(t)})
	}
	return out
}

// seriesPoints computes the points of each group of series f selects.
func (q *reader) seriesPoints(ctx context.Context, typ string, p seriesPlan, f labelFilter) ([]pointsGroup, uint64, error) {
	groups, version, err := q.selectSeries(ctx, typ, f)
	if err != nil || len(groups) == 0 {
		return nil, version, err
	}
	n := 0
	for _, g := range groups {
		n += len(g.ids)
	}
	if err := p.refuseSeriesCount(n); err != nil {
		return nil, 0, err
	}
	spans := []span{{res: p.res, start: p.from, end: p.to, left: true}}
	m, buckets, err := q.readGroups(ctx, typ, groups, spans)
	if err != nil {
		return nil, 0, err
	}
	anchor := m.anchor(q.now().UnixMicro())
	var aged *agedError
	if err := q.horizon.refuseAged(spans, anchor); errors.As(err, &aged) {
		return nil, 0, unprocessable("from: data before %s is kept per %s; start at %s or later, or use a step of whole %ss",
			formatTime(aged.since), aged.res.unit(), formatTime(aged.kept), aged.res.unit())
	}
	out := make([]pointsGroup, len(groups))
	var acc aggregateAcc
	for i, g := range groups {
		out[i] = pointsGroup{labels: g.labels, points: make([]seriesPoint, 0, p.points())}
		next := make([]int, len(buckets[i])) // per series, its next bucket
		for t := p.from; t < p.to; t += p.step {
			acc.reset()
			for s, list := range buckets[i] {
				for ; next[s] < len(list) && list[next[s]].start < t+p.step; next[s]++ {
					if q.horizon.keeps(p.res, list[next[s]].start, anchor) {
						acc.add(&list[next[s]])
					}
				}
			}
			out[i].count += acc.count
			out[i].points = append(out[i].points, seriesPoint{Time: formatTime(t), aggregateValues: acc.values()})
		}
	}
	return out, min(version, m.version), nil
}

// labels lists the label names of typ's series, each with its values,
// sorted.
func (q *reader) labels(ctx context.Context, typ string) (map[string][]string, error) {
	_, ids, err := q.store.series(ctx, typ, nil)
	if err != nil {
		return nil, err
	}
	values := map[string]map[string]bool{}
	for _, id := range ids {
		labels, err := parseSeriesID(id)
		if err != nil {
			return nil, err
		}
		for _, l := range labels {
			if values[l.name] == nil {
				values[l.name] = map[string]bool{}
			}
			values[l.name][l.value] = true
		}
	}
	out := map[string][]string{}
	for name, vs := range values {
		out[name] = slices.Sorted(maps.Keys(vs))
	}
	return out, nil
}

// types lists the types with data whose names start with prefix.
func (q *reader) types(ctx context.Context, prefix string) ([]typeInfo, error) {
	metas, err := q.store.types(ctx, q.now())
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
			Last: formatTime(floorDiv(m.newest, 1_000_000)), Series: m.series})
	}
	return out, nil
}

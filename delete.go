package main

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/gomodule/redigo/redis"
)

// Deleting: DELETE /api/metrics?metric_type=T[&label=k:v] removes the
// type's series that hold every label given (all of them without one),
// with their buckets and index entries, and frees their MAX_SERIES room;
// with its last series the type goes, and frees its MAX_TYPES room. Each
// store takes the series out in one atomic step, so a read sees them whole
// or not at all, and bumps the type's version in that step, so no answer
// cached before it is served after it, on any instance; the type's cached
// answers are then dropped too, for their room. The type-wide buckets the
// series were part of are added up again from the series that remain: by
// the memory store in that step, by Redis after it, a few at a time
// (reclaim), while reads of the whole type read its series instead.

// handleDelete answers a delete. It is routed only with AUTH_TOKENS set,
// behind the write gate's token and rate limit (main.go).
func handleDelete(log *slog.Logger, store metricStore, cache *readCache, deleted func(string), now func() time.Time) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		typ, err := parseMetricType(q)
		// A delete does what it is asked exactly or nothing: a parameter
		// it does not take (a window, a second type) is refused, not
		// ignored.
		for name, vals := range q {
			if name != "label" && (name != "metric_type" || len(vals) > 1) {
				err = unprocessable("a delete takes one metric_type and label=name:value filters only; got %s", truncate(name, 40))
			}
		}
		var f labelFilter
		if err == nil {
			f, err = parseLabelFilter(q["label"], nil)
		}
		var n int
		if err == nil {
			n, err = store.remove(r.Context(), typ, f.match, now())
		}
		if err != nil {
			writeFailure(w, r, log, err)
			return
		}
		// Live charts read the type again (event: resync).
		if n > 0 && deleted != nil {
			deleted(typ)
		}
		// The version already keeps the old answers from being served.
		if err := cache.entries.purge(r.Context(), typ); err != nil {
			log.Warn("cached answers of a deleted type not dropped", "type", typ, "err", err)
		}
		writeJSON(w, http.StatusOK, struct {
			Message string `json:"message"`
			Type    string `json:"type"`
			Series  int    `json:"series"`
		}{"deleted", typ, n})
	})
}

// handleDeleteRefused answers every delete when AUTH_TOKENS is not set: a
// service anyone can write to must not let anyone erase it.
func handleDeleteRefused() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusForbidden, "deleting needs AUTH_TOKENS")
	})
}

// errBeingDeleted refuses, storing nothing, an ingest into a type, or a
// series, whose keys a delete is still reclaiming: for a moment after a
// large delete on Redis.
func errBeingDeleted(typ string) error {
	return &requestError{http.StatusServiceUnavailable, fmt.Sprintf("%s is being deleted; try again in a moment", typ)}
}

// ---- memory ----

// grave is what a deleted type leaves in the memory store: its version,
// bumped, until Unix ns until.
type grave struct {
	version uint64
	until   int64
}

func (m *memoryStore) remove(_ context.Context, typ string, match []label, now time.Time) (int, error) {
	t := m.lookup(typ)
	if t == nil {
		return 0, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	ids := t.matching(match)
	if len(ids) == 0 {
		return 0, nil
	}
	if len(ids) == len(t.series) {
		// The whole type goes. An ingest that found it before finds it
		// dead once it holds its lock, and looks again (add); a type of
		// the name made after goes on from its version (typesFor).
		t.dead = true
		m.graves.Store(typ, grave{version: t.version.Load() + 1, until: now.Add(m.forget).UnixNano()})
		m.byName.CompareAndDelete(typ, t)
		m.mu.Lock()
		if t.counted.Load() {
			t.counted.Store(false)
			m.count--
		}
		m.mu.Unlock()
		return len(ids), nil
	}
	// The type-wide buckets the deleted series held are added up again.
	type at struct {
		res   resolution
		start int64
	}
	touched := map[at]bool{}
	for _, id := range ids {
		s := t.series[id]
		for r := range s.buckets {
			for _, b := range s.buckets[r] {
				touched[at{resolution(r), b.start}] = true
			}
		}
		t.dropSeries(id)
	}
	t.rebuild(func(r resolution, start int64) bool { return touched[at{r, start}] })
	t.version.Add(1)
	return len(ids), nil
}

// matching is the ids of the type's series that hold every label in
// match (all of them for none).
func (t *memType) matching(match []label) []string {
	if len(match) == 0 {
		return slices.Collect(maps.Keys(t.series))
	}
	var out []string
	for id := range t.pairs[match[0]] {
		if !slices.ContainsFunc(match[1:], func(l label) bool { return !t.pairs[l][id] }) {
			out = append(out, id)
		}
	}
	return out
}

// rebuild adds up again the type-wide buckets for which touched holds, and
// the running total, from the type's series, in the order of their ids, as
// lua/reclaim.lua does: each series' bucket is its records already added
// up, so both stores hold the same sums.
func (t *memType) rebuild(touched func(r resolution, start int64) bool) {
	for r := range t.buckets {
		t.buckets[r] = slices.DeleteFunc(t.buckets[r], func(b memBucket) bool { return touched(resolution(r), b.start) })
	}
	t.all = memBucket{}
	for _, id := range slices.Sorted(maps.Keys(t.series)) {
		s := t.series[id]
		for r := range s.buckets {
			for _, b := range s.buckets[r] {
				if touched(resolution(r), b.start) {
					t.memBuckets.apply([]bucketDelta{deltaOf(resolution(r), b)}, 0, retention{})
				}
			}
		}
		if s.all.count > 0 {
			t.all.merge(deltaOf(resAll, s.all))
		}
	}
}

// deltaOf is a bucket as a delta, to merge it into another.
func deltaOf(r resolution, b memBucket) bucketDelta {
	d := bucketDelta{res: r, start: b.start, stats: b.stats, zero: b.zero}
	eachBin(b.bins, func(code int32, n uint64) { d.bins = append(d.bins, binCount{code, n}) })
	return d
}

// ---- Redis ----

//go:embed lua/records.lua
var recordsLua string

//go:embed lua/delete.lua
var deleteLua string

//go:embed lua/reclaim.lua
var reclaimLua string

var (
	deleteScript  = newScript(recordsLua + deleteLua)
	reclaimScript = newScript(recordsLua + reclaimLua)
)

// reclaimBudget is how many keys one step of reclaiming reads by default
// (redisStore.stepBudget): a few milliseconds of Redis's time, so a
// delete of any size holds up no one.
const reclaimBudget = 500

// reclaimAfterDelete is how long a delete goes on reclaiming before it
// answers by default (redisStore.reclaimWait), so a small delete is done
// by then; the background goes on with the rest.
const reclaimAfterDelete = time.Second

// graveLifetime is how long a deleted type's version is kept: longer than
// any answer of it can stay cached.
func graveLifetime(cacheTTL time.Duration) time.Duration { return 2*cacheTTL + time.Minute }

// remove deletes the matching series in one step that touches only the
// registry (lua/delete.lua); their keys are reclaimed after, a few at a
// time (reclaim).
func (s *redisStore) remove(ctx context.Context, typ string, match []label, _ time.Time) (int, error) {
	_, matched, err := s.series(ctx, typ, match)
	if err != nil || len(matched) == 0 {
		return 0, err
	}
	keys := []string{s.keys.types(), s.keys.reclaimTypes(), s.keys.compactTypes(), s.keys.meta(typ),
		s.keys.seriesRegistry(typ), s.keys.seriesUntil(typ), s.keys.garbage(typ), s.keys.compactBuckets(typ)}
	args := []any{typ, s.keys.tag(typ), len(matched)}
	holders := map[string][]string{} // label set key -> the deleted ids in it
	for _, id := range matched {
		args = append(args, seriesHash(id), id)
		labels, _ := parseSeriesID(id) // made by seriesID
		for _, l := range labels {
			k := s.keys.labelIndex(typ, l)
			holders[k] = append(holders[k], id)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(holders)) {
		keys = append(keys, k)
		args = append(args, len(holders[k]))
		for _, id := range holders[k] {
			args = append(args, id)
		}
	}
	args = append(args, s.keys.streamChannel(), encodeUpdates([]update{{typ: typ, resync: resyncDeleted}}))
	if s.cluster {
		// The sets no type's slot holds are written around the step: the
		// type joins those to reclaim first (a type in it with nothing to
		// reclaim just leaves it), and a deleted type leaves the type names
		// and the types to compact after.
		keys[0], keys[1], keys[2] = keys[3], keys[3], keys[3]
		args = append(args, 1)
		if err := s.pool.with(ctx, "delete", func(c redis.Conn, deadline time.Time) error {
			_, err := do(c, deadline, "SADD", s.keys.reclaimTypes(), typ)
			return err
		}); err != nil {
			return 0, err
		}
	}
	var answer []int
	err = s.pool.with(ctx, "delete", func(c redis.Conn, deadline time.Time) error {
		var err error
		// A type a batch holds (a cluster's) is let go of within
		// milliseconds.
		for pause := tryAgainWait; ; pause = min(2*pause, maxTryAgainWait) {
			answer, err = redis.Ints(deleteScript.run(c, deadline, keys, args...))
			if !lockedRefusal(err) || !time.Now().Add(pause).Before(deadline) {
				break
			}
			time.Sleep(pause)
		}
		if err == nil && len(answer) != 2 {
			err = errors.New("delete: unexpected reply")
		}
		return err
	})
	if err != nil {
		return 0, err
	}
	n := answer[0]
	if s.cluster && answer[1] == 1 {
		// Failing here leaves the name taking MAX_TYPES room; the delete
		// itself is done.
		s.pool.with(ctx, "delete", func(c redis.Conn, deadline time.Time) error {
			c.Send("SREM", s.keys.types(), typ)
			c.Send("SREM", s.keys.compactTypes(), typ)
			_, err := do(c, deadline, "")
			return err
		})
	}
	// Failing here leaves the rest to the background: the delete is done.
	rctx, cancel := context.WithTimeout(ctx, s.reclaimWait)
	defer cancel()
	_, _ = s.reclaimType(rctx, typ)
	return n, nil
}

// reclaim goes on with every type that has garbage to reclaim, each for at
// most a step's worth of steps per call; the background loop calls it.
func (s *redisStore) reclaim(ctx context.Context) error {
	var names []string
	err := s.pool.with(ctx, "reclaim", func(c redis.Conn, deadline time.Time) error {
		var err error
		names, err = redis.Strings(do(c, deadline, "SMEMBERS", s.keys.reclaimTypes()))
		return err
	})
	if err != nil {
		return err
	}
	// A type whose step fails (counted in store_errors_total) holds up no
	// other.
	var first error
	for _, typ := range names {
		rctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		_, err := s.reclaimType(rctx, typ)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) && first == nil {
			first = err // more next time, too
		}
	}
	return first
}

// reclaimType runs steps of lua/reclaim.lua for typ until it is done or
// ctx ends. The type's series are read once, and again only when a step
// finds that they changed (new series keep coming: after three in a row
// the next tick tries again).
func (s *redisStore) reclaimType(ctx context.Context, typ string) (done bool, err error) {
	return s.reclaimFrom(ctx, typ, nil)
}

// reclaimFrom is reclaimType starting with the series' hashes as given,
// or as read when they are nil.
func (s *redisStore) reclaimFrom(ctx context.Context, typ string, hashes []string) (done bool, err error) {
	listed, changes := hashes != nil, 0
	for ctx.Err() == nil {
		if !listed {
			if hashes, err = s.seriesHashes(ctx, typ); err != nil {
				return false, err
			}
			listed = true
		}
		done, err = s.reclaimStep(ctx, typ, hashes)
		if rerr, ok := err.(redis.Error); ok && strings.HasPrefix(string(rerr), "CHANGED") && changes < 3 {
			listed, changes = false, changes+1
			continue
		}
		if done || err != nil {
			return done, err
		}
		changes = 0
	}
	return false, ctx.Err()
}

// seriesHashes is the hashes of the type's series, in the order of their
// ids, as lua/reclaim.lua takes them.
func (s *redisStore) seriesHashes(ctx context.Context, typ string) ([]string, error) {
	_, ids, err := s.series(ctx, typ, nil)
	hashes := make([]string, len(ids))
	for i, id := range ids {
		hashes[i] = seriesHash(id)
	}
	return hashes, err
}

// reclaimStep runs one step of lua/reclaim.lua for typ, whose series have
// hashes (seriesHashes); the script answers CHANGED when they are not the
// registry's.
func (s *redisStore) reclaimStep(ctx context.Context, typ string, hashes []string) (done bool, err error) {
	keys := []string{s.keys.reclaimTypes(), s.keys.meta(typ), s.keys.seriesRegistry(typ), s.keys.garbage(typ)}
	args := []any{typ, s.keys.tag(typ), graveLifetime(s.cacheTTL).Milliseconds(), s.stepBudget, int(numRes)}
	for r := res1s; r < numRes; r++ {
		args = append(args, r.String(), r.seconds(), r.chunk()*r.seconds(), s.horizon[r] == 0)
	}
	args = append(args, len(hashes))
	for _, h := range hashes {
		args = append(args, h)
	}
	if s.cluster {
		// lua/reclaim.lua leaves the set of types to reclaim to the
		// service, below.
		keys[0] = keys[1]
		args = append(args, 1)
	}
	var step int
	err = s.pool.with(ctx, "reclaim", func(c redis.Conn, deadline time.Time) error {
		var err error
		step, err = redis.Int(reclaimScript.run(c, deadline, keys, args...))
		return err
	})
	if s.cluster && err == nil && step == 1 {
		err = s.pool.with(ctx, "reclaim", func(c redis.Conn, deadline time.Time) error {
			_, err := do(c, deadline, "SREM", s.keys.reclaimTypes(), typ)
			return err
		})
	}
	return step == 1, err
}

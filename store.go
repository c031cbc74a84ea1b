package main

import (
	"cmp"
	"context"
	"crypto/sha1"
	_ "embed"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gomodule/redigo/redis"
)

// metricStore keeps every series' buckets, and each type's type-wide
// buckets of all its series together, and answers reads of them.
//
// add applies a whole ingest or none of it: it refuses with a
// tooManyTypesError, a tooManySeriesError or a tooOldError before changing
// anything, and a concurrent read sees each type's part of it whole or not
// at all. It bumps each type's version in the same atomic step.
//
// read returns the type's meta and, for each of the series asked for (by
// id; typeWide for the type-wide buckets), its stored buckets in spans, in
// span order and then by start, read in one atomic step: the version it
// returns counts every write whose buckets it saw. series lists the ids of
// a type's series that hold every label in match (all of them for none),
// sorted, with the version the list is as of.
//
// addOnce is add for a write with an Idempotency-Key (idempotency.go): it
// records o in the same atomic step as the samples, unless o's key is
// recorded already; then it stores nothing and returns a *replayError with
// the recorded answer, or errKeyReused when the key came with another
// request.
type metricStore interface {
	add(ctx context.Context, batches []typeBatch, now time.Time) error
	addOnce(ctx context.Context, batches []typeBatch, now time.Time, o *onceKey) error
	remove(ctx context.Context, typ string, match []label, now time.Time) (int, error)
	read(ctx context.Context, typ string, series []string, spans []span) (typeMeta, [][]storedBucket, error)
	series(ctx context.Context, typ string, match []label) (uint64, []string, error)
	meta(ctx context.Context, typ string) (typeMeta, error)
	types(ctx context.Context, now time.Time) ([]typeMeta, error)
}

// ---- memory ----

// memoryStore keeps each type in a struct of its own, so writers of
// different types never contend. A background sweep, not the requests,
// drops what retention no longer keeps.
type memoryStore struct {
	horizon   retention
	maxTypes  int
	maxSeries int

	byName sync.Map // type name -> *memType
	mu     sync.Mutex
	count  int // guarded by mu: types are only created under it
	// graves keeps a deleted type's last version for a while, so that the
	// type made again goes on from it: a cached answer of the deleted type
	// is never taken for one of the new (remove, typesFor, sweep).
	graves sync.Map      // type name -> grave
	forget time.Duration // how long a grave is kept: longer than any cached answer

	once onceRecords
}

type memType struct {
	version atomic.Uint64 // written under mu; read without it for the cache
	counted atomic.Bool   // holds MAX_TYPES room; written under memoryStore.mu

	mu            sync.RWMutex
	written       bool // it holds, or held, data
	dead          bool // deleted: an ingest that holds it looks again
	first, newest int64
	memBuckets    // type-wide
	// series holds each series' buckets. A type that has only ever held
	// one series keeps its buckets once: that series' entry is the
	// type-wide buckets themselves, until a second series gets a copy.
	series map[string]*memBuckets
	pairs  map[label]map[string]bool // each label to the ids of the series that hold it
}

// memBuckets are one series' buckets, or a type's type-wide ones.
type memBuckets struct {
	buckets [numRes][]memBucket // each sorted by start
	all     memBucket
	until   int64 // of a series: the anchor from which it holds no data
}

type memBucket struct {
	start int64
	stats
	zero uint64
	bins []byte // packed (see addBins); replaced, never changed in place
}

func newMemoryStore(h retention, maxTypes, maxSeries int) *memoryStore {
	m := &memoryStore{horizon: h, maxTypes: maxTypes, maxSeries: maxSeries}
	m.once.max = maxOnceRecords
	return m
}

func (m *memoryStore) lookup(typ string) *memType {
	if t, ok := m.byName.Load(typ); ok {
		return t.(*memType)
	}
	return nil
}

// version is the type's current version; 0 for a type never written.
func (m *memoryStore) version(typ string) uint64 {
	if t := m.lookup(typ); t != nil {
		return t.version.Load()
	}
	return m.absent(typ).version
}

// absent is the meta of a type the store does not hold: a deleted one's
// keeps its version for a while, as on Redis.
func (m *memoryStore) absent(typ string) typeMeta {
	if g, ok := m.graves.Load(typ); ok {
		return typeMeta{name: typ, version: g.(grave).version, deleted: true}
	}
	return typeMeta{name: typ}
}

func (m *memoryStore) add(_ context.Context, batches []typeBatch, now time.Time) error {
	// A new type anchors on its own samples; refusing those before the
	// type is created keeps a refused ingest from taking MAX_TYPES room.
	for _, b := range batches {
		if t := m.lookup(b.typ); t == nil {
			if anchor := anchorOf(b.newest, now.UnixMicro()); b.keepUntil <= anchor {
				return &tooOldError{typ: b.typ, anchor: anchor}
			}
		}
	}
	for {
		if again, err := m.tryAdd(batches, now); !again {
			return err
		}
	}
}

// tryAdd is one attempt of add; it asks for another when a type it found
// was deleted before it held the type's lock.
func (m *memoryStore) tryAdd(batches []typeBatch, now time.Time) (again bool, err error) {
	all, reserved, err := m.typesFor(batches)
	if err != nil {
		return false, err
	}
	// Lock every type of the ingest, in name order so two ingests cannot
	// deadlock, so that a reader sees each type's part whole or not at all.
	for _, t := range all {
		t.mu.Lock()
	}
	defer func() {
		for _, t := range all {
			t.mu.Unlock()
		}
	}()
	if slices.ContainsFunc(all, func(t *memType) bool { return t.dead }) {
		m.release(reserved)
		return true, nil
	}
	anchors := make([]int64, len(batches))
	for i, b := range batches {
		t := all[i]
		newest := b.newest
		if t.written {
			newest = max(newest, t.newest)
		}
		anchors[i] = anchorOf(newest, now.UnixMicro())
		if b.keepUntil <= anchors[i] {
			m.release(reserved)
			return false, &tooOldError{typ: b.typ, anchor: anchors[i]}
		}
		if err := t.seriesRoom(b, m.maxSeries, anchors[i]); err != nil {
			m.release(reserved)
			return false, err
		}
	}
	for i, b := range batches {
		all[i].apply(b, anchors[i], m.horizon)
	}
	return false, nil
}

func (m *memoryStore) addOnce(ctx context.Context, batches []typeBatch, now time.Time, o *onceKey) error {
	mu := m.once.stripe(o.id)
	mu.Lock()
	defer mu.Unlock()
	if rec := m.once.lookup(o.id, now); rec != nil {
		return replayOf(o, rec)
	}
	if err := m.add(ctx, batches, now); err != nil {
		return err
	}
	m.once.keep(o, now)
	return nil
}

func (t *memType) apply(b typeBatch, anchor int64, h retention) {
	if !t.written {
		t.first, t.newest = b.first, b.newest
	}
	for _, sb := range b.series {
		if t.series[sb.id] != nil {
			continue
		}
		if !t.written && len(b.series) == 1 {
			t.addSeries(sb.id, &t.memBuckets) // its buckets are the type's
			continue
		}
		t.unshare()
		t.addSeries(sb.id, &memBuckets{})
	}
	t.first, t.newest = min(t.first, b.first), max(t.newest, b.newest)
	t.memBuckets.apply(b.deltas, anchor, h)
	for _, sb := range b.series {
		s := t.series[sb.id]
		if s != &t.memBuckets {
			s.apply(sb.deltas, anchor, h)
		}
		s.until = max(s.until, sb.until)
	}
	t.version.Add(uint64(b.samples))
	t.written = true
}

// unshare gives the type's one series buckets of its own, when it has
// the type-wide ones: packed bins are never changed in place, so copying
// the lists of buckets is enough.
func (t *memType) unshare() {
	for id, s := range t.series {
		if s == &t.memBuckets {
			c := t.memBuckets
			for r := range c.buckets {
				c.buckets[r] = slices.Clone(c.buckets[r])
			}
			t.series[id] = &c
		}
	}
}

// addSeries adds the series id with buckets s, in the index of its
// labels too.
func (t *memType) addSeries(id string, s *memBuckets) {
	if t.series == nil {
		t.series, t.pairs = map[string]*memBuckets{}, map[label]map[string]bool{}
	}
	s.until = math.MinInt64
	t.series[id] = s
	labels, _ := parseSeriesID(id) // made by seriesID
	for _, l := range labels {
		if t.pairs[l] == nil {
			t.pairs[l] = map[string]bool{}
		}
		t.pairs[l][id] = true
	}
}

// dropSeries removes a series and its place in the index of labels.
func (t *memType) dropSeries(id string) {
	delete(t.series, id)
	labels, _ := parseSeriesID(id) // made by seriesID
	for _, l := range labels {
		if delete(t.pairs[l], id); len(t.pairs[l]) == 0 {
			delete(t.pairs, l)
		}
	}
}

// seriesRoom refuses a batch that would take the type past maxSeries
// series holding data at anchor, naming the first series, by id, beyond
// the limit. A series that holds no data at anchor takes no room, whether
// or not the sweep has dropped it yet; one the batch brings, new or back
// from having none, takes room.
func (t *memType) seriesRoom(b typeBatch, maxSeries int, anchor int64) error {
	room := maxSeries
	for _, s := range t.series {
		if s.until > anchor {
			room--
		}
	}
	for _, sb := range b.series {
		if s, ok := t.series[sb.id]; !ok || s.until <= anchor {
			if room--; room < 0 {
				return &tooManySeriesError{typ: b.typ, id: sb.id}
			}
		}
	}
	return nil
}

func (t *memBuckets) apply(deltas []bucketDelta, anchor int64, h retention) {
	for _, d := range deltas {
		if d.res == resAll {
			t.all.merge(d)
			continue
		}
		if !h.keeps(d.res, d.start, anchor) {
			continue // would be swept at once
		}
		list := t.buckets[d.res]
		i := len(list) // the usual case: a bucket at or after the newest
		if i == 0 || list[i-1].start < d.start {
			t.buckets[d.res] = append(list, memBucket{start: d.start})
		} else if list[i-1].start != d.start {
			i = sort.Search(len(list), func(j int) bool { return list[j].start >= d.start })
			if i == len(list) || list[i].start != d.start {
				t.buckets[d.res] = slices.Insert(list, i, memBucket{start: d.start})
			}
		} else {
			i--
		}
		t.buckets[d.res][i].merge(d)
	}
}

func (b *memBucket) merge(d bucketDelta) {
	b.stats.merge(d.stats)
	b.zero += d.zero
	if len(d.bins) > 0 {
		b.bins = addBins(b.bins, d.bins, maxBinsPerSign)
	}
}

func (b *memBucket) stored(r resolution) storedBucket {
	return storedBucket{res: r, start: b.start, stats: b.stats, zero: b.zero, packed: b.bins}
}

// typesFor returns the type of each batch, creating missing ones, and
// reserves MAX_TYPES room for those not yet counted, unless that would
// pass maxTypes; then it creates and reserves nothing. It returns the
// types it reserved room for.
func (m *memoryStore) typesFor(batches []typeBatch) (all, reserved []*memType, err error) {
	all = make([]*memType, len(batches))
	counted := true
	for i, b := range batches {
		if all[i] = m.lookup(b.typ); all[i] == nil || !all[i].counted.Load() {
			counted = false
		}
	}
	if counted {
		return all, nil, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var fresh []int
	for i, b := range batches {
		if all[i] == nil {
			all[i] = m.lookup(b.typ)
		}
		if all[i] == nil || !all[i].counted.Load() {
			fresh = append(fresh, i)
		}
	}
	if m.count+len(fresh) > m.maxTypes {
		return nil, nil, &tooManyTypesError{batches[fresh[0]].typ}
	}
	for _, i := range fresh {
		if all[i] == nil {
			all[i] = &memType{}
			if g, ok := m.graves.LoadAndDelete(batches[i].typ); ok {
				all[i].version.Store(g.(grave).version)
			}
			m.byName.Store(batches[i].typ, all[i])
		}
		all[i].counted.Store(true)
		reserved = append(reserved, all[i])
	}
	m.count += len(fresh)
	return all, reserved, nil
}

// release gives back the room reserved for types an ingest then did not
// write after all (the caller holds their locks, so none has been
// written since).
func (m *memoryStore) release(reserved []*memType) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, t := range reserved {
		if (!t.written || t.dead) && t.counted.Load() {
			t.counted.Store(false)
			m.count--
		}
	}
}

func (m *memoryStore) meta(_ context.Context, typ string) (typeMeta, error) {
	t := m.lookup(typ)
	if t == nil {
		return m.absent(typ), nil
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.metaLocked(typ), nil
}

func (t *memType) metaLocked(typ string) typeMeta {
	return typeMeta{name: typ, version: t.version.Load(), first: t.first, newest: t.newest, total: t.all.stats, series: len(t.series)}
}

func (m *memoryStore) read(_ context.Context, typ string, series []string, spans []span) (typeMeta, [][]storedBucket, error) {
	out := make([][]storedBucket, len(series))
	t := m.lookup(typ)
	if t == nil {
		return m.absent(typ), out, nil
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	for i, id := range series {
		if id == typeWide {
			out[i] = t.memBuckets.read(spans)
		} else if s := t.series[id]; s != nil {
			out[i] = s.read(spans)
		}
	}
	return t.metaLocked(typ), out, nil
}

func (m *memoryStore) series(_ context.Context, typ string, match []label) (uint64, []string, error) {
	t := m.lookup(typ)
	if t == nil {
		return 0, nil, nil
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	if len(match) == 0 {
		return t.version.Load(), slices.Sorted(maps.Keys(t.series)), nil
	}
	// The smallest set of the labels asked for, less the series that lack
	// any other.
	smallest := t.pairs[match[0]]
	for _, l := range match[1:] {
		if len(t.pairs[l]) < len(smallest) {
			smallest = t.pairs[l]
		}
	}
	var out []string
	for id := range smallest {
		if !slices.ContainsFunc(match, func(l label) bool { return !t.pairs[l][id] }) {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return t.version.Load(), out, nil
}

func (t *memBuckets) read(spans []span) []storedBucket {
	var out []storedBucket
	for _, s := range spans {
		if s.res == resAll {
			if t.all.count > 0 {
				out = append(out, t.all.stored(resAll))
			}
			continue
		}
		list := t.buckets[s.res]
		i := sort.Search(len(list), func(j int) bool { return list[j].start >= s.start })
		for ; i < len(list) && list[i].start < s.end; i++ {
			out = append(out, list[i].stored(s.res))
		}
	}
	return out
}

func (m *memoryStore) types(_ context.Context, now time.Time) ([]typeMeta, error) {
	var out []typeMeta
	m.byName.Range(func(k, v any) bool {
		t := v.(*memType)
		t.mu.RLock()
		if t.written {
			meta := t.metaLocked(k.(string))
			// Only the series that still hold data, swept or not.
			anchor := meta.anchor(now.UnixMicro())
			meta.series = 0
			for _, s := range t.series {
				if s.until > anchor {
					meta.series++
				}
			}
			out = append(out, meta)
		}
		t.mu.RUnlock()
		return true
	})
	slices.SortFunc(out, func(a, b typeMeta) int {
		switch {
		case a.name < b.name:
			return -1
		case a.name > b.name:
			return 1
		}
		return 0
	})
	return out, nil
}

// sweep drops the buckets retention no longer keeps at now. It runs in the
// background loop, so no request pays for it; each type is locked only
// while its own buckets are trimmed.
func (m *memoryStore) sweep(now time.Time) {
	m.once.sweep(now)
	m.graves.Range(func(k, v any) bool {
		if now.UnixNano() >= v.(grave).until {
			m.graves.CompareAndDelete(k, v)
		}
		return true
	})
	m.byName.Range(func(_, v any) bool {
		t := v.(*memType)
		t.mu.Lock()
		anchor := anchorOf(t.newest, now.UnixMicro())
		t.memBuckets.sweep(m.horizon, anchor)
		for id, s := range t.series {
			if s.until <= anchor {
				t.dropSeries(id) // it holds no data: its MAX_SERIES room is free
				continue
			}
			if s != &t.memBuckets {
				s.sweep(m.horizon, anchor)
			}
		}
		t.mu.Unlock()
		return true
	})
}

// sweep drops the buckets retention no longer keeps at anchor.
func (t *memBuckets) sweep(h retention, anchor int64) {
	for r := res1s; r < numRes; r++ {
		first := h.firstKept(r, anchor)
		list := t.buckets[r]
		n := sort.Search(len(list), func(j int) bool { return list[j].start >= first })
		// A fresh array once most of the old one is behind us, so the
		// memory of dropped buckets goes back.
		if rest := list[n:]; n > 0 && len(rest) < cap(list)/4 {
			t.buckets[r] = slices.Clone(rest)
		} else {
			t.buckets[r] = rest
		}
	}
}

// ---- Redis ----

// redisStore keeps each type's buckets in hashes of their own, named and
// explained in keys.go. One ingest is one script (lua/ingest.lua), which
// also deletes what retention no longer keeps; one read is one round trip
// of MULTI/EXEC blocks.
type redisStore struct {
	pool      *redisPool
	keys      keys
	horizon   retention
	maxTypes  int
	maxSeries int
	queue     ingestQueue // ingests waiting to be applied in a group (groupcommit.go)
	grouped   bool        // small ingests share runs; false with REDIS_PIPELINE=false
	cluster   bool        // on a Redis Cluster, one type's keys to a slot (clusterstore.go)
	// checked, when set, runs between the check and the writes of an
	// ingest of several types on a cluster: for tests that fail a node
	// in the middle of one.
	checked  func()
	cacheTTL time.Duration
	// stepBudget is how many keys one step of reclaiming a delete's keys
	// reads, and reclaimWait how long a delete reclaims before it answers
	// (delete.go).
	stepBudget  int
	reclaimWait time.Duration
}

//go:embed lua/ingest.lua
var ingestLua string

var ingestScript = newScript(ingestLua)

func newRedisStore(pool *redisPool, k keys, h retention, maxTypes, maxSeries int) *redisStore {
	return &redisStore{pool: pool, keys: k, horizon: h, maxTypes: maxTypes, maxSeries: maxSeries,
		stepBudget: reclaimBudget, reclaimWait: reclaimAfterDelete}
}

// ingestGrace is how long past REDIS_TIMEOUT an ingest waits for its
// script's answer. The fence lets the script start only within the first
// half of REDIS_TIMEOUT; one that started is given the time to finish, so
// that its answer, and not a timeout, says whether the samples are stored.
const ingestGrace = time.Second

// indexed is the resolutions, each with an index of its chunks: the
// retention sweep reads those whose buckets expire, and a delete every
// one (lua/reclaim.lua). Their position (from 1) is how the script refers
// to them.
func (s *redisStore) indexed() []resolution {
	var out []resolution
	for r := res1s; r < numRes; r++ {
		out = append(out, r)
	}
	return out
}

// ingestCall is the KEYS and ARGV of one run of the ingest script, laid
// out as lua/ingest.lua reads them.
type ingestCall struct {
	s    *redisStore
	idx  []resolution       // the resolutions with a retention index
	ix   map[resolution]int // their positions, from 1
	keys []string
	args []any
}

// ingestCall lays out one run of the script for one or more ingests (a
// group, groupcommit.go), applied as if one after the other: each bucket
// they add to is written once, with one record from each ingest that adds
// to it, in their order, as the memory store would merge them.
func (s *redisStore) ingestCall(ingests [][]typeBatch, o *onceKey, now time.Time) *ingestCall {
	byType := map[string][]typeBatch{}
	var all []typeBatch
	for _, batches := range ingests {
		for _, b := range batches {
			byType[b.typ] = append(byType[b.typ], b)
		}
		all = append(all, batches...)
	}
	names := slices.Sorted(maps.Keys(byType))
	c := &ingestCall{s: s, idx: s.indexed(), ix: map[resolution]int{}, keys: []string{s.keys.types(), s.keys.compactTypes()}}
	flags := 0
	if o != nil {
		flags |= ingestOnce
	}
	if s.cluster {
		// One type's run, whose keys are all on its slot (lua/ingest.lua).
		flags |= ingestOnCluster
		c.keys = []string{s.keys.meta(names[0]), s.keys.meta(names[0])}
	}
	c.args = []any{0, now.UnixMicro(), s.maxTypes, s.maxSeries, len(names), len(c.idx), flags}
	if s.cluster {
		c.args = append(c.args, "", 0) // a batch's token and how long it holds the type (clusterstore.go)
	}
	for i, r := range c.idx {
		c.ix[r] = i + 1
		c.args = append(c.args, s.horizon[r], r.seconds(), r.chunk()*r.seconds(), r.String())
	}
	for _, typ := range names {
		bs := byType[typ]
		samples, first, newest, keepUntil := 0, bs[0].first, bs[0].newest, bs[0].keepUntil
		typeDeltas := make([][]bucketDelta, len(bs))
		for i, b := range bs {
			samples += b.samples
			first, newest, keepUntil = min(first, b.first), max(newest, b.newest), min(keepUntil, b.keepUntil)
			typeDeltas[i] = b.deltas
		}
		series := mergeSeries(bs)
		c.keys = append(c.keys, s.keys.meta(typ), s.keys.seriesRegistry(typ), s.keys.compactBuckets(typ), s.keys.seriesUntil(typ))
		c.args = append(c.args, typ, s.keys.tag(typ), samples, first, newest, keepUntil, 1+len(series))
		// The type-wide unit, then each series; a series' records are the
		// type's own when it is the only one (in every ingest, then, as
		// each batch holds at least one series), encoded once.
		recs := bucketRecords(typeDeltas)
		c.unit(typ, typeWide, 0, recs)
		for _, ms := range series {
			if len(series) > 1 {
				recs = bucketRecords(ms.deltas)
			}
			c.unit(typ, ms.id, ms.until, recs)
		}
	}
	c.args = append(c.args, s.keys.streamChannel(), encodeUpdates(updatesOf(all, now.Unix(), s.horizon)))
	if o != nil {
		if s.cluster {
			c.keys = append(c.keys, s.keys.oncePart(names[0], o.id))
		} else {
			c.keys = append(c.keys, s.keys.once(o.id))
		}
		c.args = append(c.args, o.record(), onceLifetime.Milliseconds())
	}
	return c
}

// The flags of a run of lua/ingest.lua (its ARGV[7]).
const (
	ingestOnce       = 1 // with an Idempotency-Key's record
	ingestOnCluster  = 2 // one type's run on a Redis Cluster
	ingestRegistered = 4 // its new type's MAX_TYPES room is taken
	ingestCheckOnly  = 8 // check, write nothing
)

// mergedSeries is a series of a type in an ingest call: the anchor it
// holds data until, and its deltas in each ingest that adds to it.
type mergedSeries struct {
	id     string
	until  int64
	deltas [][]bucketDelta
}

// mergeSeries is the series of one type's batches, by id.
func mergeSeries(bs []typeBatch) []mergedSeries {
	var out []mergedSeries
	if len(bs) == 1 {
		out = make([]mergedSeries, len(bs[0].series))
		for i, sb := range bs[0].series {
			out[i] = mergedSeries{sb.id, sb.until, [][]bucketDelta{sb.deltas}}
		}
		return out
	}
	pos := map[string]int{}
	for _, b := range bs {
		for _, sb := range b.series {
			i, ok := pos[sb.id]
			if !ok {
				i = len(out)
				pos[sb.id] = i
				out = append(out, mergedSeries{id: sb.id, until: sb.until})
			}
			out[i].until = max(out[i].until, sb.until)
			out[i].deltas = append(out[i].deltas, sb.deltas)
		}
	}
	slices.SortFunc(out, func(a, b mergedSeries) int { return strings.Compare(a.id, b.id) })
	return out
}

// recordedBucket is a bucket an ingest call adds to, with what it appends.
type recordedBucket struct {
	res   resolution
	start int64
	recs  []byte // records (bucketRecord), one after the other
}

// bucketRecords is the buckets that lists of deltas (each by resolution,
// then start) add to, by resolution, then start, each with the records of
// its deltas in the lists' order.
func bucketRecords(lists [][]bucketDelta) []recordedBucket {
	out := make([]recordedBucket, 0, len(lists[0]))
	if len(lists) == 1 {
		for _, d := range lists[0] {
			out = append(out, recordedBucket{d.res, d.start, bucketRecord(d)})
		}
		return out
	}
	type at struct {
		res   resolution
		start int64
	}
	pos := map[at]int{}
	for _, deltas := range lists {
		for _, d := range deltas {
			if i, ok := pos[at{d.res, d.start}]; ok {
				out[i].recs = append(out[i].recs, bucketRecord(d)...)
				continue
			}
			pos[at{d.res, d.start}] = len(out)
			out = append(out, recordedBucket{d.res, d.start, bucketRecord(d)})
		}
	}
	slices.SortFunc(out, func(a, b recordedBucket) int {
		return cmp.Or(cmp.Compare(a.res, b.res), cmp.Compare(a.start, b.start))
	})
	return out
}

// unit adds one unit of typ, the series id (holding data until the anchor
// until) or the type-wide buckets, with the buckets it adds to.
func (c *ingestCall) unit(typ, id string, until int64, buckets []recordedBucket) {
	u := c.s.keys.unit(typ, id)
	var labels []label
	hash := ""
	if id != typeWide {
		labels, _ = parseSeriesID(id) // made by seriesID
		hash = seriesHash(id)
	}
	c.keys = append(c.keys, unitMeta(u))
	for _, l := range labels {
		c.keys = append(c.keys, c.s.keys.labelIndex(typ, l))
	}
	c.args = append(c.args, id, hash, until, len(labels), len(buckets))
	for _, r := range c.idx {
		c.args = append(c.args, bucketPrefix(u, r))
	}
	for _, b := range buckets {
		c.keys = append(c.keys, bucketKey(u, b.res, b.start))
		c.args = append(c.args, c.ix[b.res], b.start, c.s.horizon.expiry(b.res, b.start), b.recs)
	}
	for _, r := range c.idx {
		c.keys = append(c.keys, indexKey(u, r))
	}
}

// apply runs the script once for ingests, the first of which arrived at
// start, with the record o of an ingest that runs alone with an
// Idempotency-Key, and words its refusals and replays. The fence and the wait for the answer
// count from start. unsure reports an error after which the ingests may be
// stored: the script was sent and its answer did not come. Any error the
// script itself answers comes before its first write (lua/ingest.lua), so
// then, as when no connection was had, nothing is stored.
func (s *redisStore) apply(ctx context.Context, ingests [][]typeBatch, o *onceKey, now, start time.Time) (unsure bool, err error) {
	// The time spent laying out the call is the service's, not Redis's.
	laying := time.Now()
	call := s.ingestCall(ingests, o, now)
	keys, args := call.keys, call.args
	start = start.Add(time.Since(laying))
	fence := start.Add(s.pool.timeout / 2)
	// The ingest keeps a pooled connection of its own, not the pipeline:
	// its write must reach Redis whole within REDIS_TIMEOUT or not at all
	// (the connection's write deadline), which with the fence keeps the
	// largest batch's answer honest; on the pipeline a large write goes
	// on after its caller has given up.
	borrowCtx, cancel := context.WithDeadline(ctx, fence)
	defer cancel()
	c, err := s.pool.GetContext(borrowCtx)
	if err != nil {
		return false, err
	}
	args[0] = s.fenceFor(keys[0], fence)
	reply, err := ingestScript.run(c, start.Add(s.pool.timeout+ingestGrace), keys, args...)
	c.Close()
	if rec, ok := reply.([]byte); ok && err == nil && o != nil {
		return false, replayOf(o, rec)
	}
	if reply == int64(2) && err == nil {
		// On a cluster: a group of one type's ingests noted buckets to
		// merge.
		s.noteCompact(ctx, []string{ingests[0][0].typ})
	}
	if _, ok := err.(redis.Error); !ok {
		return err != nil, err
	}
	return false, refusalOf(err, ingests)
}

// refusalOf words the ingest script's refusal of ingests for the client;
// any other error is returned as it is.
func refusalOf(err error, ingests [][]typeBatch) error {
	rerr, ok := err.(redis.Error)
	if !ok {
		return err
	}
	f := strings.Fields(string(rerr))
	find := func(typ, hash string) string {
		for _, batches := range ingests {
			if id, ok := seriesByHash(batches, typ, hash); ok {
				return id
			}
		}
		return hash
	}
	switch {
	case len(f) == 2 && f[0] == "TOOMANYTYPES":
		return &tooManyTypesError{f[1]}
	case len(f) == 3 && f[0] == "TOOMANYSERIES":
		return &tooManySeriesError{typ: f[1], id: find(f[1], f[2])}
	case len(f) == 3 && f[0] == "COLLISION":
		return unprocessable("labels {%s} of %s cannot be stored: their key collides with another series of the type; rename a label",
			find(f[1], f[2]), f[1])
	case len(f) == 2 && f[0] == "DELETING":
		return errBeingDeleted(f[1])
	case len(f) > 0 && f[0] == "KEYREUSED":
		return errKeyReused
	case len(f) >= 3 && f[0] == "TOOOLD":
		if anchor, perr := strconv.ParseInt(f[2], 10, 64); perr == nil {
			return &tooOldError{typ: f[1], anchor: anchor}
		}
	}
	return err
}

// seriesByHash finds the id of the series of typ in batches whose hash is
// hash.
func seriesByHash(batches []typeBatch, typ, hash string) (string, bool) {
	for _, b := range batches {
		for _, sb := range b.series {
			if b.typ == typ && seriesHash(sb.id) == hash {
				return sb.id, true
			}
		}
	}
	return "", false
}

// bucketRecord is what an ingest adds to a bucket, as the script appends
// it to the bucket's string: the count (uvarint), the sum, min and max
// (little-endian float64, exact), the zeros (uvarint), the number of bins
// and the bins in the packed form of sketch.go (each code less the
// previous one, from 0, as a zigzag varint; the count as a uvarint).
// Records can follow each other and be read one after the other.
func bucketRecord(d bucketDelta) []byte {
	out := binary.AppendUvarint(nil, uint64(d.count))
	for _, f := range []float64{d.sum, d.min, d.max} {
		out = binary.LittleEndian.AppendUint64(out, math.Float64bits(f))
	}
	out = binary.AppendUvarint(out, d.zero)
	out = binary.AppendUvarint(out, uint64(len(d.bins)))
	return append(out, encodeBins(d.bins)...)
}

var errMalformedBucket = errors.New("malformed bucket")

// readRecords adds up a bucket's records as the memory store adds up
// deltas: sums in the order they came, bins by code, then the sketch's
// bound, which depends only on the bins' union; so both stores hold the
// same bucket for the same samples.
func readRecords(recs []byte) (storedBucket, error) {
	var b storedBucket
	var all []binCount
	uvarint := func() uint64 {
		v, k := binary.Uvarint(recs)
		if k <= 0 {
			recs = nil
			return math.MaxUint64
		}
		recs = recs[k:]
		return v
	}
	for len(recs) > 0 {
		var st stats
		st.count = int64(uvarint())
		if len(recs) < 24 || st.count <= 0 {
			return b, errMalformedBucket
		}
		st.sum = math.Float64frombits(binary.LittleEndian.Uint64(recs))
		st.min = math.Float64frombits(binary.LittleEndian.Uint64(recs[8:]))
		st.max = math.Float64frombits(binary.LittleEndian.Uint64(recs[16:]))
		recs = recs[24:]
		zero, n := uvarint(), uvarint()
		if recs == nil && n != 0 || n > uint64(len(recs)) {
			return b, errMalformedBucket
		}
		b.merge(st)
		b.zero += zero
		prev := int64(0)
		for range n {
			d, k1 := binary.Varint(recs)
			if k1 <= 0 {
				return b, errMalformedBucket
			}
			recs = recs[k1:]
			c := uvarint()
			if recs == nil && c == math.MaxUint64 {
				return b, errMalformedBucket
			}
			prev += d
			if prev < math.MinInt32 || prev > math.MaxInt32 {
				return b, errMalformedBucket
			}
			all = append(all, binCount{int32(prev), c})
		}
	}
	slices.SortStableFunc(all, func(x, y binCount) int { return cmp.Compare(x.code, y.code) })
	out := all[:0]
	for _, bc := range all {
		if len(out) > 0 && out[len(out)-1].code == bc.code {
			out[len(out)-1].n += bc.n
			continue
		}
		out = append(out, bc)
	}
	b.bins = boundBins(out, maxBinsPerSign)
	return b, nil
}

func fmtFloat(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }

// readBlock is how many buckets one MULTI/EXEC block of a read holds: a
// block runs atomically in Redis, and blocks of this size keep any one of
// them to about a millisecond of Redis's time.
const readBlock = 1000

func (s *redisStore) read(ctx context.Context, typ string, series []string, spans []span) (meta typeMeta, out [][]storedBucket, err error) {
	type ref struct {
		series int
		res    resolution
		start  int64
	}
	var refs []ref
	for i := range series {
		for _, sp := range spans {
			if sp.res == resAll {
				refs = append(refs, ref{i, resAll, 0})
				continue
			}
			for t := sp.start; t < sp.end; t += sp.res.seconds() {
				refs = append(refs, ref{i, sp.res, t})
			}
		}
	}
	units := make([]string, len(series))
	for i, id := range series {
		units[i] = s.keys.unit(typ, id)
	}
	out = make([][]storedBucket, len(series))
	err = s.pool.with(ctx, "read", func(c redis.Conn, deadline time.Time) error {
		for i := 0; i == 0 || i < len(refs); i += readBlock {
			c.Send("MULTI")
			if i == 0 {
				c.Send("HMGET", append([]any{s.keys.meta(typ)}, metaFields...)...)
			}
			for _, r := range refs[i:min(i+readBlock, len(refs))] {
				c.Send("GET", bucketKey(units[r.series], r.res, r.start))
			}
			c.Send("EXEC")
		}
		replies, err := redis.Values(do(c, deadline, ""))
		if err != nil {
			return err
		}
		n := 0 // refs read so far
		for _, rep := range replies {
			block, ok := rep.([]any)
			if !ok {
				continue // the OK of MULTI and the QUEUED of each command
			}
			if n == 0 {
				if meta, err = parseMeta(typ, block[0]); err != nil {
					return err
				}
				block = block[1:]
			}
			for _, b := range block {
				r := refs[n]
				n++
				if b == nil {
					continue
				}
				v, err := redis.Bytes(b, nil)
				if err != nil {
					return err
				}
				sb, err := parseBucket(v)
				if err != nil {
					return err
				}
				sb.res, sb.start = r.res, r.start
				out[r.series] = append(out[r.series], sb)
			}
		}
		return nil
	})
	if meta.deleted {
		// What is left of a deleted type's keys, until they are reclaimed.
		out = make([][]storedBucket, len(series))
	}
	return meta, out, err
}

func (s *redisStore) series(ctx context.Context, typ string, match []label) (version uint64, ids []string, err error) {
	err = s.pool.with(ctx, "read", func(c redis.Conn, deadline time.Time) error {
		c.Send("MULTI")
		c.Send("HGET", s.keys.meta(typ), "v")
		if len(match) == 0 {
			c.Send("HVALS", s.keys.seriesRegistry(typ))
		} else {
			args := make([]any, len(match))
			for i, l := range match {
				args[i] = s.keys.labelIndex(typ, l)
			}
			c.Send("SINTER", args...)
		}
		replies, err := redis.Values(do(c, deadline, "EXEC"))
		if err != nil {
			return err
		}
		if replies[0] != nil {
			if version, err = redis.Uint64(replies[0], nil); err != nil {
				return err
			}
		}
		ids, err = redis.Strings(replies[1], nil)
		return err
	})
	slices.Sort(ids)
	return version, ids, err
}

// metaFields are the fields of a type's meta that reads ask for, in the
// order parseMeta takes them.
var metaFields = []any{"v", "f", "n", "d", "x", "w"}

// parseMeta reads a meta hash's metaFields. A deleted type's meta (x)
// keeps its version: it holds no data. One whose type-wide buckets are
// being added up again after a delete (w) is read from its series.
func parseMeta(typ string, reply any) (typeMeta, error) {
	vals, err := redis.Strings(reply, nil)
	if err != nil || len(vals) != len(metaFields) || vals[0] == "" {
		return typeMeta{name: typ}, err
	}
	m := typeMeta{name: typ}
	var errs [4]error
	m.version, errs[0] = strconv.ParseUint(vals[0], 10, 64)
	if vals[1] == "" || vals[4] != "" {
		m.deleted = true
		return m, errs[0]
	}
	m.first, errs[1] = strconv.ParseInt(vals[1], 10, 64)
	m.newest, errs[2] = strconv.ParseInt(vals[2], 10, 64)
	m.rebuilding = vals[5] != ""
	// The samples a delete took away, and one for each delete, which
	// bumped the version too; without a delete, none.
	m.total.count = int64(m.version)
	if vals[3] != "" {
		var gone uint64
		gone, errs[3] = strconv.ParseUint(vals[3], 10, 64)
		m.total.count = int64(m.version - gone)
	}
	if err := errors.Join(errs[:]...); err != nil {
		return typeMeta{name: typ}, fmt.Errorf("malformed meta of %s: %w", typ, err)
	}
	return m, nil
}

// bucketHeader is the size of a Redis bucket's header: the size of its
// records at its last compaction and how many compactions it has had
// (uint32 each, little-endian).
const bucketHeader = 8

// parseBucket reads a bucket as the ingest script writes it.
func parseBucket(v []byte) (storedBucket, error) {
	if len(v) < bucketHeader {
		return storedBucket{}, errMalformedBucket
	}
	return readRecords(v[bucketHeader:])
}

//go:embed lua/compact.lua
var compactLua string

var compactScript = newScript(compactLua)

// compact merges the records of the buckets ingests have noted as grown
// into one record each, until none is left or ctx ends. It runs in the
// background loop of every instance; SPOP hands each bucket to one of
// them. A bucket whose compaction fails or is lost is noted again by the
// next ingest that finds it grown.
func (s *redisStore) compact(ctx context.Context) error {
	for ctx.Err() == nil {
		var types []string
		err := s.pool.with(ctx, "compact", func(c redis.Conn, deadline time.Time) error {
			var err error
			types, err = redis.Strings(do(c, deadline, "SPOP", s.keys.compactTypes(), 16))
			return err
		})
		if err != nil || len(types) == 0 {
			return err
		}
		for _, typ := range types {
			if err := s.compactType(ctx, typ); err != nil {
				return err
			}
		}
	}
	return ctx.Err()
}

func (s *redisStore) compactType(ctx context.Context, typ string) error {
	for ctx.Err() == nil {
		var names []string
		err := s.pool.with(ctx, "compact", func(c redis.Conn, deadline time.Time) error {
			var err error
			names, err = redis.Strings(do(c, deadline, "SPOP", s.keys.compactBuckets(typ), 64))
			return err
		})
		if err != nil || len(names) == 0 {
			return err
		}
		for _, name := range names {
			err := s.pool.with(ctx, "compact", func(c redis.Conn, deadline time.Time) error {
				v, err := redis.Bytes(do(c, deadline, "GET", name))
				if err == redis.ErrNil {
					return nil // expired or deleted meanwhile
				}
				if err != nil {
					return err
				}
				return compactBucket(c, deadline, name, v)
			})
			if err != nil {
				return err
			}
		}
	}
	return ctx.Err()
}

// compactBucket replaces the records of bucket name, read as v, with their
// merge, keeping whatever was appended after v was read.
func compactBucket(c redis.Conn, deadline time.Time, name string, v []byte) error {
	b, err := parseBucket(v)
	if err != nil {
		return err
	}
	merged := bucketRecord(bucketDelta{stats: b.stats, zero: b.zero, bins: b.bins})
	read := sha1.Sum(v[bucketHeader:])
	_, err = compactScript.run(c, deadline, []string{name}, binary.LittleEndian.Uint32(v[4:8]), len(v)-bucketHeader, merged, hex.EncodeToString(read[:]))
	return err
}

func (s *redisStore) meta(ctx context.Context, typ string) (typeMeta, error) {
	all, err := s.metas(ctx, []string{typ})
	if err != nil {
		return typeMeta{name: typ}, err
	}
	return all[0], nil
}

// metas reads the meta of each type in one round trip.
func (s *redisStore) metas(ctx context.Context, names []string) ([]typeMeta, error) {
	out := make([]typeMeta, len(names))
	err := s.pool.with(ctx, "read", func(c redis.Conn, deadline time.Time) error {
		for _, name := range names {
			c.Send("HMGET", append([]any{s.keys.meta(name)}, metaFields...)...)
		}
		replies, err := redis.Values(do(c, deadline, ""))
		if err != nil {
			return err
		}
		for n, rep := range replies {
			m, err := parseMeta(names[n], rep)
			if err != nil {
				return err
			}
			// Every sample ever stored is in the running total, and only
			// there when days are kept forever: its count is the version,
			// less what deletes took away (parseMeta).
			if !s.horizon.forever() {
				m.total.count = 0
			}
			out[n] = m
		}
		return nil
	})
	return out, err
}

func (s *redisStore) types(ctx context.Context, now time.Time) ([]typeMeta, error) {
	var names []string
	err := s.pool.with(ctx, "read", func(c redis.Conn, deadline time.Time) error {
		var err error
		names, err = redis.Strings(do(c, deadline, "SMEMBERS", s.keys.types()))
		return err
	})
	if err != nil {
		return nil, err
	}
	slices.Sort(names)
	var out []typeMeta
	for i := 0; i < len(names); i += readBlock {
		ms, err := s.metas(ctx, names[i:min(i+readBlock, len(names))])
		if err != nil {
			return nil, err
		}
		for _, m := range ms {
			if m.version > 0 && !m.deleted {
				out = append(out, m)
			}
		}
	}
	// The series that still hold data, dropped by retention or not: the
	// registry less those past their anchor.
	err = s.pool.with(ctx, "read", func(c redis.Conn, deadline time.Time) error {
		for _, m := range out {
			c.Send("HLEN", s.keys.seriesRegistry(m.name))
			c.Send("ZCOUNT", s.keys.seriesUntil(m.name), "-inf", m.anchor(now.UnixMicro()))
		}
		if len(out) == 0 {
			return nil
		}
		counts, err := redis.Ints(do(c, deadline, ""))
		for i := range out {
			if err == nil {
				out[i].series = counts[2*i] - counts[2*i+1]
			}
		}
		return err
	})
	return out, err
}

package main

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gomodule/redigo/redis"
)

// summaryCache is the read-through cache in front of the store's summaries.
//
// Every entry records the version of its type that its summary was computed
// at, and an entry is served only while that is still the type's current
// version. Each ingest bumps the version in the same atomic step that stores
// its samples, so once a POST has been acknowledged no entry computed before
// it can be served again: a slow reader that stores an old summary late
// stores it under an old version, where nobody will read it. Nothing is
// invalidated, so there is no invalidation to race with.
type summaryCache struct {
	store   metricStore
	entries cacheStore
	flight  flightGroup

	hits, misses atomic.Uint64
}

// cacheStore keeps rendered summaries for CACHE_TTL.
type cacheStore interface {
	// get returns the type's current version and the entry cached for the
	// window, if any, whatever version it was computed at.
	get(ctx context.Context, typ string, w window) (version uint64, e cacheEntry, ok bool, err error)
	// put stores e unless an entry of a later version is cached: a slow
	// reader's late put must not push out a fresher summary.
	put(ctx context.Context, typ string, w window, e cacheEntry) error
}

type cacheEntry struct {
	version uint64
	body    []byte
}

func newSummaryCache(store metricStore, entries cacheStore) *summaryCache {
	return &summaryCache{store: store, entries: entries}
}

// get returns the rendered summary of typ over w.
func (c *summaryCache) get(ctx context.Context, typ string, w window) ([]byte, error) {
	version, e, ok, err := c.entries.get(ctx, typ, w)
	if err != nil {
		return nil, err
	}
	if ok && e.version == version {
		c.hits.Add(1)
		return e.body, nil
	}
	// Concurrent misses share one computation, but only with one that
	// reads at least the version this request saw, so joining a flight
	// never loses a write acknowledged before this request began.
	return c.flight.do(ctx, flightKey(typ, w, version), func(ctx context.Context) ([]byte, error) {
		c.misses.Add(1)
		st, v, err := c.store.summarize(ctx, typ, w)
		if err != nil {
			return nil, err
		}
		body := st.render(typ)
		// A failed put costs the next reader a recomputation, nothing more:
		// the summary itself is sound, so it is still served.
		_ = c.entries.put(ctx, typ, w, cacheEntry{version: v, body: body})
		return body, nil
	})
}

func flightKey(typ string, w window, version uint64) string {
	return typ + "|" + strconv.FormatInt(w.from, 10) + "|" + strconv.FormatInt(w.to, 10) + "|" + strconv.FormatUint(version, 10)
}

// flightGroup runs one call per key at a time; callers that arrive while it
// runs wait for its result.
type flightGroup struct {
	mu    sync.Mutex
	calls map[string]*flightCall
}

type flightCall struct {
	done    chan struct{}
	body    []byte
	err     error
	waiters int // guarded by flightGroup.mu
}

// waiting is how many callers wait for key's call to finish.
func (g *flightGroup) waiting(key string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	if c, ok := g.calls[key]; ok {
		return c.waiters
	}
	return 0
}

var errFlightPanicked = errors.New("summary computation panicked")

// do runs fn once for concurrent callers of one key. fn runs detached from
// the first caller's cancellation, so one client going away does not fail
// the others; the store's own deadlines still bound it. A waiting caller
// stops waiting when its own context ends.
func (g *flightGroup) do(ctx context.Context, key string, fn func(context.Context) ([]byte, error)) ([]byte, error) {
	g.mu.Lock()
	if c, ok := g.calls[key]; ok {
		c.waiters++
		g.mu.Unlock()
		select {
		case <-c.done:
			return c.body, c.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if g.calls == nil {
		g.calls = make(map[string]*flightCall)
	}
	c := &flightCall{done: make(chan struct{}), err: errFlightPanicked}
	g.calls[key] = c
	g.mu.Unlock()

	defer func() {
		g.mu.Lock()
		delete(g.calls, key)
		g.mu.Unlock()
		close(c.done)
	}()
	c.body, c.err = fn(context.WithoutCancel(ctx))
	return c.body, c.err
}

// ---- memory ----

// memoryCacheStore keeps entries in a sync.Map and reads versions straight
// from the memory store. Expired entries are dropped when read, and by a
// sweep at most once per TTL, so windows that are never asked for again do
// not pile up.
type memoryCacheStore struct {
	versions *memoryStore
	ttl      time.Duration
	now      func() time.Time

	entries   sync.Map // memoryCacheKey -> *memoryCacheEntry
	nextSweep atomic.Int64
}

type memoryCacheKey struct {
	typ string
	w   window
}

type memoryCacheEntry struct {
	cacheEntry
	expires int64 // Unix nanoseconds
}

func newMemoryCacheStore(versions *memoryStore, ttl time.Duration, now func() time.Time) *memoryCacheStore {
	return &memoryCacheStore{versions: versions, ttl: ttl, now: now}
}

func (m *memoryCacheStore) get(_ context.Context, typ string, w window) (uint64, cacheEntry, bool, error) {
	version := m.versions.version(typ)
	key := memoryCacheKey{typ, w}
	v, ok := m.entries.Load(key)
	if !ok {
		return version, cacheEntry{}, false, nil
	}
	e := v.(*memoryCacheEntry)
	if m.now().UnixNano() >= e.expires {
		m.entries.CompareAndDelete(key, v)
		return version, cacheEntry{}, false, nil
	}
	return version, e.cacheEntry, true, nil
}

func (m *memoryCacheStore) put(_ context.Context, typ string, w window, e cacheEntry) error {
	now := m.now().UnixNano()
	key, fresh := memoryCacheKey{typ, w}, &memoryCacheEntry{e, now + int64(m.ttl)}
	for {
		old, loaded := m.entries.LoadOrStore(key, fresh)
		if !loaded {
			break
		}
		if o := old.(*memoryCacheEntry); o.version > e.version && now < o.expires {
			break
		}
		if m.entries.CompareAndSwap(key, old, fresh) {
			break
		}
	}
	if next := m.nextSweep.Load(); now >= next && m.nextSweep.CompareAndSwap(next, now+int64(m.ttl)) {
		m.entries.Range(func(k, v any) bool {
			if now >= v.(*memoryCacheEntry).expires {
				m.entries.CompareAndDelete(k, v)
			}
			return true
		})
	}
	return nil
}

// ---- Redis ----

// redisCacheStore keeps each entry as a string "version body" under a key
// with the type's hash tag, expiring after CACHE_TTL. A lookup reads the
// version and the entry in one round trip: version first, so an entry
// matching it was computed at or after it.
type redisCacheStore struct {
	pool   *redisPool
	prefix string
	ttl    time.Duration
}

func newRedisCacheStore(pool *redisPool, prefix string, ttl time.Duration) *redisCacheStore {
	return &redisCacheStore{pool: pool, prefix: prefix, ttl: ttl}
}

func (r *redisCacheStore) key(typ string, w window) string {
	k := typeKey(r.prefix, typ, "sum:")
	if w.from != allTime.from {
		k += strconv.FormatInt(w.from, 10)
	}
	k += ":"
	if w.to != allTime.to {
		k += strconv.FormatInt(w.to, 10)
	}
	return k
}

func (r *redisCacheStore) get(ctx context.Context, typ string, w window) (version uint64, e cacheEntry, ok bool, err error) {
	err = r.pool.with(ctx, "cache_get", func(c redis.Conn, deadline time.Time) error {
		c.Send("HGET", typeKey(r.prefix, typ, "agg"), "ver")
		c.Send("GET", r.key(typ, w))
		replies, err := redis.Values(do(c, deadline, ""))
		if err != nil {
			return err
		}
		if version, err = parseVersion(replies[0]); err != nil {
			return err
		}
		raw, _ := replies[1].([]byte)
		if raw == nil {
			return nil
		}
		sp := bytes.IndexByte(raw, ' ')
		if sp < 0 {
			return nil // not ours to read: treat as a miss and overwrite
		}
		v, perr := strconv.ParseUint(string(raw[:sp]), 10, 64)
		if perr != nil {
			return nil
		}
		e, ok = cacheEntry{version: v, body: raw[sp+1:]}, true
		return nil
	})
	return version, e, ok, err
}

// cachePutScript sets KEYS[1] to ARGV[2] for ARGV[3] milliseconds unless
// it holds an entry of a version later than ARGV[1].
var cachePutScript = newScript(`
local cur = redis.call('GET', KEYS[1])
if cur then
  local v = tonumber(string.match(cur, '^(%d+) '))
  if v and v > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
`)

func (r *redisCacheStore) put(ctx context.Context, typ string, w window, e cacheEntry) error {
	val := strconv.AppendUint(make([]byte, 0, 24+len(e.body)), e.version, 10)
	val = append(append(val, ' '), e.body...)
	return r.pool.with(ctx, "cache_put", func(c redis.Conn, deadline time.Time) error {
		_, err := cachePutScript.run(c, deadline, []string{r.key(typ, w)}, e.version, val, max(r.ttl.Milliseconds(), 1))
		return err
	})
}

package main

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gomodule/redigo/redis"
)

// readCache is the read-through cache in front of summaries and series.
//
// Every entry records the version of its type that its answer was computed
// at, and an entry is served only while that is still the type's current
// version. Each ingest bumps the version in the same atomic step that stores
// its samples, so once a POST has been acknowledged no entry computed before
// it can be served again: a slow reader that stores an old answer late
// stores it under an old version, where nobody will read it. Nothing is
// invalidated, so there is no invalidation to race with.
type readCache struct {
	entries cacheStore
	flight  flightGroup

	hits, misses atomic.Uint64
}

// cacheStore keeps answers for CACHE_TTL, at most CACHE_MAX_ENTRIES of
// them.
type cacheStore interface {
	// get returns the type's current version and the entry cached under
	// key, if any, whatever version it was computed at.
	get(ctx context.Context, typ, key string) (version uint64, e cacheEntry, ok bool, err error)
	// put stores e unless an entry of a later version is cached: a slow
	// reader's late put must not push out a fresher answer.
	put(ctx context.Context, typ, key string, e cacheEntry) error
	// purge drops the type's entries, which a delete has made stale.
	purge(ctx context.Context, typ string) error
}

// cacheEntry is an answer and the version it was computed at. The memory
// store keeps the answer itself; Redis keeps it encoded, in raw.
type cacheEntry struct {
	version uint64
	value   any
	raw     []byte
}

// maxCachedBytes bounds one cached answer, so the cache's size is bounded
// by CACHE_MAX_ENTRIES times this. A larger answer (a series of thousands
// of points) is computed every time.
const maxCachedBytes = 128 << 10

// sized is an answer that knows about how many bytes it takes; answers
// that do not are small.
type sized interface{ approxBytes() int }

func tooBigToCache(v any) bool {
	s, ok := v.(sized)
	return ok && s.approxBytes() > maxCachedBytes
}

func newReadCache(entries cacheStore) *readCache {
	return &readCache{entries: entries}
}

// cachedRead returns the answer cached under key for typ, or computes it.
// compute returns the answer and the type's version it reflects (the
// earliest version it read, so the answer holds everything up to it).
// With rawOK, an answer Redis holds comes back as its JSON, undecoded
// (the value is then the zero T): a handler can send it as it is.
func cachedRead[T any](ctx context.Context, c *readCache, typ, key string, rawOK bool, compute func(context.Context) (T, uint64, error)) (T, []byte, error) {
	var zero T
	version, e, ok, err := c.entries.get(ctx, typ, key)
	if err != nil {
		return zero, nil, err
	}
	if ok && e.version == version {
		if v, ok := e.value.(T); ok {
			c.hits.Add(1)
			return v, nil, nil
		}
		if rawOK && json.Valid(e.raw) {
			c.hits.Add(1)
			return zero, e.raw, nil
		}
		var v T
		if json.Unmarshal(e.raw, &v) == nil {
			c.hits.Add(1)
			return v, nil, nil
		}
	}
	// Concurrent misses share one computation, but only with one that
	// reads at least the version this request saw, so joining a flight
	// never loses a write acknowledged before this request began.
	v, err := c.flight.do(ctx, typ+"|"+key+"|"+strconv.FormatUint(version, 10), func(ctx context.Context) (any, error) {
		c.misses.Add(1)
		v, ver, err := compute(ctx)
		if err != nil {
			return nil, err
		}
		// A failed put costs the next reader a recomputation, nothing more:
		// the answer itself is sound, so it is still served.
		if !tooBigToCache(v) {
			_ = c.entries.put(ctx, typ, key, cacheEntry{version: ver, value: v})
		}
		return v, nil
	})
	if err != nil {
		return zero, nil, err
	}
	return v.(T), nil, nil
}

// flightGroup runs one call per key at a time; callers that arrive while it
// runs wait for its result.
type flightGroup struct {
	mu    sync.Mutex
	calls map[string]*flightCall
}

type flightCall struct {
	done    chan struct{}
	value   any
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

var errFlightPanicked = errors.New("computation panicked")

// do runs fn once for concurrent callers of one key. fn runs detached from
// the first caller's cancellation, so one client going away does not fail
// the others; the store's own deadlines still bound it. A waiting caller
// stops waiting when its own context ends.
func (g *flightGroup) do(ctx context.Context, key string, fn func(context.Context) (any, error)) (any, error) {
	g.mu.Lock()
	if c, ok := g.calls[key]; ok {
		c.waiters++
		g.mu.Unlock()
		select {
		case <-c.done:
			return c.value, c.err
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
	c.value, c.err = fn(context.WithoutCancel(ctx))
	return c.value, c.err
}

// ---- memory ----

// memoryCacheStore keeps at most max entries. Lookups are lock-free (a
// sync.Map); insertions take a lock and, when full, evict by the CLOCK
// algorithm: a hand goes round the slots, sparing once each entry read
// since it last passed, so hot answers stay while a flood of one-off
// windows only replaces itself. Expired entries are dropped when read and
// by sweep, which the background loop runs; no request pays for a sweep.
type memoryCacheStore struct {
	version func(typ string) uint64
	ttl     time.Duration
	now     func() time.Time
	max     int

	entries sync.Map // string -> *memoryCacheEntry

	mu    sync.Mutex
	slots []string // the keys, in CLOCK order
	hand  int
}

type memoryCacheEntry struct {
	cacheEntry
	expires int64 // Unix nanoseconds
	used    atomic.Bool
}

func newMemoryCacheStore(version func(string) uint64, ttl time.Duration, max int, now func() time.Time) *memoryCacheStore {
	return &memoryCacheStore{version: version, ttl: ttl, now: now, max: max}
}

func (m *memoryCacheStore) get(_ context.Context, typ, key string) (uint64, cacheEntry, bool, error) {
	version := m.version(typ)
	k := typ + "|" + key
	v, ok := m.entries.Load(k)
	if !ok {
		return version, cacheEntry{}, false, nil
	}
	e := v.(*memoryCacheEntry)
	if m.now().UnixNano() >= e.expires {
		m.entries.CompareAndDelete(k, v)
		return version, cacheEntry{}, false, nil
	}
	if !e.used.Load() {
		e.used.Store(true)
	}
	return version, e.cacheEntry, true, nil
}

func (m *memoryCacheStore) put(_ context.Context, typ, key string, e cacheEntry) error {
	now := m.now().UnixNano()
	k := typ + "|" + key
	fresh := &memoryCacheEntry{cacheEntry: e, expires: now + int64(m.ttl)}
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.entries.Load(k); ok {
		if o := old.(*memoryCacheEntry); o.version > e.version && now < o.expires {
			return nil
		}
		m.entries.Store(k, fresh) // its slot is already in the ring
		return nil
	}
	if len(m.slots) < m.max {
		m.slots = append(m.slots, k)
		m.entries.Store(k, fresh)
		return nil
	}
	for {
		victim := m.slots[m.hand]
		v, ok := m.entries.Load(victim)
		if ok && v.(*memoryCacheEntry).used.Swap(false) && now < v.(*memoryCacheEntry).expires {
			m.hand = (m.hand + 1) % len(m.slots)
			continue
		}
		m.entries.Delete(victim)
		m.slots[m.hand] = k
		m.entries.Store(k, fresh)
		m.hand = (m.hand + 1) % len(m.slots)
		return nil
	}
}

func (m *memoryCacheStore) purge(_ context.Context, typ string) error {
	m.entries.Range(func(k, _ any) bool {
		if strings.HasPrefix(k.(string), typ+"|") {
			m.entries.Delete(k) // its slot is reused by a later put
		}
		return true
	})
	return nil
}

// sweep drops expired entries; their slots are reused by later puts.
func (m *memoryCacheStore) sweep(now time.Time) {
	ns := now.UnixNano()
	m.entries.Range(func(k, v any) bool {
		if ns >= v.(*memoryCacheEntry).expires {
			m.entries.CompareAndDelete(k, v)
		}
		return true
	})
}

// ---- Redis ----

// redisCacheStore keeps each entry as a string "version body" that expires
// after CACHE_TTL, and an index of the entries by expiry that bounds their
// number. A lookup reads the type's version and the entry in one round
// trip: version first, so an entry matching it was computed at or after it.
type redisCacheStore struct {
	pool *redisPool
	keys keys
	ttl  time.Duration
	max  int
}

func newRedisCacheStore(pool *redisPool, k keys, ttl time.Duration, max int) *redisCacheStore {
	return &redisCacheStore{pool: pool, keys: k, ttl: ttl, max: max}
}

func (r *redisCacheStore) get(ctx context.Context, typ, key string) (version uint64, e cacheEntry, ok bool, err error) {
	err = r.pool.with(ctx, "cache_get", func(c redis.Conn, deadline time.Time) error {
		c.Send("HGET", r.keys.meta(typ), "v")
		c.Send("GET", r.keys.cacheEntry(typ, key))
		both := deadline
		if r.pool.cluster != nil {
			// On a cluster the entry is on another node than the type's
			// version, and that node failing or hanging makes a miss:
			// the pair gets half the time, and the type's own node the
			// rest.
			both = time.Now().Add(time.Until(deadline) / 2)
		}
		replies, err := redis.Values(do(c, both, ""))
		if err != nil && r.pool.cluster != nil {
			var v any
			v, err = do(c, deadline, "HGET", r.keys.meta(typ), "v")
			replies = []any{v, nil}
		}
		if err != nil {
			return err
		}
		if replies[0] != nil {
			if version, err = redis.Uint64(replies[0], nil); err != nil {
				return err
			}
		}
		raw, _ := replies[1].([]byte)
		sp := bytes.IndexByte(raw, ' ')
		if sp < 0 {
			return nil // nothing cached, or not ours to read: a miss
		}
		v, perr := strconv.ParseUint(string(raw[:sp]), 10, 64)
		if perr != nil {
			return nil
		}
		e, ok = cacheEntry{version: v, raw: raw[sp+1:]}, true
		return nil
	})
	return version, e, ok, err
}

//go:embed lua/cacheput.lua
var cachePutLua string

var cachePutScript = newScript(cachePutLua)

func (r *redisCacheStore) put(ctx context.Context, typ, key string, e cacheEntry) error {
	body, err := json.Marshal(e.value)
	if err != nil || len(body) > maxCachedBytes {
		return err
	}
	val := strconv.AppendUint(make([]byte, 0, 24+len(body)), e.version, 10)
	val = append(append(val, ' '), body...)
	return r.pool.with(ctx, "cache_put", func(c redis.Conn, deadline time.Time) error {
		_, err := cachePutScript.run(c, deadline, []string{r.keys.cacheEntry(typ, key), r.keys.cacheIndex()},
			e.version, val, max(r.ttl.Milliseconds(), 1), r.max)
		return err
	})
}

// purge finds the type's entries in the index, which holds at most
// CACHE_MAX_ENTRIES of them, and drops them.
func (r *redisCacheStore) purge(ctx context.Context, typ string) error {
	pattern := globEscape(r.keys.cacheEntry(typ, "")) + "*"
	return r.pool.with(ctx, "cache_purge", func(c redis.Conn, deadline time.Time) error {
		var found []any
		for cursor := "0"; ; {
			reply, err := redis.Values(do(c, deadline, "ZSCAN", r.keys.cacheIndex(), cursor, "MATCH", pattern, "COUNT", 1000))
			if err != nil {
				return err
			}
			if len(reply) != 2 {
				return errors.New("ZSCAN: unexpected reply")
			}
			cursor, _ = redis.String(reply[0], nil)
			members, err := redis.Strings(reply[1], nil)
			if err != nil {
				return err
			}
			for i := 0; i < len(members); i += 2 { // member, score
				found = append(found, members[i])
			}
			if cursor == "0" {
				break
			}
		}
		for i := 0; i < len(found); i += 1000 {
			part := found[i:min(i+1000, len(found))]
			c.Send("UNLINK", part...)
			c.Send("ZREM", append([]any{r.keys.cacheIndex()}, part...)...)
		}
		if len(found) == 0 {
			return nil
		}
		_, err := do(c, deadline, "")
		return err
	})
}

// globEscape quotes the characters a Redis MATCH pattern treats as special.
func globEscape(s string) string {
	var b strings.Builder
	for _, c := range s {
		if strings.ContainsRune(`*?[]\^`, c) {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	return b.String()
}

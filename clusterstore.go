package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"maps"
	mrand "math/rand/v2"
	"slices"
	"strings"
	"time"

	"github.com/gomodule/redigo/redis"

	_ "embed"
)

// On a Redis Cluster each type's keys are on its slot (keys.go), so one
// type's part of an ingest is one atomic run of lua/ingest.lua, as on a
// single Redis. The keys that are no one type's are each on a slot of
// their own and written by the service around the runs: the set of type
// names (MAX_TYPES), the set of types to compact, the set of types to
// reclaim, an Idempotency-Key's record of the whole request.
//
// An ingest of several types is applied type by type, the runs of each
// node sent together and the nodes side by side:
//   - every run is first checked without writing but for its hold of the
//     type (ingestCheckOnly, {T}:lock), so a refusal (422) stores nothing,
//     in the order a single Redis refuses, and no other write changes the
//     type before the batch's does;
//   - the new types then take their MAX_TYPES room together, in one run of
//     lua/register.lua on the set of names, which keeps the bound exact;
//   - then every run writes. When one fails, the others' types are stored:
//     the 503 names them (partlyStoredError). With an Idempotency-Key each
//     run records the key on its type's slot in the same atomic step, so a
//     retry applies only the types not stored yet; once every type is,
//     the whole answer is recorded under the key's own name.
//
// An ingest of one type is one run, as on a single Redis, plus, for a new
// type only, its room first.

//go:embed lua/register.lua
var registerLua string

var registerScript = newScript(registerLua)

// partlyStoredError is an ingest over several nodes of a cluster of which
// some types were stored and others not: a retry with the same
// Idempotency-Key stores the rest.
type partlyStoredError struct {
	stored []string
	err    error
}

func (e *partlyStoredError) Error() string {
	return "stored " + strings.Join(e.stored, ", ") + " only: " + e.err.Error()
}

func (e *partlyStoredError) Unwrap() error { return e.err }

// addCluster is addOnce on a Redis Cluster.
func (s *redisStore) addCluster(ctx context.Context, batches []typeBatch, now time.Time, o *onceKey, start time.Time) error {
	claimed := false
	if o != nil {
		var err error
		if claimed, err = s.claimOnce(ctx, o); err != nil {
			return err
		}
	}
	err := s.addParts(ctx, batches, now, o, start)
	// A request refused, or failed before anything of it was sent, leaves
	// its key free, as on a single Redis.
	if claimed && storedNothing(err) {
		s.releaseOnce(ctx, o)
	}
	return err
}

// storedNothing reports whether err says that nothing of the ingest was
// stored: a refusal, or a failure Redis answered (before any write).
func storedNothing(err error) bool {
	var ps *partlyStoredError
	if err == nil || errors.As(err, &ps) {
		return false
	}
	_, answered := err.(redis.Error)
	return answered || refused(err)
}

// addParts is addCluster once the key, if any, is claimed.
func (s *redisStore) addParts(ctx context.Context, batches []typeBatch, now time.Time, o *onceKey, start time.Time) error {
	byType := map[string][]typeBatch{}
	for _, b := range batches {
		byType[b.typ] = append(byType[b.typ], b)
	}
	names := slices.Sorted(maps.Keys(byType))
	if len(names) == 0 {
		// No samples: only the key is recorded, as on a single Redis.
		return s.recordOnce(ctx, o)
	}
	calls := make([]*ingestCall, len(names))
	for i, typ := range names {
		calls[i] = s.ingestCall([][]typeBatch{byType[typ]}, o, now)
	}
	ingests := [][]typeBatch{batches}
	extra := make([]int, len(calls))
	replayed := make([]bool, len(calls)) // stored by an earlier attempt
	var token string
	if len(calls) > 1 {
		// The check holds each type it passes for the batch (its token),
		// so that no other write changes the type before the batch's
		// write: a refusal then stores nothing. A batch that finds a type
		// held lets go of what it holds and tries again a little later,
		// so two batches never wait on each other.
		token = rand.Text()
		for i, call := range calls {
			// Held for REDIS_TIMEOUT at most: a write that comes later
			// (Redis that slow) finds the hold gone and stores nothing.
			call.args[7], call.args[8] = token, max(1, s.pool.timeout.Milliseconds())
			extra[i] = ingestCheckOnly
		}
		fence := start.Add(s.pool.timeout / 2)
		var results []partResult
		for attempt := 1; ; attempt++ {
			// A check writes only the hold: it need not wait past
			// REDIS_TIMEOUT.
			results = s.runParts(ctx, calls, extra, start, s.pool.timeout, false)
			if !slices.ContainsFunc(results, func(r partResult) bool { return lockedRefusal(r.err) }) {
				break
			}
			s.release(ctx, held(names, results), token)
			pause := time.Duration(attempt) * time.Duration(1+mrand.IntN(4)) * time.Millisecond
			if !time.Now().Add(pause).Before(fence) {
				return errors.New("ingest: its types stayed held by other batches")
			}
			time.Sleep(pause)
		}
		fresh, err := s.judge(ctx, names, results, ingests)
		holds := held(names, results)
		if err != nil {
			s.release(ctx, holds, token)
			return err
		}
		// Only the held types' writes need their hold; the others
		// wait for a batch holding theirs, as a single write does.
		for i, call := range calls {
			if !slices.Contains(holds, names[i]) {
				call.args[7] = ""
			}
		}
		for i, r := range results {
			_, replayed[i] = r.reply.([]byte)
			extra[i] = 0
			if slices.Contains(fresh, names[i]) {
				extra[i] = ingestRegistered
			}
		}
		if s.checked != nil {
			s.checked()
		}
		// The writes have a fence of their own, as a run of its own would.
		start = time.Now()
	}
	wait := s.pool.timeout + ingestGrace
	results := s.runParts(ctx, calls, skip(extra, replayed), start, wait, true)
	if len(calls) == 1 && newTypeRefusal(results[0].err) {
		if _, err := s.judge(ctx, names, results, ingests); err != nil {
			return err
		}
		results = s.runParts(ctx, calls, []int{ingestRegistered}, time.Now(), wait, true)
	}
	if token != "" {
		// A written run let go of its type; one that failed holds it
		// until the hold expires, unless this reaches its node.
		var held []string
		for i, r := range results {
			if r.err != nil {
				held = append(held, names[i])
			}
		}
		if len(held) > 0 {
			s.release(ctx, held, token)
		}
	}
	var stored, noted []string
	var failed error
	again := true // every type stored by an earlier attempt
	for i, r := range results {
		switch reply := r.reply.(type) {
		case skipped:
			stored = append(stored, names[i])
		case []byte:
			stored = append(stored, names[i])
		case int64:
			stored, again = append(stored, names[i]), false
			if reply == 2 {
				noted = append(noted, names[i])
			}
		default:
			again = false
			if failed == nil {
				failed = r.err
				if failed == nil {
					failed = errors.New("ingest: unexpected reply")
				}
			}
		}
	}
	if len(noted) > 0 {
		s.noteCompact(ctx, noted)
	}
	if failed != nil {
		if len(stored) == 0 {
			return refusalOf(failed, ingests)
		}
		return &partlyStoredError{stored: stored, err: failed}
	}
	if o == nil {
		return nil
	}
	// Every type is stored: a failure to record the whole answer leaves
	// each type's record, which a retry finds.
	s.recordOnce(ctx, o)
	if again {
		return replayOf(o, o.record())
	}
	return nil
}

// skipped is the reply of a run not sent: its type was stored before.
type skipped struct{}

// partResult is one run's answer: its reply, or its error, a redis.Error
// when Redis answered one (nothing written) and any other when the answer
// did not come (it may have been applied).
type partResult struct {
	reply any
	err   error
}

// skip marks the runs not to send (-1).
func skip(extra []int, done []bool) []int {
	out := slices.Clone(extra)
	for i := range out {
		if done[i] {
			out[i] = -1
		}
	}
	return out
}

// runParts sends each call (one type's run) with its extra flags, or not
// when they are -1, the runs of one node in one write and the nodes side
// by side, and returns their answers. As on a single Redis the runs take
// pooled connections, and the fence (half of REDIS_TIMEOUT) and the wait
// for the answers count from start.
func (s *redisStore) runParts(ctx context.Context, calls []*ingestCall, extra []int, start time.Time, wait time.Duration, waitLocked bool) []partResult {
	cl := s.pool.cluster
	fence := start.Add(s.pool.timeout / 2)
	c := &clusterConn{cl: cl, ctx: ctx, deadline: start.Add(wait), pooled: true}
	results := make([]partResult, len(calls))
	// The slot table, read at most once and by the fence: every run
	// routes by it.
	tctx, cancel := context.WithDeadline(ctx, fence)
	_, err := cl.table(tctx)
	cancel()
	if err != nil {
		for i := range results {
			results[i].err = err
		}
		return results
	}
	send := func(i int, cmd, body string) {
		call := calls[i]
		args := slices.Clone(call.args)
		args[6] = call.args[6].(int) | extra[i]
		args[0] = s.fenceFor(call.keys[0], fence)
		line := make([]any, 0, 2+len(call.keys)+len(args))
		line = append(line, body, len(call.keys))
		for _, k := range call.keys {
			line = append(line, k)
		}
		c.Send(cmd, append(line, args...)...)
	}
	var sent []int
	for i := range calls {
		if extra[i] < 0 {
			results[i].reply = skipped{}
			continue
		}
		send(i, "EVALSHA", ingestScript.hash)
		sent = append(sent, i)
	}
	receive := func(sent []int) (missing []int) {
		if err := c.Flush(); err != nil {
			for _, i := range sent {
				results[i].err = err
			}
			return nil
		}
		for _, i := range sent {
			results[i].reply, results[i].err = c.Receive()
			if e, ok := results[i].err.(redis.Error); ok && strings.HasPrefix(string(e), "NOSCRIPT") {
				missing = append(missing, i)
			}
		}
		return missing
	}
	// A node that lost the script (a restart) is sent its source; a
	// NOSCRIPT ran nothing.
	if missing := receive(sent); len(missing) > 0 {
		for _, i := range missing {
			send(i, "EVAL", ingestScript.src)
		}
		receive(missing)
	}
	// A run of a type a batch holds waits for it, up to its fence: the
	// batch's write comes within milliseconds.
	for pause := tryAgainWait; waitLocked; pause = min(2*pause, maxTryAgainWait) {
		var locked []int
		for i, r := range results {
			if lockedRefusal(r.err) {
				locked = append(locked, i)
			}
		}
		if len(locked) == 0 || !time.Now().Add(pause).Before(fence) {
			break
		}
		time.Sleep(pause)
		for _, i := range locked {
			send(i, "EVALSHA", ingestScript.hash)
		}
		receive(locked)
	}
	return results
}

func lockedRefusal(err error) bool {
	e, ok := err.(redis.Error)
	return ok && strings.HasPrefix(string(e), "LOCKED ")
}

func newTypeRefusal(err error) bool {
	e, ok := err.(redis.Error)
	return ok && strings.HasPrefix(string(e), "NEWTYPE ")
}

// judge decides the checked runs' answer as a single Redis would refuse the
// whole ingest: a refusal read before anything else (a deleted type, a
// colliding series, a reused key), then a new type too old, then MAX_TYPES,
// then a type too old or past MAX_SERIES; each the first by type name.
// When nothing is refused, the new types take their MAX_TYPES room, and
// are returned. An answer that is no refusal (the fence, a failure) fails
// the ingest, which stored nothing.
func (s *redisStore) judge(ctx context.Context, names []string, results []partResult, ingests [][]typeBatch) (fresh []string, err error) {
	refusals := [3]error{} // by class: read first, new type too old, the rest
	for i, r := range results {
		e, ok := r.err.(redis.Error)
		if r.err != nil && !ok {
			return nil, r.err
		}
		if !ok {
			continue
		}
		f := strings.Fields(string(e))
		class := 2
		switch {
		case len(f) >= 2 && f[0] == "NEWTYPE":
			fresh = append(fresh, names[i])
			if len(f) == 2 {
				continue
			}
			e = redis.Error(strings.Join(f[2:], " "))
		case len(f) > 0 && (f[0] == "DELETING" || f[0] == "COLLISION" || f[0] == "KEYREUSED"):
			class = 0
		case len(f) == 4 && f[0] == "TOOOLD":
			class = 1
		case len(f) > 0 && (f[0] == "TOOOLD" || f[0] == "TOOMANYSERIES"):
		default:
			return nil, e
		}
		if refusals[class] == nil {
			refusals[class] = e
		}
	}
	for _, err := range refusals[:2] {
		if err != nil {
			return nil, refusalOf(err, ingests)
		}
	}
	if len(fresh) > 0 {
		// Only counted when another refusal would follow: the room is
		// taken only by an ingest that is then written.
		if err := s.register(ctx, fresh, refusals[2] == nil); err != nil {
			return nil, err
		}
	}
	if refusals[2] != nil {
		return nil, refusalOf(refusals[2], ingests)
	}
	return fresh, nil
}

// register takes MAX_TYPES room for the types not in the set of type names
// yet, all of them or none (tooManyTypesError naming the first), or with
// take false only checks that there is room.
func (s *redisStore) register(ctx context.Context, names []string, take bool) error {
	// Fenced as an ingest is: a run Redis starts after the service gave up
	// on it would take room for types never written.
	fence := s.fenceFor(s.keys.types(), time.Now().Add(s.pool.timeout/2))
	args := []any{fence, s.maxTypes, take}
	for _, n := range names {
		args = append(args, n)
	}
	err := s.pool.with(ctx, "ingest", func(c redis.Conn, deadline time.Time) error {
		_, err := registerScript.run(c, deadline, []string{s.keys.types()}, args...)
		return err
	})
	if e, ok := err.(redis.Error); ok {
		if f := strings.Fields(string(e)); len(f) == 2 && f[0] == "TOOMANYTYPES" {
			return &tooManyTypesError{f[1]}
		}
	}
	return err
}

// noteCompact adds types to the set of types with buckets to compact. A
// note lost here is made again by the next ingest that finds the bucket
// grown.
func (s *redisStore) noteCompact(ctx context.Context, names []string) {
	args := []any{s.keys.compactTypes()}
	for _, n := range names {
		args = append(args, n)
	}
	s.pool.with(ctx, "ingest", func(c redis.Conn, deadline time.Time) error {
		_, err := do(c, deadline, "SADD", args...)
		return err
	})
}

// fenceFor is fence on the clock of the Redis that holds key: on a cluster,
// of the node the slot table says its slot is on (the table is not read
// here: the run's routing reads it, within its deadline).
func (s *redisStore) fenceFor(key string, fence time.Time) int64 {
	if cl := s.pool.cluster; cl != nil {
		if addr := cl.slots.Load().master(keySlot(key)); addr != "" {
			return cl.node(addr).redisMicros(fence)
		}
	}
	return s.pool.redisMicros(fence)
}

// claimOnce binds o's key to o's request before anything of it is
// written: it records the request's digest alone under the key, unless the
// key holds a record already. A digest alone is this request's (an earlier
// attempt, or one at the same time: each type's part is applied once
// anyway) or another's (errKeyReused); a whole record is answered as on a
// single Redis, with the replay or errKeyReused. So two requests under one
// key never each store some of their types.
func (s *redisStore) claimOnce(ctx context.Context, o *onceKey) (claimed bool, err error) {
	var rec []byte
	err = s.pool.with(ctx, "ingest", func(c redis.Conn, deadline time.Time) error {
		var err error
		rec, err = redis.Bytes(do(c, deadline, "SET", s.keys.once(o.id), o.print[:], "NX", "GET", "PX", onceLifetime.Milliseconds()))
		if err == redis.ErrNil {
			rec, err = nil, nil
		}
		return err
	})
	switch {
	case err != nil:
		return false, err
	case rec == nil:
		return true, nil
	case len(rec) == len(o.print):
		if !bytes.Equal(rec, o.print[:]) {
			return false, errKeyReused
		}
		return false, nil
	}
	return false, replayOf(o, rec)
}

// releaseScript deletes a key that still holds the value given: a claim
// of a key, a batch's hold of a type.
var releaseScript = newScript(`if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

// releaseOnce frees o's key of its claim. Failing, it leaves the key bound
// to o's request for its lifetime, which a retry of it goes on with.
func (s *redisStore) releaseOnce(ctx context.Context, o *onceKey) {
	s.pool.with(ctx, "ingest", func(c redis.Conn, deadline time.Time) error {
		_, err := releaseScript.run(c, deadline, []string{s.keys.once(o.id)}, o.print[:])
		return err
	})
}

// held is the types whose check took the batch's hold (lua/ingest.lua
// says when), new ones always.
func held(names []string, results []partResult) []string {
	var out []string
	for i, r := range results {
		if r.err == nil && r.reply == int64(3) || newTypeRefusal(r.err) && len(strings.Fields(r.err.Error())) == 2 {
			out = append(out, names[i])
		}
	}
	return out
}

// release lets go of the types a batch holds (token), each on its node, in
// one round trip. A hold not let go of expires by itself.
func (s *redisStore) release(ctx context.Context, names []string, token string) {
	if len(names) == 0 {
		return
	}
	s.pool.with(ctx, "ingest", func(c redis.Conn, deadline time.Time) error {
		for _, n := range names {
			c.Send("EVAL", releaseScript.src, 1, s.keys.hold(n), token)
		}
		_, err := do(c, deadline, "")
		return err
	})
}

// recordOnce records o's key for the whole request.
func (s *redisStore) recordOnce(ctx context.Context, o *onceKey) error {
	if o == nil {
		return nil
	}
	return s.pool.with(ctx, "ingest", func(c redis.Conn, deadline time.Time) error {
		_, err := do(c, deadline, "SET", s.keys.once(o.id), o.record(), "PX", onceLifetime.Milliseconds())
		return err
	})
}

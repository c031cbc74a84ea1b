package main

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"sync"
	"time"
)

// Group commit: concurrent small ingests share one run of the ingest
// script. Ingests queue; a drainer takes all that wait (up to
// maxGroupSamples samples) and applies them in one run, as if one after
// the other in the order they arrived (ingestCall), so Redis pays the
// script's fixed costs, per call, per type and per bucket, once for all of
// them. Nothing waits on purpose: an ingest that finds a drainer free
// starts at once, alone, and a group forms only from the ingests that
// arrive while maxCommits runs are in flight.
//
// A group's run is one atomic step, as every ingest's is. When it fails
// knowing that nothing was stored (a refusal: a type too old, MAX_TYPES,
// MAX_SERIES, a hash collision, which names a type but not an ingest; a
// key of the wrong type; the fence; no connection), each ingest of the
// group runs again alone, for its own answer, from its own request, so
// the retries run side by side and hold up no other group; that is the
// only retry, and it is of a write known not to have been applied.
// When the group's answer was lost, it may be stored, and every ingest of
// it gets the error.
//
// Each ingest keeps its deadline: a run's fence is the earliest of its
// ingests', so no ingest is stored after its own; one whose fence passed
// while it queued or before its retry, or whose request ended, is
// answered without being sent.

const (
	// maxGroupedSamples is the largest ingest that joins a group; a
	// larger one runs alone, as it already spreads the script's costs.
	maxGroupedSamples = 64
	// maxGroupSamples bounds one group's run, so none holds Redis long.
	maxGroupSamples = 1024
	// maxCommits is how many runs are in flight at once: two keep Redis
	// busy while the service lays out the next group.
	maxCommits = 2
)

// errQueuedPastFence answers an ingest that waited in the queue until it
// could no longer be stored within its deadline.
var errQueuedPastFence = errors.New("ingest: queued past its deadline, not sent to Redis")

// queuedIngest is one ingest waiting for its group's run.
type queuedIngest struct {
	ctx     context.Context
	batches []typeBatch
	once    *onceKey // its Idempotency-Key's record; such an ingest runs alone
	now     time.Time
	arrived time.Time // its fence and its wait count from here
	samples int
	done    chan error // buffered: the drainer never blocks on it
}

// ingestQueue holds the ingests waiting for a run; running counts the
// drainers, at most maxCommits.
type ingestQueue struct {
	mu      sync.Mutex
	waiting []*queuedIngest
	running int
}

func (s *redisStore) add(ctx context.Context, batches []typeBatch, now time.Time) error {
	return s.addOnce(ctx, batches, now, nil)
}

// addOnce is add, with o recorded in the script's run when it is not nil.
// Such an ingest runs alone: its record decides whether it is applied at
// all, which no other ingest's run should depend on.
func (s *redisStore) addOnce(ctx context.Context, batches []typeBatch, now time.Time, o *onceKey) error {
	in := &queuedIngest{ctx: ctx, batches: batches, once: o, now: now, arrived: time.Now()}
	for _, b := range batches {
		in.samples += b.samples
	}
	// On a cluster a run is of one type: an ingest of several runs alone.
	if s.cluster && len(batches) != 1 {
		err := s.addCluster(ctx, batches, now, o, in.arrived)
		if err != nil && !refused(err) {
			s.pool.tel.storeError("ingest")
		}
		return err
	}
	var err error
	if in.samples > maxGroupedSamples || !s.grouped || o != nil {
		err = s.commit([]*queuedIngest{in})[0]
	} else {
		in.done = make(chan error, 1)
		q := &s.queue
		q.mu.Lock()
		q.waiting = append(q.waiting, in)
		drain := q.running < maxCommits
		if drain {
			q.running++
		}
		q.mu.Unlock()
		if drain {
			go s.drain()
		}
		err = s.settle(in, <-in.done)
	}
	if p := (*groupPanic)(nil); errors.As(err, &p) {
		panic(p.Error())
	}
	return err
}

// settle is an ingest's answer from its group's: its own, or, when the
// group failed storing nothing, the answer of a run of it alone, made from
// the ingest's own goroutine, so the retries of a group run side by side
// and the drainers go on with the next groups.
func (s *redisStore) settle(in *queuedIngest, err error) error {
	if err != errRunAlone {
		return err
	}
	return s.commit([]*queuedIngest{in})[0]
}

// errRunAlone tells an ingest that its group failed storing nothing and
// that it is to run again alone.
var errRunAlone = errors.New("ingest: run again alone")

// drain runs groups until no ingest waits.
func (s *redisStore) drain() {
	q := &s.queue
	for {
		q.mu.Lock()
		n, samples := 0, 0
		for n < len(q.waiting) && (n == 0 || samples+q.waiting[n].samples <= maxGroupSamples) {
			samples += q.waiting[n].samples
			n++
		}
		if n == 0 {
			q.running--
			q.mu.Unlock()
			return
		}
		group := slices.Clone(q.waiting[:n])
		q.waiting = slices.Delete(q.waiting, 0, n)
		q.mu.Unlock()
		for i, err := range s.commitEach(group) {
			group[i].done <- err
		}
	}
}

// commitEach is commit, one run per type on a cluster, side by side: a
// run there is of one type's keys, and each ingest in a group holds one.
func (s *redisStore) commitEach(group []*queuedIngest) []error {
	if !s.cluster {
		return s.commit(group)
	}
	errs := make([]error, len(group))
	byType := map[string][]int{}
	for i, in := range group {
		byType[in.batches[0].typ] = append(byType[in.batches[0].typ], i)
	}
	var wg sync.WaitGroup
	for _, idx := range byType {
		wg.Go(func() {
			part := make([]*queuedIngest, len(idx))
			for k, i := range idx {
				part[k] = group[i]
			}
			for k, err := range s.commit(part) {
				errs[idx[k]] = err
			}
		})
	}
	wg.Wait()
	return errs
}

// commit applies a group, in order, and returns each ingest's answer.
func (s *redisStore) commit(group []*queuedIngest) (errs []error) {
	errs = make([]error, len(group))
	defer func() {
		// A bug is the request's panic, as it would be without the group,
		// not the drainer's, which nothing would recover.
		if p := recover(); p != nil {
			gp := &groupPanic{value: p, stack: debug.Stack()}
			for i := range errs {
				errs[i] = gp
			}
		}
		for _, err := range errs {
			if err != nil && err != errRunAlone && !refused(err) {
				s.pool.tel.storeError("ingest")
			}
		}
	}()
	var live []int
	for i, in := range group {
		if errs[i] = s.unsendable(in); errs[i] == nil {
			live = append(live, i)
		}
	}
	if len(live) == 1 {
		in := group[live[0]]
		if s.cluster {
			// Alone, a new type's first write takes its room first.
			errs[live[0]] = s.addCluster(in.ctx, in.batches, in.now, in.once, in.arrived)
		} else {
			_, errs[live[0]] = s.apply(in.ctx, [][]typeBatch{in.batches}, in.once, in.now, in.arrived)
		}
		s.observeRun(1)
	}
	if len(live) < 2 {
		return errs
	}
	ingests := make([][]typeBatch, len(live))
	latest, first := group[live[0]].now, group[live[0]].arrived
	for k, i := range live {
		ingests[k] = group[i].batches
		latest, first = later(latest, group[i].now), earlier(first, group[i].arrived)
	}
	// The requests end with their ingests, so a group's run borrows its
	// connection under a context of its own; the fence bounds it.
	unsure, err := s.apply(context.Background(), ingests, nil, latest, first)
	s.observeRun(len(live))
	if err == nil || unsure {
		for _, i := range live {
			errs[i] = err
		}
		return errs
	}
	// Nothing was stored: a refusal, or the group's fence (its earliest
	// ingest's) or connection. Each ingest runs again alone (settle).
	for _, i := range live {
		errs[i] = errRunAlone
	}
	return errs
}

// unsendable is why an ingest is not to be sent: its request ended, or its
// fence has passed.
func (s *redisStore) unsendable(in *queuedIngest) error {
	if err := in.ctx.Err(); err != nil {
		return err
	}
	if !time.Now().Before(in.arrived.Add(s.pool.timeout / 2)) {
		return errQueuedPastFence
	}
	return nil
}

func (s *redisStore) observeRun(ingests int) {
	if s.pool.tel != nil {
		s.pool.tel.ingestGroups.observe(ingests)
	}
}

// groupPanic carries a panic in a group's run to each of its requests.
type groupPanic struct {
	value any
	stack []byte
}

func (p *groupPanic) Error() string { return fmt.Sprintf("ingest: %v\n%s", p.value, p.stack) }

// refused reports whether err is the store refusing an ingest, or
// answering a repeat of one, which stored nothing, rather than failing.
func refused(err error) bool {
	var re *requestError
	var tt *tooManyTypesError
	var ts *tooManySeriesError
	var to *tooOldError
	var rp *replayError
	return errors.As(err, &re) || errors.As(err, &tt) || errors.As(err, &ts) || errors.As(err, &to) || errors.As(err, &rp)
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

func earlier(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

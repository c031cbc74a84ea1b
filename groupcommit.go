package main

import (
	"context"
	"errors"
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
// A group's run is one atomic step, as every ingest's is. When it is
// refused (a type too old, MAX_TYPES, MAX_SERIES, a hash collision),
// which says which type but not which ingest, nothing was stored, and each
// ingest of the group runs again alone, in arrival order, to get its own
// answer; that is the only retry, and it is of a write known not to have
// been applied. Any other failure fails every ingest of the group.
//
// Each ingest keeps its deadline: the run's fence is the earliest of its
// ingests', so no ingest is stored after its own; one whose fence passed
// while it queued, or whose request ended, is answered without being sent.

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
	in := &queuedIngest{ctx: ctx, batches: batches, now: now, arrived: time.Now()}
	for _, b := range batches {
		in.samples += b.samples
	}
	if in.samples > maxGroupedSamples {
		return s.commit([]*queuedIngest{in})[0]
	}
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
	return <-in.done
}

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
		for i, err := range s.commit(group) {
			group[i].done <- err
		}
	}
}

// commit applies a group, in order, and returns each ingest's answer.
func (s *redisStore) commit(group []*queuedIngest) []error {
	errs := make([]error, len(group))
	var live []int
	now := time.Now()
	for i, in := range group {
		switch {
		case in.ctx.Err() != nil:
			errs[i] = in.ctx.Err()
		case !now.Before(in.arrived.Add(s.pool.timeout / 2)):
			errs[i] = errQueuedPastFence
		default:
			live = append(live, i)
		}
	}
	if len(live) > 0 {
		ingests := make([][]typeBatch, len(live))
		latest, first := group[live[0]].now, group[live[0]].arrived
		for k, i := range live {
			ingests[k] = group[i].batches
			latest, first = later(latest, group[i].now), earlier(first, group[i].arrived)
		}
		// The request ends with its ingest, so a group's run borrows its
		// connection under a context of its own; the fence bounds it.
		err := s.apply(context.Background(), ingests, latest, first)
		if s.pool.tel != nil {
			s.pool.tel.ingestGroups.observe(len(live))
		}
		for _, i := range live {
			errs[i] = err
		}
		if len(live) > 1 && refused(err) {
			for _, i := range live {
				in := group[i]
				errs[i] = s.apply(in.ctx, [][]typeBatch{in.batches}, in.now, time.Now())
				if s.pool.tel != nil {
					s.pool.tel.ingestGroups.observe(1)
				}
			}
		}
	}
	for _, err := range errs {
		if err != nil && !refused(err) {
			s.pool.tel.storeError("ingest")
		}
	}
	return errs
}

// refused reports whether err is the store refusing an ingest, which
// stored nothing, rather than failing.
func refused(err error) bool {
	var re *requestError
	var tt *tooManyTypesError
	var ts *tooManySeriesError
	var to *tooOldError
	return errors.As(err, &re) || errors.As(err, &tt) || errors.As(err, &ts) || errors.As(err, &to)
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

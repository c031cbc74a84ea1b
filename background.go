package main

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Background work that keeps a backend in shape, started and stopped by
// run, so that nothing expensive runs inside a request that happens to come
// first.

// startUpkeep starts b's background work and returns the function that
// stops it and waits until it has stopped. It stops by itself, too, when
// ctx is done.
func startUpkeep(ctx context.Context, cfg config, b backend, log *slog.Logger) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { b.hub.run(ctx.Done()) })
	if b.listen != nil {
		wg.Go(func() { b.listen(ctx, log) })
	}
	if b.sweep != nil {
		wg.Go(func() { every(ctx, min(sweepEvery, limiterSweepEvery(cfg.RateWindow)), b.now, b.sweep) })
	}
	if b.compact != nil {
		// A failure (Redis down) is counted in store_errors_total and
		// tried again on the next tick.
		wg.Go(func() { every(ctx, compactEvery, b.now, func(time.Time) { b.compact(ctx) }) })
	}
	if b.reclaim != nil {
		wg.Go(func() { every(ctx, compactEvery, b.now, func(time.Time) { b.reclaim(ctx) }) })
	}
	return func() {
		cancel()
		wg.Wait()
	}
}

// sweepEvery is how often the memory store and cache drop what retention
// and CACHE_TTL no longer keep.
const sweepEvery = time.Second

// compactEvery is how often each instance looks for Redis buckets to
// compact; between two looks an ingest-heavy bucket grows by what ingests
// append in that time.
const compactEvery = 100 * time.Millisecond

// every calls fn(now()) every d until ctx is done, and returns then. The
// ticker is its only wait: a call that takes longer than d delays the next
// one instead of piling calls up.
func every(ctx context.Context, d time.Duration, now func() time.Time, fn func(time.Time)) {
	tick := time.NewTicker(d)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			fn(now())
		}
	}
}

package main

import (
	"context"
	"sync"
	"time"
)

// Background work that keeps a backend in shape, started and stopped by
// run, so that nothing expensive runs inside a request that happens to come
// first.

// startUpkeep starts b's background work and returns the function that
// stops it and waits until it has stopped. It stops by itself, too, when
// ctx is done.
func startUpkeep(ctx context.Context, cfg config, b backend) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	if b.sweep != nil {
		wg.Go(func() { every(ctx, min(sweepEvery, limiterSweepEvery(cfg.RateWindow)), b.now, b.sweep) })
	}
	return func() {
		cancel()
		wg.Wait()
	}
}

// sweepEvery is how often the memory store and cache drop what retention
// and CACHE_TTL no longer keep.
const sweepEvery = time.Second

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

package main

import (
	"context"
	"sync"
	"testing"
	"time"
)

// TestEveryCallsUntilCancelled drives every with a short interval: fn gets
// the injected clock's time on each call, and every returns once its
// context is cancelled.
func TestEveryCallsUntilCancelled(t *testing.T) {
	clock := newFakeClock(testEpoch)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const calls = 3
	var got []time.Time // written by fn alone until thrice is closed
	thrice := make(chan struct{})
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		every(ctx, time.Millisecond, clock.now, func(at time.Time) {
			if len(got) == calls {
				return
			}
			got = append(got, at)
			clock.advance(time.Minute)
			if len(got) == calls {
				close(thrice)
			}
		})
	}()
	select {
	case <-thrice:
	case <-time.After(10 * time.Second):
		t.Fatalf("every(1ms) did not make %d calls in 10s", calls)
	}
	for i, at := range got {
		if want := testEpoch.Add(time.Duration(i) * time.Minute); !at.Equal(want) {
			t.Errorf("call %d: fn(%v), want fn(now()) = %v", i, at, want)
		}
	}
	cancel()
	select {
	case <-returned:
	case <-time.After(10 * time.Second):
		t.Fatal("every did not return after its context was cancelled")
	}
}

// TestUpkeepSweepsMemoryLimiter: the upkeep run starts is what sweeps the
// memory limiter, and stopping it waits for its loop to end.
func TestUpkeepSweepsMemoryLimiter(t *testing.T) {
	cfg := testConfig(t)
	cfg.RateWindow = 400 * time.Millisecond // a sweep every 100 ms
	clock := newFakeClock(testEpoch)
	b := newMemoryBackend(cfg, clock.now)
	lim := b.limiter.(*memoryLimiter)
	for _, client := range []string{"192.0.2.1", "192.0.2.2"} {
		lim.allow(context.Background(), client, testEpoch)
	}
	clock.advance(2 * cfg.RateWindow)

	swept := make(chan struct{})
	var once sync.Once
	sweep := b.sweep
	b.sweep = func(now time.Time) {
		sweep(now)
		once.Do(func() { close(swept) })
	}
	stop := startUpkeep(context.Background(), cfg, b, discardLogger())
	select {
	case <-swept:
	case <-time.After(10 * time.Second):
		stop()
		t.Fatal("no background sweep within 10s")
	}
	stop()
	if n := counters(lim); n != 0 {
		t.Errorf("%d counters after a background sweep two windows later, want 0", n)
	}
}

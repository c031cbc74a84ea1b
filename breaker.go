package main

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"sync"
	"time"
)

// state is where a breaker stands.
type state int

const (
	stateClosed   state = iota // calls go through; consecutive failures are counted
	stateOpen                  // calls are rejected until the reset timeout has passed
	stateHalfOpen              // one trial call at a time decides between the two
)

func (s state) String() string {
	switch s {
	case stateClosed:
		return "closed"
	case stateOpen:
		return "open"
	case stateHalfOpen:
		return "half-open"
	}
	return "state(" + strconv.Itoa(int(s)) + ")"
}

// errCircuitOpen is returned by breaker.call when it rejects a call without
// making it: the breaker is open, or half-open with its trial call in flight.
var errCircuitOpen = errors.New("circuit open")

// breakerSettings configures a breaker. A zero field means its default.
type breakerSettings struct {
	// threshold is how many consecutive failures open a closed breaker.
	// Default 3.
	threshold int
	// resetTimeout is how long an open breaker rejects calls before it
	// lets a trial call through. Default 10s.
	resetTimeout time.Duration
	// now is the breaker's clock. Default time.Now.
	now func() time.Time
	// log gets one line per transition. Default: no logging.
	log *slog.Logger
	// onTransition, when set, is called once per transition, in the order
	// they happen. It runs with the breaker's lock held, which is what keeps
	// that order, so it must be quick and must not call the breaker.
	onTransition func(from, to state)
}

// breaker is a three-state circuit breaker.
//
// Closed, calls run concurrently and threshold consecutive failures (in the
// order they finish) open it; a success resets the count. Open, every call
// is rejected at once with errCircuitOpen until resetTimeout has passed.
// Then it is half-open: exactly one trial call at a time goes through and
// the others are rejected at once, never queued. The trial's success closes
// the breaker; its failure opens it again for a fresh resetTimeout.
//
// Open becomes half-open lazily, when the breaker is next asked, so an idle
// breaker needs no timer.
//
// Every transition starts a new generation, and a call's result counts only
// in the generation it started in: a slow call from before the breaker
// opened cannot close it, reopen it, or be mistaken for the trial.
//
// A breaker must be made with newBreaker and is safe for concurrent use. Its
// lock guards the counters only, never a call. State is per process.
type breaker struct {
	threshold    int
	resetTimeout time.Duration
	now          func() time.Time
	log          *slog.Logger
	onTransition func(from, to state)

	mu         sync.Mutex
	st         state
	generation uint64
	failures   int       // consecutive, while closed
	halfOpenAt time.Time // while open: when the breaker becomes half-open
	trial      bool      // while half-open: the trial call is in flight
}

func newBreaker(s breakerSettings) *breaker {
	b := &breaker{
		threshold:    s.threshold,
		resetTimeout: s.resetTimeout,
		now:          s.now,
		log:          s.log,
		onTransition: s.onTransition,
	}
	if b.threshold <= 0 {
		b.threshold = 3
	}
	if b.resetTimeout <= 0 {
		b.resetTimeout = 10 * time.Second
	}
	if b.now == nil {
		b.now = time.Now
	}
	if b.log == nil {
		b.log = slog.New(slog.DiscardHandler)
	}
	return b
}

// outcome is what a finished call means to the breaker.
type outcome int

const (
	outcomeSuccess outcome = iota
	outcomeFailure
	// outcomeAbandoned is a call its caller gave up on: it says nothing
	// about the service, so it counts as neither success nor failure.
	outcomeAbandoned
)

// call runs fn through the breaker and returns fn's error, or
// errCircuitOpen without running fn, along with the state after the call.
//
// fn fails when it returns an error, unless ctx was cancelled by then: the
// caller went away, and the error most likely says so rather than anything
// about the service. A deadline passing, ctx's or one fn sets itself, is a
// failure: the service did not answer in time. A panic in fn counts as a
// failure and keeps propagating. fn hands back any value through its
// closure, which keeps the breaker indifferent to what it guards.
func (b *breaker) call(ctx context.Context, fn func(context.Context) error) (state, error) {
	gen, st, err := b.before()
	if err != nil {
		return st, err
	}
	// Not recover-and-repanic: a panic that is never recovered keeps the
	// stack trace of where it happened.
	returned := false
	defer func() {
		if !returned {
			b.after(gen, outcomeFailure)
		}
	}()
	err = fn(ctx)
	returned = true
	return b.after(gen, outcomeOf(ctx, err)), err
}

func outcomeOf(ctx context.Context, err error) outcome {
	switch {
	case err == nil:
		return outcomeSuccess
	case errors.Is(ctx.Err(), context.Canceled):
		return outcomeAbandoned
	default:
		return outcomeFailure
	}
}

// state reports the breaker's state now.
func (b *breaker) state() state {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.current(b.now())
}

// before admits or rejects a call. An admitted call gets the generation its
// result will count in.
func (b *breaker) before() (uint64, state, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := b.current(b.now())
	if st == stateOpen || (st == stateHalfOpen && b.trial) {
		return 0, st, errCircuitOpen
	}
	if st == stateHalfOpen {
		b.trial = true
	}
	return b.generation, st, nil
}

// after records the outcome of a call admitted in generation gen and
// returns the state it leaves the breaker in.
func (b *breaker) after(gen uint64, o outcome) state {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	st := b.current(now)
	if gen != b.generation {
		return st
	}
	switch o {
	case outcomeSuccess:
		if st == stateHalfOpen {
			b.setState(stateClosed, now)
		}
		b.failures = 0
	case outcomeFailure:
		if st == stateHalfOpen {
			b.setState(stateOpen, now)
			break
		}
		b.failures++
		if b.failures >= b.threshold {
			b.setState(stateOpen, now)
		}
	case outcomeAbandoned:
		if st == stateHalfOpen {
			// The trial said nothing, so the next call gets to be the trial.
			b.trial = false
		}
	}
	return b.st
}

// current moves an open breaker whose time is up to half-open and returns
// the state. b.mu must be held.
func (b *breaker) current(now time.Time) state {
	if b.st == stateOpen && !now.Before(b.halfOpenAt) {
		b.setState(stateHalfOpen, now)
	}
	return b.st
}

// setState is the only place the state changes. b.mu must be held.
func (b *breaker) setState(to state, now time.Time) {
	from := b.st
	if from == to {
		return
	}
	b.st = to
	b.generation++
	b.failures = 0
	b.trial = false
	level := slog.LevelInfo
	if to == stateOpen {
		b.halfOpenAt = now.Add(b.resetTimeout)
		level = slog.LevelWarn
	}
	b.log.LogAttrs(context.Background(), level, "circuit breaker state changed",
		slog.String("from", from.String()), slog.String("to", to.String()))
	if b.onTransition != nil {
		b.onTransition(from, to)
	}
}

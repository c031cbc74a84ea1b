package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"
)

var errBoom = errors.New("boom")

// callKind is what a step's call does once the breaker lets it run.
type callKind int

const (
	succeed callKind = iota
	fail
	abandon // the caller's context is cancelled and the call returns its error
	look    // no call: only the breaker's state is checked
)

func (k callKind) String() string {
	return [...]string{"succeed", "fail", "abandon", "look"}[k]
}

func TestBreakerSteps(t *testing.T) {
	// Zero settings mean the defaults: threshold 3, reset timeout 10s.
	const reset = 10 * time.Second
	type step struct {
		at   time.Duration // since the test's first instant
		call callKind
		ran  bool // whether the breaker let the call run
		want state
	}
	tests := []struct {
		name         string
		threshold    int // 0: the default of 3
		resetTimeout time.Duration
		steps        []step
	}{
		{
			name: "consecutive failures open at the threshold",
			steps: []step{
				{0, fail, true, stateClosed},
				{0, fail, true, stateClosed},
				{0, fail, true, stateOpen},
				{0, succeed, false, stateOpen},
			},
		},
		{
			name:      "custom threshold",
			threshold: 1,
			steps: []step{
				{0, succeed, true, stateClosed},
				{0, fail, true, stateOpen},
			},
		},
		{
			name: "success resets the count",
			steps: []step{
				{0, fail, true, stateClosed},
				{0, fail, true, stateClosed},
				{0, succeed, true, stateClosed},
				{0, fail, true, stateClosed},
				{0, fail, true, stateClosed},
				{0, fail, true, stateOpen},
			},
		},
		{
			name: "open rejects until the reset timeout, then half-opens lazily",
			steps: []step{
				{0, fail, true, stateClosed},
				{0, fail, true, stateClosed},
				{0, fail, true, stateOpen},
				{5 * time.Second, succeed, false, stateOpen},
				{reset - time.Nanosecond, fail, false, stateOpen},
				{reset - time.Nanosecond, look, false, stateOpen},
				{reset, look, false, stateHalfOpen},
				{reset + time.Hour, look, false, stateHalfOpen},
				{reset + time.Hour, succeed, true, stateClosed},
			},
		},
		{
			name:         "custom reset timeout",
			threshold:    1,
			resetTimeout: time.Minute,
			steps: []step{
				{0, fail, true, stateOpen},
				{reset, succeed, false, stateOpen},
				{time.Minute, look, false, stateHalfOpen},
			},
		},
		{
			name: "trial success closes with a fresh count",
			steps: []step{
				{0, fail, true, stateClosed},
				{0, fail, true, stateClosed},
				{0, fail, true, stateOpen},
				{reset, succeed, true, stateClosed},
				{reset, fail, true, stateClosed},
				{reset, fail, true, stateClosed},
				{reset, fail, true, stateOpen},
			},
		},
		{
			name: "trial failure reopens and restarts the timer",
			steps: []step{
				{0, fail, true, stateClosed},
				{0, fail, true, stateClosed},
				{0, fail, true, stateOpen},
				{reset + time.Second, fail, true, stateOpen},
				{2*reset + time.Second - time.Nanosecond, succeed, false, stateOpen},
				{2*reset + time.Second, succeed, true, stateClosed},
			},
		},
		{
			name: "an abandoned call is neither success nor failure",
			steps: []step{
				{0, fail, true, stateClosed},
				{0, fail, true, stateClosed},
				{0, abandon, true, stateClosed}, // a failure would open
				{0, fail, true, stateOpen},      // a success would have reset the count
			},
		},
		{
			name:      "an abandoned trial frees the trial slot",
			threshold: 1,
			steps: []step{
				{0, fail, true, stateOpen},
				{reset, abandon, true, stateHalfOpen},
				{reset, abandon, true, stateHalfOpen},
				{reset, fail, true, stateOpen},
				{2 * reset, succeed, true, stateClosed},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock(testEpoch)
			t0 := clock.now()
			b := newBreaker(breakerSettings{threshold: tt.threshold, resetTimeout: tt.resetTimeout, now: clock.now})
			for i, s := range tt.steps {
				clock.advance(t0.Add(s.at).Sub(clock.now()))
				if s.call == look {
					if got := b.state(); got != s.want {
						t.Fatalf("step %d at %v: state() = %v, want %v", i, s.at, got, s.want)
					}
					continue
				}
				ran := false
				ctx, cancel := context.WithCancel(context.Background())
				st, err := b.call(ctx, func(ctx context.Context) error {
					ran = true
					switch s.call {
					case fail:
						return errBoom
					case abandon:
						cancel()
						return ctx.Err()
					}
					return nil
				})
				cancel()
				if ran != s.ran {
					t.Fatalf("step %d at %v (%v): call ran = %v, want %v", i, s.at, s.call, ran, s.ran)
				}
				wantErr := error(nil)
				switch {
				case !s.ran:
					wantErr = errCircuitOpen
				case s.call == fail:
					wantErr = errBoom
				case s.call == abandon:
					wantErr = context.Canceled
				}
				if !errors.Is(err, wantErr) {
					t.Fatalf("step %d at %v (%v): call() error = %v, want %v", i, s.at, s.call, err, wantErr)
				}
				if st != s.want {
					t.Fatalf("step %d at %v (%v): call() state = %v, want %v", i, s.at, s.call, st, s.want)
				}
				if got := b.state(); got != s.want {
					t.Fatalf("step %d at %v (%v): state() = %v, want %v", i, s.at, s.call, got, s.want)
				}
			}
		})
	}
}

func TestStateString(t *testing.T) {
	for s, want := range map[state]string{
		stateClosed:   "closed",
		stateOpen:     "open",
		stateHalfOpen: "half-open",
		state(7):      "state(7)",
	} {
		if got := s.String(); got != want {
			t.Errorf("state(%d).String() = %q, want %q", int(s), got, want)
		}
	}
}

type callResult struct {
	st  state
	err error
}

// pendingCall is a call through a breaker that runs until the test ends it.
type pendingCall struct {
	end  chan error
	done chan callResult
}

// startCall starts a call and returns once the breaker has let it run.
func startCall(t *testing.T, b *breaker) *pendingCall {
	t.Helper()
	p := &pendingCall{end: make(chan error), done: make(chan callResult, 1)}
	running := make(chan struct{})
	go func() {
		st, err := b.call(context.Background(), func(context.Context) error {
			close(running)
			return <-p.end
		})
		p.done <- callResult{st, err}
	}()
	select {
	case <-running:
	case r := <-p.done:
		t.Fatalf("call() = %v, %v before it ran, want it to run", r.st, r.err)
	}
	return p
}

// finish makes the call return err and reports what the breaker answered.
func (p *pendingCall) finish(err error) callResult {
	p.end <- err
	return <-p.done
}

func mustNotRun(t *testing.T) func(context.Context) error {
	return func(context.Context) error {
		t.Error("call ran, want it rejected")
		return nil
	}
}

func TestBreakerHalfOpenAdmitsOneTrial(t *testing.T) {
	tests := []struct {
		trialErr  error
		wantState state
	}{
		{nil, stateClosed},
		{errBoom, stateOpen},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.trialErr), func(t *testing.T) {
			clock := newFakeClock(testEpoch)
			b := newBreaker(breakerSettings{threshold: 1, resetTimeout: 10 * time.Second, now: clock.now})
			b.call(context.Background(), func(context.Context) error { return errBoom })
			clock.advance(10 * time.Second)

			trial := startCall(t, b)
			for i := range 3 {
				st, err := b.call(context.Background(), mustNotRun(t))
				if err != errCircuitOpen || st != stateHalfOpen {
					t.Fatalf("call %d during the trial = %v, %v; want %v, %v", i, st, err, stateHalfOpen, errCircuitOpen)
				}
			}
			clock.advance(3 * time.Second)
			if got := trial.finish(tt.trialErr); got.st != tt.wantState || got.err != tt.trialErr {
				t.Fatalf("trial call() = %v, %v; want %v, %v", got.st, got.err, tt.wantState, tt.trialErr)
			}
			if tt.wantState != stateOpen {
				return
			}
			// The timer restarts from the trial's failure, not from the first opening.
			clock.advance(10*time.Second - time.Nanosecond)
			if got := b.state(); got != stateOpen {
				t.Fatalf("state() just before reset timeout after trial failure = %v, want %v", got, stateOpen)
			}
			clock.advance(time.Nanosecond)
			if got := b.state(); got != stateHalfOpen {
				t.Fatalf("state() at reset timeout after trial failure = %v, want %v", got, stateHalfOpen)
			}
		})
	}
}

func TestBreakerGenerationGuard(t *testing.T) {
	clock := newFakeClock(testEpoch)
	// Threshold 1 makes every counted failure visible as an opening.
	b := newBreaker(breakerSettings{threshold: 1, resetTimeout: 10 * time.Second, now: clock.now})

	// Slow calls started while closed, in the first generation.
	slowFailA := startCall(t, b)
	slowSuccess := startCall(t, b)
	slowFailB := startCall(t, b)

	if st, _ := b.call(context.Background(), func(context.Context) error { return errBoom }); st != stateOpen {
		t.Fatalf("call() after a failure = %v, want %v", st, stateOpen)
	}
	clock.advance(10 * time.Second)
	if got := b.state(); got != stateHalfOpen {
		t.Fatalf("state() after reset timeout = %v, want %v", got, stateHalfOpen)
	}

	// In half-open, neither may reopen or close it, nor hold the trial slot.
	if got := slowFailA.finish(errBoom); got.st != stateHalfOpen {
		t.Fatalf("stale failure in half-open: call() state = %v, want %v", got.st, stateHalfOpen)
	}
	if got := slowSuccess.finish(nil); got.st != stateHalfOpen {
		t.Fatalf("stale success in half-open: call() state = %v, want %v", got.st, stateHalfOpen)
	}
	if st, err := b.call(context.Background(), func(context.Context) error { return nil }); st != stateClosed || err != nil {
		t.Fatalf("trial call() = %v, %v; want %v, nil", st, err, stateClosed)
	}

	// Closed again, but in a later generation.
	if got := slowFailB.finish(errBoom); got.st != stateClosed {
		t.Fatalf("stale failure after closing again: call() state = %v, want %v", got.st, stateClosed)
	}
	if got := b.state(); got != stateClosed {
		t.Fatalf("state() after a stale failure = %v, want %v", got, stateClosed)
	}
}

func TestBreakerPanicIsFailure(t *testing.T) {
	tests := []struct {
		name      string
		halfOpen  bool
		wantState state
	}{
		{"closed", false, stateOpen},
		{"half-open", true, stateOpen},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock(testEpoch)
			b := newBreaker(breakerSettings{threshold: 1, now: clock.now})
			if tt.halfOpen {
				b.call(context.Background(), func(context.Context) error { return errBoom })
				clock.advance(10 * time.Second)
			}
			func() {
				defer func() {
					if r := recover(); r != "kaboom" {
						t.Errorf("recover() = %v, want kaboom", r)
					}
				}()
				b.call(context.Background(), func(context.Context) error { panic("kaboom") })
				t.Error("call() returned, want it to panic")
			}()
			if got := b.state(); got != tt.wantState {
				t.Errorf("state() after a panicking call = %v, want %v", got, tt.wantState)
			}
		})
	}
}

func TestBreakerTransitionsReportedOnce(t *testing.T) {
	clock := newFakeClock(testEpoch)
	var logs bytes.Buffer
	var got []string
	b := newBreaker(breakerSettings{
		threshold:    2,
		resetTimeout: 10 * time.Second,
		now:          clock.now,
		log:          slog.New(slog.NewJSONHandler(&logs, nil)),
		onTransition: func(from, to state) { got = append(got, from.String()+"->"+to.String()) },
	})
	ctx := context.Background()
	failing := func(context.Context) error { return errBoom }
	ok := func(context.Context) error { return nil }

	b.call(ctx, failing)
	b.call(ctx, failing) // opens
	b.call(ctx, ok)      // rejected
	clock.advance(10 * time.Second)
	b.state() // half-opens
	b.state()
	b.call(ctx, failing) // reopens
	clock.advance(10 * time.Second)
	b.call(ctx, ok) // half-opens and closes
	b.call(ctx, ok)

	want := []string{"closed->open", "open->half-open", "half-open->open", "open->half-open", "half-open->closed"}
	if !slices.Equal(got, want) {
		t.Errorf("onTransition calls = %v, want %v", got, want)
	}
	var logged []string
	sc := bufio.NewScanner(&logs)
	for sc.Scan() {
		var line struct{ Level, Msg, From, To string }
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		logged = append(logged, line.From+"->"+line.To)
		if wantLevel := map[bool]string{true: "WARN", false: "INFO"}[line.To == "open"]; line.Level != wantLevel {
			t.Errorf("log level of %s->%s = %s, want %s", line.From, line.To, line.Level, wantLevel)
		}
	}
	if !slices.Equal(logged, want) {
		t.Errorf("logged transitions = %v, want %v", logged, want)
	}
}

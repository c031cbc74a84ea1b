package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const (
	okBody      = `{"external":"ok","value":134}` + "\n"
	failureBody = `{"fallback":true,"reason":"external service failure"}` + "\n"
	openBody    = `{"fallback":true,"reason":"circuit open"}` + "\n"
)

// externalFront is GET /external served over a real connection, in front
// of a breaker on a step clock.
type externalFront struct {
	*httptest.Server
	clock   *fakeClock
	breaker *breaker
	// served gets a value each time the handler returns, which for a
	// client that went away is the only sign its call is over.
	served chan struct{}
}

// newExternalFront serves GET /external through a breaker made from s, on
// the front's step clock with a 10s reset timeout.
func newExternalFront(t *testing.T, s breakerSettings, svc externalService, timeout time.Duration) *externalFront {
	t.Helper()
	f := &externalFront{clock: newFakeClock(testEpoch), served: make(chan struct{}, 200)}
	s.now = f.clock.now
	s.resetTimeout = 10 * time.Second
	f.breaker = newBreaker(s)
	h := handleExternal(slog.New(slog.DiscardHandler), f.breaker, svc, timeout)
	mux := http.NewServeMux()
	mux.Handle("GET /external", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(w, r)
		f.served <- struct{}{}
	}))
	f.Server = httptest.NewServer(mux)
	t.Cleanup(f.Close)
	// A hanging handler fails the test instead of stalling it.
	f.Client().Timeout = 5 * time.Second
	return f
}

// get fetches /external and returns its body and X-Circuit-State once the
// handler has returned. It reports problems with t.Errorf, so that it can
// run on any goroutine.
func (f *externalFront) get(t *testing.T) (body, circuit string) {
	t.Helper()
	resp, err := f.Client().Get(f.URL + "/external")
	if err != nil {
		t.Errorf("GET /external: %v", err)
		return "", ""
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Errorf("GET /external: reading body: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /external status = %d, want 200", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("GET /external Content-Type = %q, want application/json", ct)
	}
	f.waitServed(t)
	return string(b), resp.Header.Get("X-Circuit-State")
}

func (f *externalFront) waitServed(t *testing.T) {
	t.Helper()
	select {
	case <-f.served:
	case <-time.After(5 * time.Second):
		t.Error("handler did not return within 5s")
	}
}

// newUpstream starts a real HTTP server for the external service. A handler
// that blocks must also stop at t.Context().Done(), which comes before the
// server's Close waits for it.
func newUpstream(t *testing.T, h http.HandlerFunc) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

func TestExternalHandlerTransitions(t *testing.T) {
	var healthy atomic.Bool
	var calls atomic.Int64
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if !healthy.Load() {
			http.Error(w, "down", http.StatusInternalServerError)
			return
		}
		io.WriteString(w, `{"value":134}`)
	})
	var mu sync.Mutex
	var transitions []string
	record := func(from, to state) {
		mu.Lock()
		defer mu.Unlock()
		transitions = append(transitions, from.String()+"->"+to.String())
	}
	f := newExternalFront(t, breakerSettings{threshold: 2, onTransition: record}, newHTTPService(up.URL, time.Minute), 5*time.Second)

	steps := []struct {
		advance   time.Duration
		healthy   bool
		wantBody  string
		wantState string
		wantCalls int64 // upstream requests so far
	}{
		{0, false, failureBody, "closed", 1},
		{0, false, failureBody, "open", 2},
		{0, true, openBody, "open", 2},
		{10*time.Second - time.Nanosecond, true, openBody, "open", 2},
		{time.Nanosecond, false, failureBody, "open", 3}, // the trial fails
		{5 * time.Second, true, openBody, "open", 3},
		{5 * time.Second, true, okBody, "closed", 4}, // the trial succeeds
		{0, true, okBody, "closed", 5},
		{0, false, failureBody, "closed", 6},
	}
	for i, s := range steps {
		f.clock.advance(s.advance)
		healthy.Store(s.healthy)
		body, circuit := f.get(t)
		if body != s.wantBody || circuit != s.wantState {
			t.Errorf("step %d: GET /external = %q, X-Circuit-State %q; want %q, %q", i, body, circuit, s.wantBody, s.wantState)
		}
		if got := calls.Load(); got != s.wantCalls {
			t.Errorf("step %d: upstream requests = %d, want %d", i, got, s.wantCalls)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	want := "closed->open open->half-open half-open->open open->half-open half-open->closed"
	if got := strings.Join(transitions, " "); got != want {
		t.Errorf("transitions = %s, want %s", got, want)
	}
}

func TestExternalHalfOpenAdmitsOneCall(t *testing.T) {
	const callers = 100
	var calls atomic.Int64
	release := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			select {
			case <-release:
			case <-t.Context().Done():
			}
		}
		io.WriteString(w, `{"value":134}`)
	})
	f := newExternalFront(t, breakerSettings{threshold: 1}, newHTTPService(up.URL, time.Minute), time.Minute)
	f.breaker.call(context.Background(), func(context.Context) error { return errBoom })
	f.clock.advance(10 * time.Second)

	type answer struct {
		body, circuit string
		err           error
	}
	answers := make(chan answer, callers)
	client := f.Client()
	for range callers {
		go func() {
			resp, err := client.Get(f.URL + "/external")
			if err != nil {
				answers <- answer{err: err}
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			answers <- answer{string(b), resp.Header.Get("X-Circuit-State"), err}
		}()
	}
	receive := func() answer {
		select {
		case a := <-answers:
			return a
		case <-time.After(10 * time.Second):
			t.Fatal("no answer within 10s")
			return answer{}
		}
	}
	// The trial holds its answer until every other caller has had one.
	for i := range callers - 1 {
		a := receive()
		if a.err != nil || a.body != openBody || a.circuit != "half-open" {
			t.Fatalf("answer %d during the trial = %q, X-Circuit-State %q, error %v; want %q, %q",
				i, a.body, a.circuit, a.err, openBody, "half-open")
		}
	}
	close(release)
	if a := receive(); a.err != nil || a.body != okBody || a.circuit != "closed" {
		t.Fatalf("trial answer = %q, X-Circuit-State %q, error %v; want %q, %q", a.body, a.circuit, a.err, okBody, "closed")
	}
	if got := calls.Load(); got != 1 {
		t.Errorf("upstream requests = %d, want 1", got)
	}
}

func TestExternalClosedCallsRunConcurrently(t *testing.T) {
	const callers = 10
	// Each request waits until all of them are in flight, which they can
	// only be if the breaker does not serialize calls; safety ends the wait
	// if they never are, and the test then fails on the count.
	safety, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	var inFlight, maxInFlight atomic.Int64
	allIn := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			m := maxInFlight.Load()
			if n <= m || maxInFlight.CompareAndSwap(m, n) {
				break
			}
		}
		if n == callers {
			close(allIn)
		}
		select {
		case <-allIn:
		case <-safety.Done():
		}
		io.WriteString(w, `{"value":134}`)
	})
	f := newExternalFront(t, breakerSettings{threshold: 3}, newHTTPService(up.URL, time.Minute), time.Minute)

	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			if body, circuit := f.get(t); body != okBody || circuit != "closed" {
				t.Errorf("GET /external = %q, X-Circuit-State %q; want %q, %q", body, circuit, okBody, "closed")
			}
		})
	}
	wg.Wait()
	if got := maxInFlight.Load(); got != callers {
		t.Errorf("most upstream requests in flight at once = %d, want %d", got, callers)
	}
}

func TestExternalTimeoutIsFailure(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-t.Context().Done():
		}
	})
	// The client's own backstop is far off, so the handler's timeout is
	// what ends the call.
	f := newExternalFront(t, breakerSettings{threshold: 1}, newHTTPService(up.URL, time.Minute), 50*time.Millisecond)
	if body, circuit := f.get(t); body != failureBody || circuit != "open" {
		t.Errorf("GET /external with a hanging upstream = %q, X-Circuit-State %q; want %q, %q", body, circuit, failureBody, "open")
	}
}

func TestExternalClientGoneCountsForNothing(t *testing.T) {
	var hang, healthy atomic.Bool
	var calls atomic.Int64
	arrived := make(chan struct{}, 1)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if hang.Load() {
			arrived <- struct{}{}
			select {
			case <-r.Context().Done():
			case <-t.Context().Done():
			}
			return
		}
		if !healthy.Load() {
			http.Error(w, "down", http.StatusBadGateway)
			return
		}
		io.WriteString(w, `{"value":134}`)
	})
	// leave makes a request and goes away while the upstream holds it.
	leave := func(t *testing.T, f *externalFront) {
		t.Helper()
		hang.Store(true)
		defer hang.Store(false)
		ctx, cancel := context.WithCancel(context.Background())
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.URL+"/external", nil)
		if err != nil {
			t.Fatal(err)
		}
		errc := make(chan error, 1)
		go func() {
			resp, err := f.Client().Do(req)
			if err == nil {
				resp.Body.Close()
			}
			errc <- err
		}()
		select {
		case <-arrived:
		case <-time.After(5 * time.Second):
			t.Fatal("upstream saw no request within 5s")
		}
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("abandoned GET /external error = %v, want %v", err, context.Canceled)
		}
		f.waitServed(t)
	}

	t.Run("closed", func(t *testing.T) {
		healthy.Store(false)
		f := newExternalFront(t, breakerSettings{threshold: 2}, newHTTPService(up.URL, time.Minute), time.Minute)
		if body, circuit := f.get(t); body != failureBody || circuit != "closed" {
			t.Fatalf("first failure: GET /external = %q, %q; want %q, %q", body, circuit, failureBody, "closed")
		}
		leave(t, f)
		// Counted as a failure, it would have opened the breaker.
		if got := f.breaker.state(); got != stateClosed {
			t.Fatalf("state() after a client went away = %v, want %v", got, stateClosed)
		}
		// Counted as a success, it would have reset the count.
		if body, circuit := f.get(t); body != failureBody || circuit != "open" {
			t.Fatalf("second failure: GET /external = %q, %q; want %q, %q", body, circuit, failureBody, "open")
		}
	})

	t.Run("half-open", func(t *testing.T) {
		healthy.Store(false)
		f := newExternalFront(t, breakerSettings{threshold: 1}, newHTTPService(up.URL, time.Minute), time.Minute)
		if _, circuit := f.get(t); circuit != "open" {
			t.Fatalf("X-Circuit-State after a failure = %q, want open", circuit)
		}
		f.clock.advance(10 * time.Second)
		leave(t, f)
		if got := f.breaker.state(); got != stateHalfOpen {
			t.Fatalf("state() after the trial's client went away = %v, want %v", got, stateHalfOpen)
		}
		healthy.Store(true)
		before := calls.Load()
		if body, circuit := f.get(t); body != okBody || circuit != "closed" {
			t.Fatalf("next trial: GET /external = %q, %q; want %q, %q", body, circuit, okBody, "closed")
		}
		if got := calls.Load() - before; got != 1 {
			t.Errorf("upstream requests for the next trial = %d, want 1", got)
		}
	})
}

func TestHTTPServiceFetch(t *testing.T) {
	tests := []struct {
		status  int
		body    string
		want    float64
		wantErr bool
	}{
		{200, `{"value":134}`, 134, false},
		{200, `{"value":12.5,"unit":"ms"}`, 12.5, false},
		{200, ` {"value": -3e2} `, -300, false},
		{201, `{"value":1}`, 1, false},
		{200, `{"value":"134"}`, 0, true},
		{200, `{"value":null}`, 0, true},
		{200, `{"other":1}`, 0, true},
		{200, `[134]`, 0, true},
		{200, `not json`, 0, true},
		{200, `{"value":134} trailing`, 0, true},
		{200, `{"value":1,"pad":"` + strings.Repeat("x", maxExternalBody) + `"}`, 0, true},
		{204, ``, 0, true},
		{302, `{"value":134}`, 0, true},
		{404, `{"value":134}`, 0, true},
		{500, `{"value":134}`, 0, true},
		{503, ``, 0, true},
	}
	for _, tt := range tests {
		up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodGet || r.Header.Get("Accept") != "application/json" {
				t.Errorf("upstream request = %s with Accept %q, want GET with Accept application/json", r.Method, r.Header.Get("Accept"))
			}
			w.WriteHeader(tt.status)
			io.WriteString(w, tt.body)
		})
		got, err := newHTTPService(up.URL, 5*time.Second).fetch(t.Context())
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("fetch() from %d %.40q = %v, %v; want %v, error %v", tt.status, tt.body, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestHTTPServiceUnreachable(t *testing.T) {
	up := httptest.NewServer(http.NotFoundHandler())
	url := up.URL
	up.Close()
	if _, err := newHTTPService(url, 5*time.Second).fetch(t.Context()); err == nil {
		t.Errorf("fetch() from a closed server: error = nil, want one")
	}
}

// draws returns a rand function that yields vs in turn.
func draws(t *testing.T, vs ...float64) func() float64 {
	return func() float64 {
		if len(vs) == 0 {
			t.Fatal("rand called more often than expected")
		}
		v := vs[0]
		vs = vs[1:]
		return v
	}
}

func TestSimulatedService(t *testing.T) {
	justBelowOne := math.Nextafter(1, 0)
	tests := []struct {
		failureRate float64
		draws       []float64
		want        float64
		wantErr     error
	}{
		{0.2, []float64{0.1}, 0, errSimulatedFailure},
		{0.2, []float64{0.19999}, 0, errSimulatedFailure},
		{0.2, []float64{0.2, 0}, 100, nil},
		{0.2, []float64{0.5, 0.3}, 130, nil},
		{0.2, []float64{0.9, 0.5}, 150, nil},
		{0.2, []float64{0.9, justBelowOne}, 200, nil},
		{0, []float64{0, 0.999}, 200, nil},
		{1, []float64{justBelowOne}, 0, errSimulatedFailure},
	}
	for _, tt := range tests {
		s := &simulatedService{failureRate: tt.failureRate, rand: draws(t, tt.draws...)}
		got, err := s.fetch(t.Context())
		if got != tt.want || err != tt.wantErr {
			t.Errorf("fetch() with failure rate %v and draws %v = %v, %v; want %v, %v", tt.failureRate, tt.draws, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestSimulatedServiceDistribution(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	s := &simulatedService{failureRate: 0.25, rand: r.Float64}
	const n = 10000
	failures := 0
	seen := map[float64]bool{}
	for range n {
		v, err := s.fetch(t.Context())
		if err != nil {
			failures++
			continue
		}
		if v != math.Trunc(v) || v < 100 || v > 200 {
			t.Fatalf("fetch() = %v, want a whole number from 100 to 200", v)
		}
		seen[v] = true
	}
	if rate := float64(failures) / n; rate < 0.22 || rate > 0.28 {
		t.Errorf("failure rate over %d calls = %.3f, want about 0.25", n, rate)
	}
	if len(seen) != 101 {
		t.Errorf("distinct values over %d calls = %d, want all 101 from 100 to 200", n, len(seen))
	}
}

func TestSimulatedServiceLatencyHonoursContext(t *testing.T) {
	s := &simulatedService{latency: time.Hour, rand: func() float64 { return 0.5 }}
	for _, wantErr := range []error{context.Canceled, context.DeadlineExceeded} {
		t.Run(fmt.Sprint(wantErr), func(t *testing.T) {
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			if wantErr == context.DeadlineExceeded {
				ctx, cancel = context.WithDeadline(ctx, time.Now())
				defer cancel()
			}
			errc := make(chan error, 1)
			go func() {
				_, err := s.fetch(ctx)
				errc <- err
			}()
			cancel()
			select {
			case err := <-errc:
				if err != wantErr {
					t.Errorf("fetch() with %v context error = %v, want %v", wantErr, err, wantErr)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("fetch() still sleeping 5s after its context ended")
			}
		})
	}
}

func TestSimulatedServiceLatency(t *testing.T) {
	// A latency just long enough to observe: the call must not return early.
	s := &simulatedService{latency: 20 * time.Millisecond, rand: func() float64 { return 0.5 }}
	start := time.Now()
	if _, err := s.fetch(t.Context()); err != nil {
		t.Fatalf("fetch() error = %v", err)
	}
	if got := time.Since(start); got < 20*time.Millisecond {
		t.Errorf("fetch() took %v, want at least the 20ms latency", got)
	}
}

func TestNewExternalService(t *testing.T) {
	sim, ok := newExternalService(config{ExternalFailureRate: 0.3, ExternalLatency: time.Second}).(*simulatedService)
	if !ok || sim.failureRate != 0.3 || sim.latency != time.Second || sim.rand == nil {
		t.Errorf("newExternalService(no EXTERNAL_URL) = %#v, want the simulated service with rate 0.3, latency 1s", sim)
	}
	remote, ok := newExternalService(config{ExternalURL: "http://upstream.example/v", ExternalTimeout: time.Second}).(*httpService)
	if !ok || remote.url != "http://upstream.example/v" || remote.client == http.DefaultClient || remote.client.Timeout != time.Second {
		t.Errorf("newExternalService(EXTERNAL_URL set) = %#v, want the HTTP service for that URL with its own client", remote)
	}
}

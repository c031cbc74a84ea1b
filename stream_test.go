package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// liveServe is serve with the backend's background work running (the hub,
// and for Redis the subscriber, subscribed before it returns), as run
// starts it. configure may set the server's timeouts or listener.
func liveServe(t testing.TB, e storeEnv, b backend, configure func(*httptest.Server)) string {
	t.Helper()
	stop := startUpkeep(context.Background(), e.cfg, b, discardLogger())
	srv := httptest.NewUnstartedServer(newHandler(discardLogger(), e.cfg, newTelemetry(), b))
	srv.Config.RegisterOnShutdown(b.hub.shutdown)
	if configure != nil {
		configure(srv)
	}
	srv.Start()
	t.Cleanup(func() {
		b.hub.shutdown()
		srv.Close()
		stop()
	})
	if b.listen != nil {
		subscribers(t, e, 1)
	}
	return srv.URL
}

// subscribers waits until at least n subscribers listen on e's stream
// channel, as Redis counts them (on a cluster, each node its own).
func subscribers(t testing.TB, e storeEnv, n int) {
	t.Helper()
	addrs := []string{e.cfg.RedisAddr}
	if len(e.cfg.RedisCluster) > 0 {
		addrs = e.cfg.RedisCluster
	}
	var conns []redis.Conn
	for _, addr := range addrs {
		c, err := redis.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	channel := keys{prefix: e.prefix}.streamChannel()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) { // polling Redis for a state
		got := 0
		var err error
		for _, c := range conns {
			var v []any
			v, err = redis.Values(c.Do("PUBSUB", "NUMSUB", channel))
			if err == nil && len(v) == 2 {
				k, _ := redis.Int(v[1], nil)
				got += k
			}
		}
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("fewer than %d subscribers on %s after 5s (%v)", n, channel, err)
		}
	}
}

// sseEvent is one event a stream sent: its name and data. A block with
// only a retry field reads as the event "retry" with the value as data; a
// comment as the event ":" with the comment.
type sseEvent struct{ name, data string }

// eventStream is an open stream whose events a goroutine collects.
type eventStream struct {
	res    *http.Response
	events chan sseEvent // closed when the stream ends
	cancel context.CancelFunc
}

// openStream opens url (a stream) and returns it once its hello event
// has arrived, which means the hub has the client.
func openStream(t testing.TB, url string) *eventStream {
	t.Helper()
	s, err := tryStream(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.close)
	if e := s.next(t, 2*time.Second); e.name != "retry" || e.data != "3000" {
		t.Fatalf("first block = %+v, want retry 3000", e)
	}
	if e := s.next(t, 2*time.Second); e.name != "hello" || !strings.Contains(e.data, `"instance":"`) {
		t.Fatalf("second event = %+v, want hello naming the instance", e)
	}
	return s
}

func tryStream(url string) (*eventStream, error) {
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		return nil, err
	}
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "text/event-stream" || res.Header.Get("Cache-Control") != "no-cache" {
		res.Body.Close()
		cancel()
		return nil, fmt.Errorf("GET %s = %d %s (Cache-Control %q), want 200 text/event-stream no-cache", url, res.StatusCode,
			res.Header.Get("Content-Type"), res.Header.Get("Cache-Control"))
	}
	s := &eventStream{res: res, events: make(chan sseEvent, 100_000), cancel: cancel}
	go func() {
		defer close(s.events)
		sc := bufio.NewScanner(res.Body)
		sc.Buffer(nil, 1<<20)
		var e sseEvent
		retry := ""
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if e.name != "" || e.data != "" {
					s.events <- e
				} else if retry != "" {
					s.events <- sseEvent{"retry", retry}
				}
				e, retry = sseEvent{}, ""
			case strings.HasPrefix(line, ":"):
				s.events <- sseEvent{":", strings.TrimSpace(line[1:])}
			case strings.HasPrefix(line, "event: "):
				e.name = line[len("event: "):]
			case strings.HasPrefix(line, "data: "):
				e.data += line[len("data: "):]
			case strings.HasPrefix(line, "retry: "):
				retry = line[len("retry: "):]
			}
		}
	}()
	return s, nil
}

func (s *eventStream) close() {
	s.cancel()
	s.res.Body.Close()
}

// next is the next event other than a ping, failing the test when none
// comes within d.
func (s *eventStream) next(t testing.TB, d time.Duration) sseEvent {
	t.Helper()
	timeout := time.After(d)
	for {
		select {
		case e, ok := <-s.events:
			if !ok {
				t.Fatal("the stream ended")
			}
			if e.name != ":" {
				return e
			}
		case <-timeout:
			t.Fatalf("no event within %s", d)
		}
	}
}

type metricEventBody struct {
	Type   string            `json:"type"`
	Labels map[string]string `json:"labels"`
	Points []struct {
		Time  string  `json:"time"`
		Count int64   `json:"count"`
		Sum   float64 `json:"sum"`
		Min   float64 `json:"min"`
		Max   float64 `json:"max"`
	} `json:"points"`
}

// totals adds metric events' points up, per type, label host and second.
type totals map[string]*stats

func (tt totals) add(t testing.TB, e sseEvent) {
	t.Helper()
	if e.name != "metric" {
		t.Fatalf("event %+v, want a metric event", e)
	}
	var m metricEventBody
	if err := json.Unmarshal([]byte(e.data), &m); err != nil {
		t.Fatalf("metric event data %q: %v", e.data, err)
	}
	if len(m.Points) == 0 || len(m.Points) > maxEventPoints {
		t.Fatalf("metric event with %d points: %s", len(m.Points), e.data)
	}
	for _, p := range m.Points {
		k := m.Type + "|" + m.Labels["host"] + "|" + p.Time
		if tt[k] == nil {
			tt[k] = &stats{}
		}
		tt[k].merge(stats{p.Count, p.Sum, p.Min, p.Max})
	}
}

// want is the totals of samples given as (type, host, time, value).
func wantTotals(samples []sample) totals {
	tt := totals{}
	for _, s := range samples {
		host := ""
		if s.series != "" {
			l, _ := parseSeriesID(s.series)
			host = l[0].value
		}
		k := s.typ + "|" + host + "|" + formatTime(s.second())
		if tt[k] == nil {
			tt[k] = &stats{}
		}
		tt[k].add(s.value)
	}
	return tt
}

func (tt totals) count() int64 {
	n := int64(0)
	for _, s := range tt {
		n += s.count
	}
	return n
}

func (tt totals) String() string {
	var out []string
	for _, k := range slices.Sorted(maps.Keys(tt)) {
		out = append(out, fmt.Sprintf("%s=%+v", k, *tt[k]))
	}
	return strings.Join(out, " ")
}

// collect reads metric events into a totals until it equals want, failing
// when it does not within d. It returns how many events it read.
func (s *eventStream) collect(t testing.TB, want totals, d time.Duration) int {
	t.Helper()
	got := totals{}
	deadline := time.Now().Add(d)
	n := 0
	// Compared in full only when the counts add up: a wide batch is
	// hundreds of events.
	wantCount := want.count()
	for got.count() != wantCount || got.String() != want.String() {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("after %s, events add up to\n%s\nwant\n%s", d, got, want)
		}
		select {
		case e, ok := <-s.events:
			if !ok {
				t.Fatal("the stream ended")
			}
			if e.name == ":" {
				continue
			}
			got.add(t, e)
			n++
		case <-time.After(left):
		}
	}
	return n
}

func postSamples(t testing.TB, base string, samples []sample) {
	t.Helper()
	var items []string
	for _, s := range samples {
		items = append(items, metricJSON(s))
	}
	if r := post(t, base, "["+strings.Join(items, ",")+"]"); r.status != 201 {
		t.Fatalf("POST = %d %s", r.status, r.body)
	}
}

func hostSample(typ, host string, at time.Time, v float64) sample {
	id := ""
	if host != "" {
		id = seriesID([]label{{"host", host}})
	}
	return sample{typ: typ, series: id, at: at.UnixMicro(), value: v}
}

func TestStreamSendsWhatAnIngestAdded(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := liveServe(t, e, e.b, nil)
		s := openStream(t, base+"/api/metrics/stream")
		now := e.clock.now().Truncate(time.Second)
		batch := []sample{
			hostSample("cpu", "web-1", now.Add(-2*time.Second), 10),
			hostSample("cpu", "web-1", now.Add(-2*time.Second+300*time.Millisecond), 30),
			hostSample("cpu", "web-1", now.Add(-time.Second), -5.5),
			hostSample("cpu", "", now.Add(-time.Second), 1e300),
			hostSample("mem", "web-2", now, 0),
		}
		start := time.Now()
		postSamples(t, base, batch)
		s.collect(t, wantTotals(batch), time.Second)
		t.Logf("%s: events added up %s after the POST began", e.name, time.Since(start).Round(time.Millisecond))

		// One event per series: its labels as an object, its points by
		// second.
		postSamples(t, base, batch[:3])
		ev := s.next(t, time.Second)
		var m metricEventBody
		json.Unmarshal([]byte(ev.data), &m)
		if m.Type != "cpu" || len(m.Labels) != 1 || m.Labels["host"] != "web-1" || len(m.Points) != 2 ||
			m.Points[0].Time != formatTime(now.Unix()-2) || m.Points[0].Count != 2 || m.Points[0].Sum != 40 || m.Points[1].Min != -5.5 {
			t.Errorf("event = %s, want cpu {host: web-1} with 2 points, the first of 2 samples summing to 40", ev.data)
		}
	})
}

func TestStreamFiltersTypes(t *testing.T) {
	cfg := testConfig(t)
	e := storeEnv{name: "memory", cfg: cfg, clock: newFakeClock(storeEpoch)}
	b := newMemoryBackend(cfg, e.clock.now)
	base := liveServe(t, e, b, nil)
	s := openStream(t, base+"/api/metrics/stream?metric_type=mem&metric_type=disk")
	now := e.clock.now()
	cpu, mem := []sample{hostSample("cpu", "a", now, 1)}, []sample{hostSample("mem", "a", now, 2)}
	postSamples(t, base, cpu)
	postSamples(t, base, mem)
	s.collect(t, wantTotals(mem), time.Second)

	head := send(t, "HEAD", base+"/api/metrics/stream", "", "")
	if head.status != 200 || head.header.Get("Content-Type") != "text/event-stream" {
		t.Errorf("HEAD of the stream = %d %s, want 200 text/event-stream, answered at once", head.status, head.header.Get("Content-Type"))
	}
	waitFor(t, func() bool { return b.hub.open.Load() == 1 }, "a HEAD holds no stream open")
	r := get(t, base+"/api/metrics/stream?metric_type=cpu&metric_type=bad%20type")
	if r.status != 422 || !strings.Contains(r.json(t)["detail"].(string), "metric_type") {
		t.Errorf("a stream of an invalid type = %d %s, want 422 naming metric_type", r.status, r.body)
	}
}

func TestStreamAcrossInstances(t *testing.T) {
	e := redisStoreEnv(t, nil)
	a := liveServe(t, e, e.b, nil)
	b := liveServe(t, e, e.reopen(), nil)
	subscribers(t, e, 2)
	onB := openStream(t, b+"/api/metrics/stream")
	onA := openStream(t, a+"/api/metrics/stream")
	// What others publish on the channel is ignored, whatever it holds.
	c, err := redis.Dial("tcp", e.cfg.RedisAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, junk := range []string{"junk", "", "P\tg\t\t1764590000 1 NaN 1 1", "P\tg\t\t1764590000 1 1 Inf 1\n"} {
		if _, err := c.Do("PUBLISH", keys{prefix: e.prefix}.streamChannel(), junk); err != nil {
			t.Fatal(err)
		}
	}
	batch := []sample{hostSample("cpu", "web-1", e.clock.now(), 42)}
	postSamples(t, a, batch)
	onB.collect(t, wantTotals(batch), time.Second)
	onA.collect(t, wantTotals(batch), time.Second)
}

func TestStreamMergesABurst(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := liveServe(t, e, e.b, nil)
		s := openStream(t, base+"/api/metrics/stream")
		now := e.clock.now().Truncate(time.Second)
		var all []sample
		var wg sync.WaitGroup
		errs := make(chan error, 1000)
		for w := range 4 {
			wg.Go(func() {
				for i := range 250 {
					v := float64(w*250 + i)
					smp := hostSample("burst", fmt.Sprint("h", w%2), now.Add(-time.Duration(i%3)*time.Second), v)
					r, err := tryPost(base, metricJSON(smp))
					if err == nil && r.status != 201 {
						err = fmt.Errorf("POST = %d %s", r.status, r.body)
					}
					if err != nil {
						errs <- err
					}
				}
			})
			for i := range 250 {
				all = append(all, hostSample("burst", fmt.Sprint("h", w%2), now.Add(-time.Duration(i%3)*time.Second), float64(w*250+i)))
			}
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		n := s.collect(t, wantTotals(all), 2*time.Second)
		if n >= 1000 {
			t.Errorf("1,000 POSTs came as %d events, want them merged into fewer", n)
		}
		t.Logf("%s: 1,000 POSTs, %d events", e.name, n)
	})
}

// metricJSON is one sample as the JSON a client posts.
func metricJSON(s sample) string {
	at := time.UnixMicro(s.at)
	if s.series == "" {
		return metricBody(s.typ, at, s.value)
	}
	l, _ := parseSeriesID(s.series)
	return hostBody(s.typ, l[0].value, at, s.value)
}

// smallBuffers makes the server's socket of the first connection buffer
// little, so that a client that connects first and does not read blocks
// the server's writes soon. Other connections keep the usual buffers:
// small ones would slow a client that reads.
func smallBuffers(srv *httptest.Server) {
	srv.Listener = &smallBufferListener{Listener: srv.Listener}
}

type smallBufferListener struct {
	net.Listener
	once sync.Once
}

func (l *smallBufferListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		l.once.Do(func() { tc.SetWriteBuffer(4096) })
	}
	return c, err
}

func TestStreamStalledClient(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		// Long enough for the rounds below to pass the pending bound first,
		// also on a machine short of CPU.
		e.b.hub.writeTimeout = 6 * time.Second
		base := liveServe(t, e, e.b, smallBuffers)
		stalled(t, base)
		reader := openStream(t, base+"/api/metrics/stream")
		waitFor(t, func() bool { return e.b.hub.open.Load() == 2 }, "both streams open")

		// Wide ingests, each an event per series, while the stalled
		// client's write is blocked: what it has not been sent piles up
		// past the bound and it is resynced; then its write times out
		// and it is closed. Every ingest still reaches the client that
		// reads at once, and no POST waits for the stalled one.
		resynced := false
		for round := 0; e.b.hub.open.Load() > 1; round++ {
			if round == 300 {
				t.Fatalf("after 300 ingests the stalled stream is still open (dropped %d)", e.b.hub.dropped.Load())
			}
			resynced = resynced || e.b.hub.dropped.Load() == 1 && e.b.hub.open.Load() == 2
			start := time.Now()
			batch := wideBatch(e.clock.now(), round)
			postSamples(t, base, batch)
			if d := time.Since(start); d > time.Second {
				t.Errorf("round %d: POST took %s", round, d)
			}
			reader.collect(t, wantTotals(batch), time.Second)
		}
		if !resynced {
			t.Error("the stalled client was closed without being resynced first")
		}
		m := get(t, base+"/metrics").body
		// Resynced, then closed: one client dropped, counted once.
		if !strings.Contains(m, "\nstream_clients 1\n") || !strings.Contains(m, "\nstream_dropped_total 1\n") {
			t.Errorf("/metrics after the stalled stream was dropped:\n%s", grepLines(m, "stream_"))
		}
	})
}

// stalled opens a stream that never reads a byte, with a receive buffer
// as small as the kernel allows.
func stalled(t testing.TB, base string) {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 1024) })
	}}
	raw, err := d.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	fmt.Fprintf(raw, "GET /api/metrics/stream HTTP/1.1\r\nHost: x\r\n\r\n")
}

// wideBatch is one sample of each of 500 series with long labels, an
// event apiece, about 100 KB of them, in a second of the round's own (for
// 50 rounds), so what a client has not been sent grows by 500 points a
// round rather than merging into the same ones.
func wideBatch(now time.Time, round int) []sample {
	var batch []sample
	at := now.Add(-time.Duration(round%50) * time.Second)
	for h := range 500 {
		batch = append(batch, hostSample("wide", fmt.Sprintf("host-%03d-%s", h, strings.Repeat("x", 60)), at, float64(round)))
	}
	return batch
}

// waitFor polls cond until it holds, failing after 5 s.
func waitFor(t testing.TB, cond func() bool, what string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(2 * time.Millisecond) { // polling a state
		if time.Now().After(deadline) {
			t.Fatalf("not within 5s: %s", what)
		}
	}
}

func grepLines(text, substr string) string {
	var out []string
	for l := range strings.Lines(text) {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "")
}

func TestStreamPendingIsBounded(t *testing.T) {
	h := newHub(10)
	c, _ := h.join(nil)
	for i := range 500 {
		p := newPending()
		for s := range 100 {
			p.add("cpu", fmt.Sprint(i*100+s), []point{{sec: int64(i), stats: stats{1, 1, 1, 1}}}, maxFramePoints)
		}
		if c.hand(&frame{p: p, events: p.events()}) {
			h.dropped.Add(1)
		}
		c.mu.Lock()
		held := 0
		if c.own != nil {
			held = c.own.points
		}
		c.mu.Unlock()
		if held > maxPendingPoints {
			t.Fatalf("after %d frames the client holds %d points, over %d", i+1, held, maxPendingPoints)
		}
	}
	if h.dropped.Load() != 1 {
		t.Errorf("dropped = %d, want 1", h.dropped.Load())
	}
	if text := string(bytes.Join(c.take(), nil)); text != "event: resync\ndata: {\"reason\":\"slow client\"}\n\n" {
		t.Errorf("the slow client is sent %q, want one resync of everything", text)
	}
	if text := c.take(); len(text) != 0 {
		t.Errorf("then %q, want nothing", text)
	}
}

func TestStreamLargeIngestResyncs(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := liveServe(t, e, e.b, nil)
		s := openStream(t, base+"/api/metrics/stream")
		now := e.clock.now()
		var batch []sample
		for i := range maxEventPoints + 1 {
			batch = append(batch, hostSample("big", "a", now.Add(-time.Duration(i)*time.Second), 1))
		}
		postSamples(t, base, batch)
		if ev := s.next(t, time.Second); ev.name != "resync" || ev.data != `{"type":"big","reason":"large update"}` {
			t.Errorf("after an ingest of %d seconds of one series: %+v, want a resync of its type", len(batch), ev)
		}
		// A backfill, older than 1 s buckets are kept, is a resync too.
		postSamples(t, base, []sample{hostSample("old", "", now.Add(-2*time.Hour), 1)})
		if ev := s.next(t, time.Second); ev.name != "resync" || !strings.Contains(ev.data, `"type":"old"`) {
			t.Errorf("after a backfill: %+v, want a resync of its type", ev)
		}
	})
}

func TestStreamOutlivesWriteTimeout(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		e.b.hub.pingEvery = 50 * time.Millisecond
		base := liveServe(t, e, e.b, func(srv *httptest.Server) {
			srv.Config.WriteTimeout = 200 * time.Millisecond
			srv.Config.ReadTimeout = 200 * time.Millisecond
		})
		s := openStream(t, base+"/api/metrics/stream")
		pings := 0
		for end := time.After(700 * time.Millisecond); pings >= 0; {
			select {
			case ev, ok := <-s.events:
				if !ok {
					t.Fatalf("the stream ended after %d pings", pings)
				}
				if ev.name == ":" && ev.data == "ping" {
					pings++
				}
			case <-end:
				if pings < 5 {
					t.Errorf("%d pings in 700ms at one per 50ms", pings)
				}
				pings = -1
			}
		}
		batch := []sample{hostSample("late", "", e.clock.now(), 7)}
		postSamples(t, base, batch)
		s.collect(t, wantTotals(batch), time.Second)
	})
}

func TestStreamShutdown(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, done := startRun(t, ctx, map[string]string{"ADDR": "127.0.0.1:0"})
	var streams []*eventStream
	for range 50 {
		streams = append(streams, openStream(t, "http://"+addr+"/api/metrics/stream"))
	}
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("run did not return within 5s of the signal with 50 streams open")
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("shutdown with 50 streams took %s, want under 1s", d)
	}
	for i, s := range streams {
		for ev := range s.events {
			if ev.name != ":" {
				t.Errorf("stream %d: %+v after shutdown", i, ev)
			}
		}
	}
}

// TestStreamShutdownWithStalledClient: a stream whose client stopped
// reading, its write blocked on full buffers, does not hold up shutdown.
func TestStreamShutdownWithStalledClient(t *testing.T) {
	cfg := testConfig(t)
	e := storeEnv{name: "memory", cfg: cfg, clock: newFakeClock(storeEpoch)}
	b := newMemoryBackend(cfg, e.clock.now)
	var srv *httptest.Server
	base := liveServe(t, e, b, func(s *httptest.Server) {
		smallBuffers(s)
		srv = s
	})
	stalled(t, base)
	waitFor(t, func() bool { return b.hub.open.Load() == 1 }, "the stream is open")
	// Until the stream is resynced for being slow, which shows its write
	// is blocked.
	for round := 0; b.hub.dropped.Load() == 0; round++ {
		if round == 100 {
			t.Fatal("after 100 ingests the stalled stream was not resynced")
		}
		postSamples(t, base, wideBatch(e.clock.now(), round))
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Config.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("shutdown with a stalled stream took %s, want under 1s", d)
	}
	if n := b.hub.dropped.Load(); n != 1 {
		t.Errorf("stream_dropped_total = %d after shutdown, want 1: closing at shutdown is not being slow", n)
	}
}

func TestMaxStreams(t *testing.T) {
	cfg := testConfig(t)
	cfg.MaxStreams = 2
	e := storeEnv{name: "memory", cfg: cfg, clock: newFakeClock(storeEpoch)}
	b := newMemoryBackend(cfg, e.clock.now)
	base := liveServe(t, e, b, nil)
	first := openStream(t, base+"/api/metrics/stream")
	openStream(t, base+"/api/metrics/stream")
	r := get(t, base+"/api/metrics/stream")
	if r.status != 503 || r.header.Get("Retry-After") == "" || !strings.Contains(r.json(t)["detail"].(string), "MAX_STREAMS") {
		t.Errorf("stream beyond MAX_STREAMS = %d Retry-After %q %s, want 503 naming MAX_STREAMS", r.status, r.header.Get("Retry-After"), r.body)
	}
	first.close()
	waitFor(t, func() bool { return b.hub.open.Load() == 1 }, "the closed stream leaves")
	openStream(t, base+"/api/metrics/stream")
}

func TestStreamResyncAfterRedisRestart(t *testing.T) {
	srv := startRedis(t)
	e := redisStoreEnv(t, func(c *config) { c.RedisAddr = srv.addr })
	base := liveServe(t, e, e.b, nil)
	s := openStream(t, base+"/api/metrics/stream")
	srv.kill()
	srv.restart(t)
	restarted := time.Now()
	ev := s.next(t, 3*time.Second)
	if ev.name != "resync" || ev.data != `{"reason":"store reconnected"}` {
		t.Fatalf("after Redis restarted: %+v, want a resync of everything", ev)
	}
	t.Logf("resync %s after Redis was back", time.Since(restarted).Round(time.Millisecond))
	batch := []sample{hostSample("after", "", e.clock.now(), 3)}
	postSamples(t, base, batch)
	s.collect(t, wantTotals(batch), time.Second)
}

func TestUpdatesWireForm(t *testing.T) {
	in := []update{
		{typ: "cpu", series: `host="a b",path="/x\"y\\"`, points: []point{{1, stats{2, 1e308, -1e-300, math.MaxFloat64}}, {5, stats{1, 0.1, 0.1, 0.1}}}},
		{typ: "mem", resync: resyncBackfill},
		{typ: "disk", series: "", points: []point{{-7, stats{1, -3, -3, -3}}}},
	}
	out, err := decodeUpdates(encodeUpdates(in))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(out) != fmt.Sprint(in) {
		t.Errorf("decode(encode(x)) = %v, want %v", out, in)
	}
	// What is not the service's own form is refused, values JSON cannot
	// carry above all: the channel is open to anyone with Redis.
	for _, bad := range []string{"X\tcpu\n", "P\tcpu\t\t1 2 3\n", "P\tcpu\t\t1 2 3 4 x\n",
		"P\tg\t\t1764590000 1 1 Inf 1", "P\tg\t\t1764590000 1 1 -Inf 1", "P\tg\t\t1764590000 1 NaN 1 1", "P\tg\t\t1764590000 1 +Inf 1 1",
		"P\tg\t\t1764590000 0 1 1 1", "P\tg\t\t1764590000 1 1 2 1", "P\tg\t\t99999999999999 1 1 1 1",
		"P\tg\t\t5 1 1 1 1\t5 1 1 1 1", "P\tbad type\t\t5 1 1 1 1", "P\tg\thost=x\t5 1 1 1 1",
		"R\tcpu\n", "R\tcpu\twhatever\n", "R\t\tlarge update"} {
		if _, err := decodeUpdates([]byte(bad)); err == nil {
			t.Errorf("decode(%q) accepted", bad)
		}
	}
}

func TestCORS(t *testing.T) {
	for _, tc := range []struct {
		origins, origin string
		allow           string // Access-Control-Allow-Origin wanted; "" none
	}{
		{"", "https://app.example.com", ""},
		{"https://app.example.com", "https://app.example.com", "https://app.example.com"},
		{"https://app.example.com", "https://evil.example.com", ""},
		{"*", "https://any.example.com", "*"},
	} {
		env := map[string]string{"CORS_ORIGINS": tc.origins}
		cfg, err := loadConfig(func(k string) string { return env[k] })
		if err != nil {
			t.Fatal(err)
		}
		base := serve(t, cfg, newMemoryBackend(cfg, time.Now))
		req, _ := http.NewRequest("GET", base+"/api/metrics/types", nil)
		req.Header.Set("Origin", tc.origin)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if got := res.Header.Get("Access-Control-Allow-Origin"); got != tc.allow || res.StatusCode != 200 {
			t.Errorf("CORS_ORIGINS=%q, Origin %s: %d Access-Control-Allow-Origin %q, want 200 %q", tc.origins, tc.origin, res.StatusCode, got, tc.allow)
		}
		// A page can read whether its retry was a replay.
		if tc.allow != "" && !strings.Contains(res.Header.Get("Access-Control-Expose-Headers"), "Idempotent-Replayed") {
			t.Errorf("CORS_ORIGINS=%q: Access-Control-Expose-Headers %q lacks Idempotent-Replayed", tc.origins, res.Header.Get("Access-Control-Expose-Headers"))
		}
		req, _ = http.NewRequest("OPTIONS", base+"/api/metrics", nil)
		req.Header.Set("Origin", tc.origin)
		req.Header.Set("Access-Control-Request-Method", "POST")
		req.Header.Set("Access-Control-Request-Headers", "content-type, idempotency-key")
		res, err = http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		preflight := res.StatusCode == 204 && strings.Contains(res.Header.Get("Access-Control-Allow-Methods"), "POST") &&
			strings.Contains(strings.ToLower(res.Header.Get("Access-Control-Allow-Headers")), "content-type") &&
			strings.Contains(strings.ToLower(res.Header.Get("Access-Control-Allow-Headers")), "idempotency-key")
		if preflight != (tc.allow != "") {
			t.Errorf("CORS_ORIGINS=%q, preflight from %s = %d %v, want answered: %v", tc.origins, tc.origin, res.StatusCode, res.Header, tc.allow != "")
		}
	}
	// A preflight for a path without that route is not answered; an
	// origin given with its scheme's default port matches as browsers
	// send it, without.
	cfg, _ := loadConfig(func(k string) string { return map[string]string{"CORS_ORIGINS": "https://a.example:443"}[k] })
	base := serve(t, cfg, newMemoryBackend(cfg, time.Now))
	for path, want := range map[string]int{"/nope": 404, "/api/metrics": 204} {
		req, _ := http.NewRequest("OPTIONS", base+path, nil)
		req.Header.Set("Origin", "https://a.example")
		req.Header.Set("Access-Control-Request-Method", "POST")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != want {
			t.Errorf("preflight of POST %s = %d, want %d", path, res.StatusCode, want)
		}
	}
	if _, err := loadConfig(func(k string) string { return map[string]string{"CORS_ORIGINS": "app.example.com"}[k] }); err == nil ||
		!strings.Contains(err.Error(), "CORS_ORIGINS") {
		t.Errorf("CORS_ORIGINS without a scheme: %v, want an error naming it", err)
	}
}

// TestStreamResyncsOnDelete: a delete tells every stream, on every
// instance, to read its type again.
func TestStreamResyncsOnDelete(t *testing.T) {
	forEachStore(t, func(c *config) { c.AuthTokens = []string{deleteToken} }, func(t *testing.T, e storeEnv) {
		base := liveServe(t, e, e.b, nil)
		streams := []*eventStream{openStream(t, base+"/api/metrics/stream")}
		if e.reopen != nil {
			other := liveServe(t, e, e.reopen(), nil)
			subscribers(t, e, 2)
			streams = append(streams, openStream(t, other+"/api/metrics/stream?metric_type=cpu"))
		}
		if r := sendWith(t, "POST", base+"/api/metrics", hostBody("cpu", "a", e.clock.now(), 1), "Authorization", "Bearer "+deleteToken); r.status != 201 {
			t.Fatalf("post: %d %s", r.status, r.body)
		}
		for i, s := range streams {
			if ev := s.next(t, time.Second); ev.name != "metric" {
				t.Fatalf("stream %d after the post: %+v, want its metric event", i, ev)
			}
		}
		if r := deleteWith(t, base, "metric_type=cpu&label=host:a", deleteToken); r.status != 200 {
			t.Fatalf("delete: %d %s", r.status, r.body)
		}
		for i, s := range streams {
			if ev := s.next(t, time.Second); ev.name != "resync" || ev.data != `{"type":"cpu","reason":"deleted"}` {
				t.Errorf("stream %d after the delete: %+v, want a resync of cpu", i, ev)
			}
		}
	})
}

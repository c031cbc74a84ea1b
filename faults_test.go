package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// result is one request's result in a load test.
type result struct {
	status  int
	elapsed time.Duration
	start   time.Time
	err     error
}

// hammer runs workers that each call req in a loop until stop is closed,
// and returns every result.
func hammer(workers int, stop <-chan struct{}, req func(worker, i int) result) []result {
	var (
		mu  sync.Mutex
		all []result
		wg  sync.WaitGroup
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				o := req(w, i)
				mu.Lock()
				all = append(all, o)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return all
}

// timed makes one request and checks that any answer is complete JSON.
func timed(client *http.Client, method, url, body string) result {
	start := time.Now()
	req, _ := http.NewRequest(method, url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	res, err := client.Do(req)
	if err != nil {
		return result{err: err, start: start, elapsed: time.Since(start)}
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err == nil && !json.Valid(b) {
		err = fmt.Errorf("%s %s: %d with a body that is not JSON: %q", method, url, res.StatusCode, b)
	}
	return result{status: res.StatusCode, err: err, start: start, elapsed: time.Since(start)}
}

func loadClient() *http.Client {
	return &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}, Timeout: 10 * time.Second}
}

// TestRedisKilledUnderLoad kills Redis under concurrent writers and
// readers, then starts it again on the same port.
func TestRedisKilledUnderLoad(t *testing.T) {
	srv := startRedis(t)
	cfg := testConfig(t)
	cfg.RedisAddr = srv.addr
	cfg.RedisTimeout = 500 * time.Millisecond
	prefix := testPrefix()
	base := serve(t, cfg, newRedisBackend(testPool(t, cfg, prefix), prefix, cfg, time.Now))
	client := loadClient()
	defer client.CloseIdleConnections()

	var phase atomic.Int32 // 0 up, 1 down, 2 restarted
	type tagged struct {
		result
		phase int32
	}
	var mu sync.Mutex
	var results []tagged
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		hammer(16, stop, func(w, i int) result {
			p := phase.Load()
			var o result
			if i%2 == 0 {
				o = timed(client, "POST", base+"/api/metrics", metricBody("cpu", sampleTime, float64(w*100000+i)))
			} else {
				o = timed(client, "GET", base+"/api/metrics/summary?metric_type=cpu", "")
			}
			mu.Lock()
			results = append(results, tagged{o, p})
			mu.Unlock()
			return o
		})
	}()

	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !cond(); {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(5 * time.Millisecond) // polling interval
		}
	}
	count := func(p int32, status int) int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, r := range results {
			if r.phase == p && r.status == status {
				n++
			}
		}
		return n
	}
	waitFor("successes with Redis up", func() bool { return count(0, 201) > 20 })
	srv.kill()
	phase.Store(1)
	waitFor("503s with Redis down", func() bool { return count(1, 503) > 50 })
	if r := get(t, base+"/health"); r.status != 503 {
		t.Errorf("health with Redis killed = %d, want 503", r.status)
	}
	srv.restart(t)
	restarted := time.Now()
	phase.Store(2)
	waitFor("successes after the restart", func() bool { return count(2, 201) > 50 })
	close(stop)
	<-done

	var firstOK time.Time
	for _, r := range results {
		if r.phase == 2 && r.status < 300 && (firstOK.IsZero() || r.start.Add(r.elapsed).Before(firstOK)) {
			firstOK = r.start.Add(r.elapsed)
		}
	}
	if d := firstOK.Sub(restarted); d > 3*time.Second {
		t.Errorf("first success %v after Redis came back, want within 3s", d)
	}
	var failedAfterRecovery int
	for _, r := range results {
		if r.err != nil {
			t.Fatalf("request failed without an answer: %v", r.err)
		}
		if r.status != 200 && r.status != 201 && r.status != 503 {
			t.Errorf("status %d in phase %d, want 200, 201 or 503", r.status, r.phase)
		}
		if r.status == 503 && r.elapsed > 2*time.Second {
			t.Errorf("a 503 took %v, want under 2s", r.elapsed)
		}
		// Stale pooled connections must not fail requests once Redis is
		// serving again.
		if r.phase == 2 && r.status == 503 && r.start.After(firstOK) {
			failedAfterRecovery++
		}
	}
	if failedAfterRecovery > 0 {
		t.Errorf("%d requests started after the first success following the restart failed, want 0", failedAfterRecovery)
	}
}

// TestAcknowledgedWritesSurviveRedisRestart: with appendfsync always, every
// sample that got a 201 is in Redis after a crash and restart, and no sample
// is stored twice.
func TestAcknowledgedWritesSurviveRedisRestart(t *testing.T) {
	srv := startRedis(t, "--appendonly", "yes", "--appendfsync", "always")
	cfg := testConfig(t)
	cfg.RedisAddr = srv.addr
	cfg.Retention = retention{} // the samples span days: keep their seconds
	prefix := testPrefix()
	pool := testPool(t, cfg, prefix)
	base := serve(t, cfg, newRedisBackend(pool, prefix, cfg, time.Now))
	client := loadClient()
	defer client.CloseIdleConnections()

	var (
		mu       sync.Mutex
		acked    = map[int]bool{}
		attempts atomic.Int64
	)
	stop := make(chan struct{})
	done := make(chan []result, 1)
	go func() {
		done <- hammer(8, stop, func(w, i int) result {
			// Each sample in a second of its own, so its 1 s bucket tells
			// whether it was stored, and how often.
			v := w*100_000 + i
			attempts.Add(1)
			o := timed(client, "POST", base+"/api/metrics", metricBody("durable", sampleTime.Add(time.Duration(v)*time.Second), float64(v)))
			if o.status == 201 {
				mu.Lock()
				acked[v] = true
				mu.Unlock()
			}
			return o
		})
	}()
	ackedCount := func() int { mu.Lock(); defer mu.Unlock(); return len(acked) }
	for deadline := time.Now().Add(10 * time.Second); ackedCount() < 200; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("writers made no progress")
		}
	}
	srv.kill()
	srv.restart(t)
	for before, deadline := ackedCount(), time.Now().Add(10*time.Second); ackedCount() < before+200; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("writers made no progress after the restart")
		}
	}
	close(stop)
	<-done

	c := pool.Get()
	defer c.Close()
	k := keys{prefix}
	names, err := redis.Strings(c.Do("KEYS", bucketPrefix(k.tag("durable"), res1s)+"*"))
	if err != nil {
		t.Fatal(err)
	}
	stored := map[int]int{}
	total := 0
	for _, name := range names {
		raw, err := redis.Bytes(c.Do("GET", name))
		if err != nil {
			t.Fatal(err)
		}
		b, err := parseBucket(raw)
		if err != nil {
			t.Fatal(err)
		}
		n, v := int(b.count), b.sum // the sum: the one sample's value
		stored[int(v)] += n
		total += n
	}
	lost := 0
	for v := range acked {
		if stored[v] == 0 {
			lost++
		}
	}
	for v, n := range stored {
		if n > 1 {
			t.Errorf("sample %d stored %d times", v, n)
		}
	}
	if lost > 0 {
		t.Errorf("%d of %d acknowledged samples lost", lost, len(acked))
	}
	if int64(total) > attempts.Load() {
		t.Errorf("%d samples stored from %d attempts", total, attempts.Load())
	}
	if n := redisCount(t, c, prefix, "durable"); n != total {
		t.Errorf("running total counts %d, want %d, the samples in the buckets", n, total)
	}
	t.Logf("%d attempts, %d acknowledged, %d stored", attempts.Load(), len(acked), total)
}

// latencyProxy sits between the service and Redis and delays every chunk
// the service sends by the current delay.
type latencyProxy struct {
	ln      net.Listener
	target  string
	delay   atomic.Int64
	pending atomic.Int64 // chunks read from the service, not yet passed on or dropped
	wg      sync.WaitGroup
}

func startLatencyProxy(t *testing.T, target string) *latencyProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &latencyProxy{ln: ln, target: target}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(func() { ln.Close(); p.wg.Wait() })
	return p
}

func (p *latencyProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go p.relay(c)
	}
}

type chunk struct {
	data []byte
	due  time.Time
}

func (p *latencyProxy) relay(c net.Conn) {
	defer p.wg.Done()
	up, err := net.Dial("tcp", p.target)
	if err != nil {
		c.Close()
		return
	}
	go func() { io.Copy(c, up); c.Close() }()
	chunks := make(chan chunk, 1024)
	go func() { // delayed writer: the injected fault
		defer up.Close()
		failed := false
		for ch := range chunks {
			if !failed {
				time.Sleep(time.Until(ch.due))
				_, err := up.Write(ch.data)
				failed = err != nil
			}
			p.pending.Add(-1)
		}
	}()
	defer close(chunks)
	defer c.Close()
	for {
		buf := make([]byte, 32<<10)
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		p.pending.Add(1)
		chunks <- chunk{buf[:n], time.Now().Add(time.Duration(p.delay.Load()))}
	}
}

func TestRedisSlow(t *testing.T) {
	srv := startRedis(t)
	proxy := startLatencyProxy(t, srv.addr)
	cfg := testConfig(t)
	cfg.RedisAddr = proxy.ln.Addr().String()
	cfg.RedisTimeout = 500 * time.Millisecond
	prefix := testPrefix()
	pool := testPool(t, cfg, prefix)
	base := serve(t, cfg, newRedisBackend(pool, prefix, cfg, time.Now))
	client := loadClient()
	defer client.CloseIdleConnections()
	sample := metricBody("cpu", sampleTime, 1)
	if r := post(t, base, sample); r.status != 201 {
		t.Fatalf("post before the latency: %d", r.status)
	}

	proxy.delay.Store(int64(2 * time.Second))
	var maxActive, maxOpen atomic.Int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() { // the pool's own count, sampled while the load runs
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			if n := int64(pool.ActiveCount()); n > maxActive.Load() {
				maxActive.Store(n)
			}
			if n := pool.open.Load(); n > maxOpen.Load() {
				maxOpen.Store(n)
			}
		}
	}()
	time.AfterFunc(3*time.Second, func() { close(stop) })
	results := hammer(200, stop, func(w, i int) result {
		if w%2 == 0 {
			return timed(client, "POST", base+"/api/metrics", sample)
		}
		return timed(client, "GET", base+"/api/metrics/summary?metric_type=cpu", "")
	})
	<-sampled
	for _, r := range results {
		if r.err != nil || r.status != 503 {
			t.Fatalf("with 2s of Redis latency: status %d, err %v; want 503", r.status, r.err)
		}
		// A POST waits for the limiter (REDIS_TIMEOUT at most), then for
		// its ingest (REDIS_TIMEOUT and the grace a started script gets).
		if limit := 2*cfg.RedisTimeout + ingestGrace + 100*time.Millisecond; r.elapsed > limit {
			t.Errorf("a request took %v with Redis slow, want under %v", r.elapsed, limit)
		}
	}
	if n := maxActive.Load(); n > maxRedisConns {
		t.Errorf("pool counted %d connections, want at most %d", n, maxRedisConns)
	}
	if n := maxOpen.Load(); n > maxRedisConns+1 {
		t.Errorf("%d connections open at once, want at most %d (the pool's and the pipeline's)", n, maxRedisConns+1)
	}
	t.Logf("%d requests, pool peak %d, open connections peak %d", len(results), maxActive.Load(), maxOpen.Load())

	proxy.delay.Store(0)
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if r := post(t, base, sample); r.status == 201 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no 201 within 3s of Redis being fast again")
		}
	}
	// Every POST answered 503 reached Redis late, after the service had
	// given up on it: once the proxy has passed on all it held back, none
	// of them may have stored anything.
	for deadline := time.Now().Add(5 * time.Second); proxy.pending.Load() > 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the proxy still holds %d delayed writes", proxy.pending.Load())
		}
	}
	c, err := redis.Dial("tcp", srv.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n := redisCount(t, c, prefix, "cpu"); n != 2 {
		t.Errorf("%d samples stored, want 2: two POSTs answered 201, every other one 503", n)
	}
}

// TestStopUnderLoad cancels run while 32 clients post: every answer is
// complete, run returns nil in time, and the Redis pool is closed.
func TestStopUnderLoad(t *testing.T) {
	srv := startRedis(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, done := startRun(t, ctx, map[string]string{
		"ADDR": "127.0.0.1:0", "STORE": "redis", "REDIS_URL": "redis://" + srv.addr + "/0",
		"RATE_LIMIT": "1000000",
	})
	client := loadClient()
	defer client.CloseIdleConnections()
	stop := make(chan struct{})
	var answered atomic.Int64
	results := make(chan []result, 1)
	go func() {
		results <- hammer(32, stop, func(w, i int) result {
			o := timed(client, "POST", "http://"+addr+"/api/metrics", metricBody("cpu", sampleTime, float64(i)))
			if o.err == nil {
				answered.Add(1)
			} else {
				time.Sleep(time.Millisecond) // the server is gone: don't spin
			}
			return o
		})
	}()
	for deadline := time.Now().Add(10 * time.Second); answered.Load() < 500; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no load reached the server")
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run returned %v, want nil", err)
		}
	case <-time.After(shutdownTimeout + 2*time.Second):
		t.Fatal("run did not return within the shutdown deadline")
	}
	close(stop)
	var ok, refused int
	for _, o := range <-results {
		switch {
		case o.err == nil && o.status == 201:
			ok++
		case o.err == nil && o.status == 503: // Redis was slow on a busy machine
		case o.err == nil:
			t.Errorf("status %d during shutdown, want 201 or 503", o.status)
		case strings.Contains(o.err.Error(), "not JSON"):
			t.Errorf("incomplete answer: %v", o.err)
		default:
			refused++ // no answer at all: the listener had closed
		}
	}
	t.Logf("%d answered 201, %d refused after the listener closed", ok, refused)

	c, err := redis.Dial("tcp", srv.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	list, err := redis.String(c.Do("CLIENT", "LIST"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(list, "name="+redisClientName+" "); n != 0 {
		t.Errorf("%d connections of the service still open after run returned, want 0 (pool closed)", n)
	}
	if stored := redisCount(t, c, "", "cpu"); stored < ok {
		t.Errorf("%d samples stored, want at least the %d acknowledged", stored, ok)
	}
}

// TestStalledRedisStoresNothingAnswered503 stalls Redis (SIGSTOP) while a
// POST waits on it. The POST gets 503; when Redis resumes and runs the
// queued ingest, it must store nothing, or the 503 would have lied.
func TestStalledRedisStoresNothingAnswered503(t *testing.T) {
	srv := startRedis(t)
	cfg := testConfig(t)
	cfg.RedisAddr = srv.addr
	cfg.RedisTimeout, cfg.LimiterTimeout = 300*time.Millisecond, 100*time.Millisecond
	prefix := testPrefix()
	pool := testPool(t, cfg, prefix)
	b := newRedisBackend(pool, prefix, cfg, time.Now)
	// The limiter would take the one pooled connection first; this test is
	// about the write that follows it.
	b.limiter = newMemoryLimiter(cfg.RateLimit, cfg.RateWindow)
	base := serve(t, cfg, b)
	one := metricBody("cpu", sampleTime, 1)
	if r := post(t, base, one); r.status != 201 { // leaves a pooled connection
		t.Fatalf("post with Redis up: %d %s", r.status, r.body)
	}

	srv.cmd.Process.Signal(syscall.SIGSTOP)
	r := post(t, base, "["+one+","+one+","+one+"]")
	srv.cmd.Process.Signal(syscall.SIGCONT)
	if r.status != 503 {
		t.Fatalf("post with Redis stalled = %d %s, want 503", r.status, r.body)
	}
	// The service closed the connection it gave up on; once Redis has
	// dropped it too, Redis has read and run what was queued on it.
	c, err := redis.Dial("tcp", srv.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		list, err := redis.String(c.Do("CLIENT", "LIST"))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(list, "name="+redisClientName+" ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the service's connections are still open in Redis:\n%s", list)
		}
	}
	if n := redisCount(t, c, prefix, "cpu"); n != 1 {
		t.Errorf("%d samples stored, want 1: the batch answered 503 must not be stored", n)
	}
}

// TestHealthChecksSharePing: concurrent health checks share the PING in
// flight instead of sending one each.
func TestHealthChecksSharePing(t *testing.T) {
	srv := startRedis(t)
	proxy := startLatencyProxy(t, srv.addr)
	cfg := testConfig(t)
	cfg.RedisAddr = proxy.ln.Addr().String()
	pool := testPool(t, cfg, testPrefix())
	if err := pool.ping(context.Background()); err != nil { // dials the connection
		t.Fatal(err)
	}
	proxy.delay.Store(int64(300 * time.Millisecond))
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := pool.ping(context.Background()); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	c, err := redis.Dial("tcp", srv.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info, _ := redis.String(c.Do("INFO", "commandstats"))
	var calls int
	for _, line := range strings.Split(info, "\n") {
		if strings.HasPrefix(line, "cmdstat_ping:") {
			fmt.Sscanf(line, "cmdstat_ping:calls=%d", &calls)
		}
	}
	// One before the delay, then one (rarely a few) shared by the 20.
	if calls < 2 || calls > 5 {
		t.Errorf("20 concurrent health checks sent %d PINGs in all, want about 2", calls)
	}
}

// TestHungRedisWithIdleConnections: idle connections are checked with a
// PING before reuse, one after another; against a hung Redis that check
// must not spend more than the borrower's own deadline.
func TestHungRedisWithIdleConnections(t *testing.T) {
	srv := startRedis(t)
	cfg := testConfig(t)
	cfg.RedisAddr = srv.addr
	cfg.RedisTimeout = 500 * time.Millisecond
	prefix := testPrefix()
	pool := testPool(t, cfg, prefix)
	pool.checkIdleAfter = 0 // every idle connection is checked when borrowed
	lim := newRedisLimiter(pool, prefix, 5, time.Minute, time.Second)
	var conns []redis.Conn // eight idle connections in the pool
	for range 8 {
		c := pool.Get()
		if _, err := c.Do("PING"); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	for _, c := range conns {
		c.Close()
	}
	srv.cmd.Process.Signal(syscall.SIGSTOP)
	defer srv.cmd.Process.Signal(syscall.SIGCONT)

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := lim.allow(ctx, "1.2.3.4", time.Now()); err == nil {
		t.Fatal("the limiter answered with Redis stopped")
	}
	if d := time.Since(start); d > 400*time.Millisecond {
		t.Errorf("the limiter took %v with Redis hung and 8 idle connections, want about its 100ms", d)
	}
}

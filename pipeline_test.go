package main

import (
	"fmt"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// pipeDo runs one command on pool's pipeline with timeout.
func pipeDo(pool *redisPool, timeout time.Duration, cmd string, args ...any) (any, error) {
	op := &pipeOp{p: pool.pipe, deadline: time.Now().Add(timeout)}
	return op.Do(cmd, args...)
}

// inFlight is how many calls the pipeline's connection has sent and not
// yet had answered.
func inFlight(pool *redisPool) int {
	pool.pipe.mu.Lock()
	defer pool.pipe.mu.Unlock()
	if pool.pipe.current == nil {
		return 0
	}
	return int(pool.pipe.current.owed.Load())
}

// httptestServe is serve with the telemetry given, so a test reads the
// metrics of the pool it made.
func httptestServe(t *testing.T, cfg config, tel *telemetry, b backend) string {
	srv := httptest.NewServer(newHandler(discardLogger(), cfg, tel, b))
	t.Cleanup(srv.Close)
	return srv.URL
}

func pipelinePool(t *testing.T) (*redisPool, string) {
	t.Helper()
	needRedis(t)
	cfg := testConfig(t)
	if !cfg.RedisPipeline {
		t.Fatal("the pipeline is off by default")
	}
	prefix := testPrefix()
	return testPool(t, cfg, prefix), prefix
}

// TestPipelineRepliesInOrder: many goroutines' commands, batched together,
// each get their own replies, of every kind.
func TestPipelineRepliesInOrder(t *testing.T) {
	pool, prefix := pipelinePool(t)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for w := range 64 {
		wg.Go(func() {
			for i := range 50 {
				key := fmt.Sprintf("%sk%d-%d", prefix, w, i)
				op := &pipeOp{p: pool.pipe, deadline: time.Now().Add(2 * time.Second)}
				op.Send("SET", key, fmt.Sprint(w*1000+i))
				op.Send("INCR", key)
				op.Send("GET", prefix+"missing")
				op.Send("HGET", key, "x") // WRONGTYPE, as a reply among others
				replies, err := redis.Values(op.Do(""))
				if err != nil {
					errs <- err
					return
				}
				n, _ := redis.Int(replies[1], nil)
				_, wrong := replies[3].(redis.Error)
				if replies[0] != "OK" || n != w*1000+i+1 || replies[2] != nil || !wrong {
					errs <- fmt.Errorf("worker %d call %d: replies %v", w, i, replies)
					return
				}
				// Do with a command answers its reply and the first error.
				v, err := redis.String(pipeDo(pool, 2*time.Second, "GET", key))
				if err != nil || v != fmt.Sprint(w*1000+i+1) {
					errs <- fmt.Errorf("GET %s = %q, %v", key, v, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// TestPipelineSlowCommandInFront: commands queued behind a slow one wait for
// it; those whose callers gave up get their error at their deadline, and
// their late replies reach nobody else.
func TestPipelineSlowCommandInFront(t *testing.T) {
	pool, prefix := pipelinePool(t)
	if _, err := pipeDo(pool, time.Second, "SET", prefix+"v", "value"); err != nil {
		t.Fatal(err)
	}
	slow := make(chan error, 1)
	go func() {
		_, err := pipeDo(pool, 2*time.Second, "EVAL", "local t = redis.call('TIME') local s = t[1] * 1e6 + t[2] "+
			"repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > 300000 return 1", 0)
		slow <- err
	}()
	waitFor(t, func() bool { return inFlight(pool) == 1 }, "the script sent")
	var wg sync.WaitGroup
	var mu sync.Mutex
	gaveUp, answered := 0, 0
	for i := range 20 {
		wg.Go(func() {
			timeout := 50 * time.Millisecond
			if i%2 == 0 {
				timeout = 2 * time.Second
			}
			start := time.Now()
			v, err := redis.String(pipeDo(pool, timeout, "GET", prefix+"v"))
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil && timeout < time.Second && time.Since(start) < 200*time.Millisecond:
				gaveUp++
			case err == nil && v == "value":
				answered++
			default:
				t.Errorf("GET with %v: %q, %v after %v", timeout, v, err, time.Since(start))
			}
		})
	}
	wg.Wait()
	if err := <-slow; err != nil {
		t.Fatalf("the slow script: %v", err)
	}
	if gaveUp != 10 || answered != 10 {
		t.Errorf("%d gave up at their deadline and %d were answered, want 10 and 10", gaveUp, answered)
	}
	// The connection is in step: each next command gets its own reply.
	for i := range 20 {
		key := fmt.Sprintf("%sn%d", prefix, i)
		if n, err := redis.Int(pipeDo(pool, time.Second, "INCRBY", key, i)); err != nil || n != i {
			t.Fatalf("INCRBY %s %d = %d, %v", key, i, n, err)
		}
	}
}

// TestPipelineConnectionCut: a connection cut with 100 commands in flight
// fails them all at once, not at their deadlines; one cut while idle is
// noticed at once too; and the next command is served on a new connection.
func TestPipelineConnectionCut(t *testing.T) {
	needRedis(t)
	proxy := startLatencyProxy(t, sharedRedis.addr)
	cfg := testConfig(t)
	cfg.RedisAddr = proxy.ln.Addr().String()
	pool := testPool(t, cfg, testPrefix())
	side, err := redis.Dial("tcp", sharedRedis.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer side.Close()
	clientID := func() int64 {
		id, err := redis.Int64(pipeDo(pool, time.Second, "CLIENT", "ID"))
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	id := clientID()
	// Held back by the proxy, 100 commands are in flight.
	proxy.delay.Store(int64(2 * time.Second))
	results := make(chan error, 100)
	for range 100 {
		go func() {
			_, err := pipeDo(pool, 5*time.Second, "PING")
			results <- err
		}()
	}
	waitFor(t, func() bool { return inFlight(pool) == 100 }, "100 commands in flight")
	start := time.Now()
	if _, err := side.Do("CLIENT", "KILL", "ID", id); err != nil {
		t.Fatal(err)
	}
	for range 100 {
		if err := <-results; err == nil {
			t.Error("a command in flight succeeded on a connection that was cut")
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("the commands in flight took %v to fail, want them failed as the connection was", d)
	}
	proxy.delay.Store(0)
	next := clientID()
	if next == id {
		t.Fatalf("still connection %d after it was killed", id)
	}
	// Cut while idle: noticed without a command to find it.
	if _, err := side.Do("CLIENT", "KILL", "ID", next); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		pool.pipe.mu.Lock()
		defer pool.pipe.mu.Unlock()
		return pool.pipe.current == nil || isClosed(pool.pipe.current.failed)
	}, "the idle connection's cut noticed")
	if v, err := pipeDo(pool, time.Second, "PING"); err != nil || v != "PONG" {
		t.Errorf("PING after the cut = %v, %v; want PONG on a new connection", v, err)
	}
}

// TestPipelineScriptFlush: scripts run by hash keep working through SCRIPT
// FLUSH under load, each falling back to EVAL once.
func TestPipelineScriptFlush(t *testing.T) {
	pool, prefix := pipelinePool(t)
	s := newScript("return redis.call('INCR', KEYS[1])")
	side, err := redis.Dial("tcp", testConfig(t).RedisAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer side.Close()
	stop := make(chan struct{})
	flushed := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				flushed <- n
				return
			default:
			}
			side.Do("SCRIPT", "FLUSH")
			n++
			time.Sleep(2 * time.Millisecond) // spacing the flushes out, not waiting for a result
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Go(func() {
			key := fmt.Sprintf("%sc%d", prefix, w)
			for i := range 300 {
				op := &pipeOp{p: pool.pipe, deadline: time.Now().Add(2 * time.Second)}
				n, err := redis.Int(s.run(op, time.Now().Add(2*time.Second), []string{key}))
				if err != nil || n != i+1 {
					errs <- fmt.Errorf("worker %d run %d = %d, %v", w, i, n, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	t.Logf("%d SCRIPT FLUSHes during 2,400 script runs", <-flushed)
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// TestPipelineBatches: under concurrent load the pipeline writes several
// commands at once, and /metrics shows it. (Health checks would not show
// it: concurrent ones share one PING.)
func TestPipelineBatches(t *testing.T) {
	needRedis(t)
	cfg := testConfig(t)
	tel := newTelemetry()
	prefix := testPrefix()
	pool := newRedisPool(cfg, tel)
	t.Cleanup(func() { deleteKeys(pool, prefix); pool.Close() })
	b := newRedisBackend(pool, prefix, cfg, time.Now)
	base := httptestServe(t, cfg, tel, b)
	var wg sync.WaitGroup
	// POSTs: each asks the limiter (a script on the pipeline) first.
	for w := range 32 {
		wg.Go(func() {
			for i := range 50 {
				r, err := tryPost(base, metricBody("cpu", sampleTime.Add(time.Duration(w*50+i)*time.Second), 1))
				if err != nil || r.status != 201 {
					t.Errorf("POST = %d, %v", r.status, err)
					return
				}
			}
		})
	}
	wg.Wait()
	m := get(t, base+"/metrics").body
	var sum, count float64
	for l := range strings.Lines(m) {
		fmt.Sscanf(l, "redis_pipeline_batch_size_sum %g", &sum)
		fmt.Sscanf(l, "redis_pipeline_batch_size_count %g", &count)
	}
	if count == 0 || sum/count <= 1.2 {
		t.Errorf("redis_pipeline_batch_size: %g commands in %g writes, want more than 1.2 a write under 32 concurrent clients\n%s",
			sum, count, grepLines(m, "redis_pipeline"))
	}
	t.Logf("%g commands in %g writes: %.1f a write", sum, count, sum/count)
}

// TestPipelineLargeWriteAfterIdle: a call larger than the write buffer,
// which goes to the socket at once, after the connection sat idle for
// longer than its stall limit, is written, not failed on an old deadline.
func TestPipelineLargeWriteAfterIdle(t *testing.T) {
	pool, prefix := pipelinePool(t)
	if _, err := pipeDo(pool, time.Second, "PING"); err != nil {
		t.Fatal(err)
	}
	// What an idle spell past the stall limit leaves: the last flush's
	// write deadline, passed.
	pool.pipe.mu.Lock()
	pool.pipe.current.conn.SetWriteDeadline(time.Now())
	pool.pipe.mu.Unlock()
	big := strings.Repeat("x", 100<<10)
	op := &pipeOp{p: pool.pipe, deadline: time.Now().Add(time.Second)}
	for i := range 1000 {
		op.Send("GET", fmt.Sprintf("%sk%d", prefix, i))
	}
	if _, err := op.Do("SET", prefix+"big", big); err != nil {
		t.Errorf("a 100 KiB SET behind 1,000 GETs after the connection sat idle: %v", err)
	}
}

// TestPipelineRedialOutlivesItsCaller: the dial a caller with almost no time
// left starts serves the callers with time to spare.
func TestPipelineRedialOutlivesItsCaller(t *testing.T) {
	pool, _ := pipelinePool(t)
	side, err := redis.Dial("tcp", testConfig(t).RedisAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer side.Close()
	for round := range 10 {
		id, err := redis.Int64(pipeDo(pool, time.Second, "CLIENT", "ID"))
		if err != nil {
			t.Fatal(err)
		}
		side.Do("CLIENT", "KILL", "ID", id)
		waitFor(t, func() bool {
			pool.pipe.mu.Lock()
			defer pool.pipe.mu.Unlock()
			return pool.pipe.current == nil || isClosed(pool.pipe.current.failed)
		}, "the cut noticed")
		pipeDo(pool, 100*time.Microsecond, "PING") // starts the dial, and gives up
		if v, err := pipeDo(pool, 2*time.Second, "PING"); err != nil || v != "PONG" {
			t.Errorf("round %d: PING with 2s to spare = %v, %v", round, v, err)
		}
	}
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// TestPipelineClosed: after the pool is closed, calls fail at once and no
// connection is dialled again.
func TestPipelineClosed(t *testing.T) {
	needRedis(t)
	pool := newRedisPool(testConfig(t), nil)
	if _, err := pipeDo(pool, time.Second, "PING"); err != nil {
		t.Fatal(err)
	}
	pool.Close()
	if _, err := pipeDo(pool, time.Second, "PING"); err != errPipelineClosed {
		t.Errorf("PING after Close = %v, want %v", err, errPipelineClosed)
	}
	waitFor(t, func() bool { return pool.open.Load() == 0 }, "no connection open after Close")
}

package main

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// postOnce posts body to path with an Idempotency-Key.
func postOnce(t *testing.T, base, path, key, body string) response {
	t.Helper()
	return sendWith(t, "POST", base+path, body, "Idempotency-Key", key)
}

func replayedAnswer(r response) bool { return r.header.Get("Idempotent-Replayed") == "true" }

// TestIdempotentRetries: a repeat is answered as the first success was and
// stores nothing; another request under the key is refused; a failed
// write claims nothing; a key that is not 1 to 128 printable ASCII
// characters is refused before anything is read.
func TestIdempotentRetries(t *testing.T) {
	forEachStore(t, func(c *config) { c.MaxTypes = 3 }, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		one := metricBody("cpu", sampleTime, 1)
		first := postOnce(t, base, "/api/metrics", "k-1", one)
		if first.status != 201 || replayedAnswer(first) {
			t.Fatalf("first post: %d %v %s", first.status, first.header, first.body)
		}
		for range 3 {
			r := postOnce(t, base, "/api/metrics", "k-1", one)
			if r.status != 201 || !replayedAnswer(r) || r.body != first.body || r.header.Get("Content-Type") != "application/json" {
				t.Fatalf("repeat: %d %v %q, want 201 replayed %q", r.status, r.header, r.body, first.body)
			}
		}
		if n := count(t, e.b, "cpu"); n != 1 {
			t.Fatalf("%d samples after a post and its repeats, want 1", n)
		}
		// A batch's answer, count and all, is what its repeat gets.
		batch := "[" + one + "," + metricBody("cpu", sampleTime, 2) + "]"
		first = postOnce(t, base, "/api/metrics", "k-2", batch)
		again := postOnce(t, base, "/api/metrics", "k-2", batch)
		if first.status != 201 || again.status != 201 || !replayedAnswer(again) || again.body != first.body || !strings.Contains(again.body, `"count":2`) {
			t.Fatalf("batch: %d %q, repeat %d %v %q", first.status, first.body, again.status, again.header, again.body)
		}
		// The same key with another body, or on another route.
		if r := postOnce(t, base, "/api/metrics", "k-1", metricBody("cpu", sampleTime, 5)); r.status != 422 || !strings.Contains(r.body, "Idempotency-Key") {
			t.Fatalf("another body under a used key: %d %s, want 422", r.status, r.body)
		}
		if r := postOnce(t, base, "/write", "k-1", "cpu value=1 1735725600"); r.status != 422 {
			t.Fatalf("another route under a used key: %d %s, want 422", r.status, r.body)
		}
		if n := count(t, e.b, "cpu"); n != 3 {
			t.Fatalf("%d samples, want 3: a refused post stored something", n)
		}
		// The line protocol's answer, 204 without a body, is replayed too.
		lp := "disk,host=a used=3 1735725600"
		if r := postOnce(t, base, "/write?precision=s", "k-4", lp); r.status != 204 || replayedAnswer(r) {
			t.Fatalf("line protocol: %d %s", r.status, r.body)
		}
		if r := postOnce(t, base, "/write?precision=s", "k-4", lp); r.status != 204 || !replayedAnswer(r) || r.body != "" {
			t.Fatalf("line protocol repeat: %d %v %q", r.status, r.header, r.body)
		}
		if r := postOnce(t, base, "/write?precision=ms", "k-4", lp); r.status != 422 {
			t.Fatalf("line protocol at another precision under a used key: %d %s, want 422", r.status, r.body)
		}
		if n := count(t, e.b, "disk.used"); n != 1 {
			t.Fatalf("disk.used: %d samples, want 1", n)
		}
		// The precision as read: none and ns are the same request.
		ns := "disk,host=a used=4 1735725600000000000"
		if r := postOnce(t, base, "/api/v2/write", "k-5", ns); r.status != 204 || replayedAnswer(r) {
			t.Fatalf("v2 write: %d %s", r.status, r.body)
		}
		if r := postOnce(t, base, "/api/v2/write?precision=ns", "k-5", ns); r.status != 204 || !replayedAnswer(r) {
			t.Fatalf("v2 write with precision=ns repeated: %d %v %s, want a replay", r.status, r.header, r.body)
		}
		// A body of no samples takes its key all the same.
		if r := postOnce(t, base, "/write", "k-6", "disk flag=true 1735725600000000000"); r.status != 204 || replayedAnswer(r) {
			t.Fatalf("a line of no numeric field: %d %s", r.status, r.body)
		}
		if r := postOnce(t, base, "/write", "k-6", "disk flag=true 1735725600000000000"); r.status != 204 || !replayedAnswer(r) {
			t.Fatalf("its repeat: %d %v %s, want a replay", r.status, r.header, r.body)
		}
		if r := postOnce(t, base, "/write", "k-6", ns); r.status != 422 {
			t.Fatalf("another body under its key: %d %s, want 422", r.status, r.body)
		}
		if n := count(t, e.b, "disk.used"); n != 2 {
			t.Fatalf("disk.used: %d samples, want 2", n)
		}
		for _, key := range []string{strings.Repeat("k", 129), "caf\u00e9", "tab\there", ""} {
			r, err := rawPost(base, "/api/metrics", key, metricBody("bad", sampleTime, 1))
			if err != nil {
				t.Fatal(err)
			}
			if r.status != 422 || !strings.Contains(r.body, "Idempotency-Key must be") {
				t.Errorf("key %q: %d %s, want 422", key, r.status, r.body)
			}
		}
		if r := postOnce(t, base, "/api/metrics", strings.Repeat("~", 128), metricBody("edge", sampleTime, 1)); r.status != 201 {
			t.Errorf("a key of 128 characters: %d %s", r.status, r.body)
		}
		if n := count(t, e.b, "bad"); n != 0 {
			t.Errorf("%d samples stored under invalid keys", n)
		}
		// A write the store refuses claims nothing: the key is free.
		// (cpu, disk.used and edge are the MAX_TYPES=3 types.)
		if r := postOnce(t, base, "/api/metrics", "k-3", metricBody("fourth", sampleTime, 1)); r.status != 422 || !strings.Contains(r.body, "limit of 3") {
			t.Fatalf("a type past MAX_TYPES: %d %s", r.status, r.body)
		}
		if r := postOnce(t, base, "/api/metrics", "k-3", metricBody("cpu", sampleTime, 7)); r.status != 201 || replayedAnswer(r) {
			t.Fatalf("after a refusal, the key's first write: %d %v %s", r.status, r.header, r.body)
		}
	})
}

// rawPost sends a POST with an Idempotency-Key written as it is, bytes
// that net/http would refuse to send included.
func rawPost(base, path, key, body string) (response, error) {
	c, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		return response{}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	_, err = io.WriteString(c, "POST "+path+" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: "+key+
		"\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\nConnection: close\r\n\r\n"+body)
	if err != nil {
		return response{}, err
	}
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return response{}, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return response{res.StatusCode, res.Header, string(b)}, err
}

// TestIdempotentConcurrentRepeats: repeats sent at once, through two
// instances on Redis, are applied exactly once.
func TestIdempotentConcurrentRepeats(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		bases := []string{serve(t, e.cfg, e.b)}
		if e.reopen != nil {
			bases = append(bases, serve(t, e.cfg, e.reopen()))
		}
		body := "[" + metricBody("cpu", sampleTime, 1) + "," + hostBody("cpu", "a", sampleTime, 2) + "]"
		const n = 24
		var wg sync.WaitGroup
		var fresh, replays, other atomic.Int64
		for i := range n {
			wg.Go(func() {
				req, _ := http.NewRequest("POST", bases[i%len(bases)]+"/api/metrics", strings.NewReader(body))
				req.Header.Set("Idempotency-Key", "together")
				res, err := http.DefaultClient.Do(req)
				if err != nil {
					other.Add(1)
					return
				}
				res.Body.Close()
				switch {
				case res.StatusCode == 201 && res.Header.Get("Idempotent-Replayed") == "true":
					replays.Add(1)
				case res.StatusCode == 201:
					fresh.Add(1)
				default:
					other.Add(1)
				}
			})
		}
		wg.Wait()
		if fresh.Load() != 1 || replays.Load() != n-1 || other.Load() != 0 {
			t.Fatalf("%d applied, %d replayed, %d other answers; want 1, %d, 0", fresh.Load(), replays.Load(), other.Load(), n-1)
		}
		if c := count(t, e.b, "cpu"); c != 2 {
			t.Fatalf("%d samples, want 2", c)
		}
	})
}

// TestIdempotencyKeyLifetime: the memory store forgets a key 24 hours
// after its write, by the service's clock, and keeps at most
// maxOnceRecords, the oldest going first.
func TestIdempotencyKeyLifetime(t *testing.T) {
	cfg := testConfig(t)
	clock := newFakeClock(storeEpoch)
	b := newMemoryBackend(cfg, clock.now)
	base := serve(t, cfg, b)
	one := metricBody("cpu", sampleTime, 1)
	if r := postOnce(t, base, "/api/metrics", "k", one); r.status != 201 || replayedAnswer(r) {
		t.Fatalf("first: %d %s", r.status, r.body)
	}
	clock.advance(onceLifetime - time.Second)
	b.sweep(clock.now())
	if r := postOnce(t, base, "/api/metrics", "k", one); !replayedAnswer(r) {
		t.Fatalf("a second before 24 h: %d %v, want a replay", r.status, r.header)
	}
	clock.advance(time.Second)
	if r := postOnce(t, base, "/api/metrics", "k", one); r.status != 201 || replayedAnswer(r) {
		t.Fatalf("at 24 h, not yet swept: %d %v, want the write applied again", r.status, r.header)
	}
	if n := count(t, b, "cpu"); n != 2 {
		t.Fatalf("%d samples, want 2", n)
	}
	// Swept: the records past their lifetime are dropped from the bound
	// too, and the record written again at 24 h is kept.
	clock.advance(time.Second)
	b.sweep(clock.now())
	m := b.store.(*memoryStore)
	if len(m.once.byID) != 1 || len(m.once.order) != 1 {
		t.Fatalf("after the sweep: %d records, %d in order, want 1", len(m.once.byID), len(m.once.order))
	}

	var o onceRecords
	o.max = 3
	keys := []string{"a", "b", "c", "d"}
	for _, k := range keys {
		o.keep(newOnceKey(k, "", [32]byte{}, 201, nil), clock.now())
	}
	for i, k := range keys {
		if got := o.lookup(newOnceKey(k, "", [32]byte{}, 201, nil).id, clock.now()) != nil; got != (i > 0) {
			t.Errorf("bound 3, key %s kept = %v", k, got)
		}
	}
}

// TestRedisIdempotencyKeyLifetime: Redis keeps a record for 24 hours.
func TestRedisIdempotencyKeyLifetime(t *testing.T) {
	e := redisStoreEnv(t, nil)
	base := serve(t, e.cfg, e.b)
	if r := postOnce(t, base, "/api/metrics", "k", metricBody("cpu", sampleTime, 1)); r.status != 201 {
		t.Fatalf("post: %d %s", r.status, r.body)
	}
	c := e.pool.Get()
	defer c.Close()
	ttl, err := redis.Int64(c.Do("PTTL", keys{e.prefix}.once(newOnceKey("k", "", [32]byte{}, 0, nil).id)))
	if err != nil {
		t.Fatal(err)
	}
	if ttl <= (onceLifetime-time.Minute).Milliseconds() || ttl > onceLifetime.Milliseconds() {
		t.Fatalf("record's PTTL %d ms, want about 24 h", ttl)
	}
}

// replyDropper relays a client's connections to Redis, and while drop is
// set, swallows Redis's replies and cuts the connection: the command ran,
// its answer never came.
type replyDropper struct {
	ln   net.Listener
	drop atomic.Bool
}

func startReplyDropper(t *testing.T, target string) *replyDropper {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &replyDropper{ln: ln}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			wg.Go(func() { io.Copy(up, c); up.Close() })
			wg.Go(func() {
				defer c.Close()
				buf := make([]byte, 32<<10)
				for {
					n, err := up.Read(buf)
					if err != nil {
						return
					}
					if p.drop.Load() {
						up.Close()
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			})
		}
	})
	return p
}

// TestRedisIdempotentRetryAfterLostAnswer: an ingest whose script ran but
// whose answer was lost is answered 503, and is stored; its retry with the
// key is answered as a success and stores nothing again, on another
// instance too. Without a key the same retry counts twice, which is what
// the key is for.
func TestRedisIdempotentRetryAfterLostAnswer(t *testing.T) {
	needRedis(t)
	cfg := testConfig(t)
	proxy := startReplyDropper(t, sharedRedis.addr)
	cfg.RedisAddr = proxy.ln.Addr().String()
	cfg.RedisTimeout = 300 * time.Millisecond
	prefix := testPrefix()
	pool := testPool(t, cfg, prefix)
	b := newRedisBackend(pool, prefix, cfg, time.Now)
	b.limiter = newMemoryLimiter(cfg.RateLimit, cfg.RateWindow)
	base := serve(t, cfg, b)
	other := redisStoreEnv(t, nil) // another instance, straight to Redis
	otherB := newRedisBackend(testPool(t, other.cfg, prefix), prefix, other.cfg, time.Now)
	otherBase := serve(t, other.cfg, otherB)

	// A write that leaves a pooled connection, its script loaded.
	if r := post(t, base, metricBody("warm", sampleTime, 1)); r.status != 201 {
		t.Fatalf("post: %d %s", r.status, r.body)
	}
	for i, key := range []string{"lost-1", ""} {
		typ := []string{"keyed", "unkeyed"}[i]
		body := "[" + metricBody(typ, sampleTime, 1) + "," + metricBody(typ, sampleTime, 2) + "]"
		var header []string
		if key != "" {
			header = []string{"Idempotency-Key", key}
		}
		proxy.drop.Store(true)
		r := sendWith(t, "POST", base+"/api/metrics", body, header...)
		proxy.drop.Store(false)
		if r.status != 503 {
			t.Fatalf("%s: post with its answer lost: %d %s, want 503", typ, r.status, r.body)
		}
		if n := count(t, otherB, typ); n != 2 {
			t.Fatalf("%s: %d samples after the lost answer, want 2: the script ran", typ, n)
		}
		for _, at := range []string{base, otherBase} {
			r = sendWith(t, "POST", at+"/api/metrics", body, header...)
			if r.status != 201 || replayedAnswer(r) != (key != "") {
				t.Fatalf("%s: retry: %d %v %s", typ, r.status, r.header, r.body)
			}
		}
		want := int64(2)
		if key == "" {
			want = 6
		}
		if n := count(t, otherB, typ); n != want {
			t.Fatalf("%s: %d samples after the retries, want %d", typ, n, want)
		}
	}
}

// storedHook is a store that tells stored when a write with a key has
// been applied, before its answer is written.
type storedHook struct {
	metricStore
	stored chan struct{}
}

func (h *storedHook) addOnce(ctx context.Context, batches []typeBatch, now time.Time, o *onceKey) error {
	err := h.metricStore.addOnce(ctx, batches, now, o)
	if err == nil {
		close(h.stored)
	}
	return err
}

// TestIdempotentRetryAfterCutConnection: a client that sent a write and
// lost its connection before the answer retries with its key; the write
// counts once.
func TestIdempotentRetryAfterCutConnection(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		hook := &storedHook{metricStore: e.b.store, stored: make(chan struct{})}
		b := e.b
		b.store = hook
		base := serve(t, e.cfg, b)
		body := metricBody("cpu", sampleTime, 1)
		c, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "POST /api/metrics HTTP/1.1\r\nHost: x\r\nIdempotency-Key: cut\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n\r\n"+body)
		select {
		case <-hook.stored:
		case <-time.After(5 * time.Second):
			t.Fatal("the write was never stored")
		}
		c.Close() // the answer is never read
		r := postOnce(t, base, "/api/metrics", "cut", body)
		if r.status != 201 || !replayedAnswer(r) {
			t.Fatalf("retry: %d %v %s", r.status, r.header, r.body)
		}
		if n := count(t, e.b, "cpu"); n != 1 {
			t.Fatalf("%d samples, want 1", n)
		}
	})
}

// TestAddOnceAtOnce: ingests with one key started together, straight on
// the store, are applied exactly once.
func TestAddOnceAtOnce(t *testing.T) {
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		for round := range 20 {
			typ := "at-once-" + strconv.Itoa(round)
			batches := aggregate([]sample{{typ: typ, at: sampleTime.UnixMicro(), value: 1}}, e.cfg.Retention)
			o := newOnceKey(typ, "", [32]byte{byte(round)}, 201, nil)
			start := make(chan struct{})
			var wg sync.WaitGroup
			var applied, replays atomic.Int64
			for range 16 {
				wg.Go(func() {
					<-start
					switch err := e.b.store.addOnce(t.Context(), batches, e.clock.now(), o); err.(type) {
					case nil:
						applied.Add(1)
					case *replayError:
						replays.Add(1)
					default:
						t.Error(err)
					}
				})
			}
			close(start)
			wg.Wait()
			if applied.Load() != 1 || replays.Load() != 15 || count(t, e.b, typ) != 1 {
				t.Fatalf("round %d: %d applied, %d replays, %d stored; want 1, 15, 1", round, applied.Load(), replays.Load(), count(t, e.b, typ))
			}
		}
	})
}

// TestIdempotencyKeysPerToken: with AUTH_TOKENS each token has keys of its
// own: the same key and body from two tokens are two writes.
func TestIdempotencyKeysPerToken(t *testing.T) {
	forEachStore(t, func(c *config) { c.AuthTokens = []string{tokenA, tokenB} }, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		body := metricBody("cpu", sampleTime, 1)
		for i, tok := range []string{tokenA, tokenB, tokenA} {
			r := sendWith(t, "POST", base+"/api/metrics", body, "Authorization", "Bearer "+tok, "Idempotency-Key", "shared")
			if want := i == 2; r.status != 201 || replayedAnswer(r) != want {
				t.Fatalf("post %d: %d %v %s, want 201 replayed: %v", i, r.status, r.header, r.body, want)
			}
		}
		if n := count(t, e.b, "cpu"); n != 2 {
			t.Fatalf("%d samples, want 2: one per token", n)
		}
	})
}

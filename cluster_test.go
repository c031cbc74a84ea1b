package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// sharedCluster is the local Redis Cluster the store suite runs on as a
// third store: three masters this binary started. Its addresses are empty
// when redis-server or redis-cli is missing.
var sharedCluster struct {
	addrs []string
}

// redisCluster is a cluster of masters a test binary started and owns.
type redisCluster struct {
	nodes []*redisServer
}

func (c *redisCluster) addrs() []string {
	var out []string
	for _, n := range c.nodes {
		out = append(out, n.addr)
	}
	return out
}

func (c *redisCluster) kill() {
	for _, n := range c.nodes {
		n.kill()
	}
}

// startCluster starts masters redis-servers in cluster mode under dir and
// joins them into one cluster, the slots split evenly, and waits until
// every node says the cluster is ok.
func startCluster(dir string, masters int, extra ...string) (*redisCluster, error) {
	c := &redisCluster{}
	for i := range masters {
		d := filepath.Join(dir, fmt.Sprintf("node%d", i))
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
		n, err := startRedisServer(d, append([]string{"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", "2000"}, extra...)...)
		if err != nil {
			c.kill()
			return nil, err
		}
		c.nodes = append(c.nodes, n)
	}
	args := append([]string{"--cluster", "create"}, c.addrs()...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	if masters == 1 { // redis-cli creates clusters of three masters or more
		_, port, _ := net.SplitHostPort(c.nodes[0].addr)
		args = []string{"-p", port, "CLUSTER", "ADDSLOTSRANGE", "0", strconv.Itoa(clusterSlots - 1)}
	}
	if out, err := exec.Command("redis-cli", args...).CombinedOutput(); err != nil {
		c.kill()
		return nil, fmt.Errorf("redis-cli %v: %v\n%s", args, err, out)
	}
	if err := c.waitOK(20 * time.Second); err != nil {
		c.kill()
		return nil, err
	}
	return c, nil
}

// waitOK waits until every node reports cluster_state:ok and the same
// slots.
func (c *redisCluster) waitOK(within time.Duration) error {
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		ok := true
		var layout string
		for _, n := range c.nodes {
			conn, err := redis.Dial("tcp", n.addr, redis.DialConnectTimeout(200*time.Millisecond))
			if err != nil {
				ok = false
				break
			}
			info, err1 := redis.String(conn.Do("CLUSTER", "INFO"))
			slots, err2 := redis.Values(conn.Do("CLUSTER", "SLOTS"))
			conn.Close()
			t, err3 := parseSlots(slots, n.addr)
			if err1 != nil || err2 != nil || err3 != nil || !strings.Contains(info, "cluster_state:ok") {
				ok = false
				break
			}
			l := fmt.Sprint(t.masters, t.owner)
			if layout != "" && l != layout {
				ok = false
				break
			}
			layout = l
		}
		if ok {
			return nil
		}
		time.Sleep(20 * time.Millisecond) // polling for the cluster to settle
	}
	return errors.New("the cluster did not settle")
}

// startSharedCluster starts the shared cluster when the tools are there;
// it reports whether the tests may go on.
func startSharedCluster(dir string) (stop func(), ok bool) {
	if _, err := exec.LookPath("redis-cli"); err != nil {
		if os.Getenv("REQUIRE_REDIS") == "1" {
			fmt.Fprintln(os.Stderr, "REQUIRE_REDIS=1 but redis-cli, which makes the test cluster, is not on PATH")
			return nil, false
		}
		return func() {}, true
	}
	c, err := startCluster(dir, 3)
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting the test cluster:", err)
		return nil, false
	}
	sharedCluster.addrs = c.addrs()
	return c.kill, true
}

// needCluster skips a cluster test when no cluster could be started,
// unless REQUIRE_REDIS=1 makes that a failure.
func needCluster(t testing.TB) {
	t.Helper()
	if len(sharedCluster.addrs) == 0 {
		if os.Getenv("REQUIRE_REDIS") == "1" {
			t.Fatal("REQUIRE_REDIS=1 and no Redis Cluster is available")
		}
		t.Skip("no redis-server and redis-cli on PATH: cluster half skipped")
	}
}

// clusterStoreEnv is the cluster half of forEachStore: a backend on the
// shared cluster under a prefix of its own.
func clusterStoreEnv(t *testing.T, mutate func(*config)) storeEnv {
	t.Helper()
	needCluster(t)
	cfg := testConfig(t)
	cfg.RedisCluster = sharedCluster.addrs
	if mutate != nil {
		mutate(&cfg)
	}
	return sharedStoreEnv(t, "cluster", cfg)
}

func TestKeySlot(t *testing.T) {
	needCluster(t)
	c, err := redis.Dial("tcp", sharedCluster.addrs[0])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	keys := []string{"", "a", "foo", "123456789", "{user1000}.following", "x{}y", "{}{a}", "a{b", "{a}}b", "p{cpu}:m", "{é}"}
	for i := range 200 {
		keys = append(keys, strconv.Itoa(i*7919)+"{t"+strconv.Itoa(i%13)+"}")
	}
	for _, k := range keys {
		want, err := redis.Int(c.Do("CLUSTER", "KEYSLOT", k))
		if err != nil {
			t.Fatal(err)
		}
		if got := keySlot(k); got != want {
			t.Errorf("keySlot(%q) = %d, Redis says %d", k, got, want)
		}
	}
}

// ownCluster starts a cluster of three masters for one test, which may
// kill its nodes; it is stopped after the test. extra is given to each
// redis-server.
func ownCluster(t testing.TB, extra ...string) *redisCluster {
	t.Helper()
	needCluster(t)
	c, err := startCluster(t.TempDir(), 3, extra...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.kill)
	return c
}

// layout is the cluster's slot table as its first live node says it.
func (c *redisCluster) layout(t *testing.T) *slotTable {
	t.Helper()
	for _, n := range c.nodes {
		conn, err := redis.Dial("tcp", n.addr, redis.DialConnectTimeout(200*time.Millisecond))
		if err != nil {
			continue
		}
		reply, err := redis.Values(conn.Do("CLUSTER", "SLOTS"))
		conn.Close()
		if err == nil {
			if st, err := parseSlots(reply, n.addr); err == nil {
				return st
			}
		}
	}
	t.Fatal("no node of the cluster answers CLUSTER SLOTS")
	return nil
}

// typeOn is a metric type name whose keys under prefix are on the slot
// for which want says yes.
func typeOn(prefix, stem string, want func(slot int) bool) string {
	for i := 0; ; i++ {
		name := stem + strconv.Itoa(i)
		if want(keySlot(keys{prefix: prefix}.meta(name))) {
			return name
		}
	}
}

// TestClusterNodeDown posts a batch of three types, one on each master,
// while one master is down: the 503 names the two types stored, which are
// readable; the same request with its Idempotency-Key, once the node is
// back, stores the third type and only that, and a third time is a replay.
// Every type then counts its samples once.
func TestClusterNodeDown(t *testing.T) {
	// Each write on disk before it is answered: a node restarted holds
	// what it acknowledged.
	c := ownCluster(t, "--appendonly", "yes", "--appendfsync", "always")
	cfg := testConfig(t)
	cfg.RedisCluster = c.addrs()
	prefix := testPrefix()
	// With the service's telemetry, which counts the failures.
	tel := newTelemetry()
	pool := newRedisPool(cfg, tel)
	t.Cleanup(func() {
		deleteKeys(pool, prefix)
		pool.Close()
	})
	clock := newFakeClock(storeEpoch)
	b := newRedisBackend(pool, prefix, cfg, clock.now)
	rs := b.store.(*redisStore)
	srv := httptest.NewServer(newHandler(discardLogger(), cfg, tel, b))
	t.Cleanup(srv.Close)
	base := srv.URL

	st := c.layout(t)
	var names []string
	for _, addr := range st.masters {
		names = append(names, typeOn(prefix, "t", func(slot int) bool { return st.master(slot) == addr }))
	}
	down := c.nodes[slices.IndexFunc(c.nodes, func(n *redisServer) bool { return n.addr == st.master(keySlot(keys{prefix: prefix}.meta(names[2]))) })]
	var items []string
	for i, name := range names {
		for j := range 3 {
			items = append(items, fmt.Sprintf(`{"type":%q,"value":%d,"timestamp":"2025-01-01T10:00:0%dZ","labels":{"host":"h%d"}}`, name, i+1, j, j))
		}
	}
	body := "[" + strings.Join(items, ",") + "]"
	idem := func() response {
		return sendWith(t, "POST", base+"/api/metrics", body, "Content-Type", "application/json", "Idempotency-Key", "batch-1")
	}
	countOf := func(name string) float64 {
		t.Helper()
		r := get(t, base+"/api/metrics/summary?metric_type="+name)
		if r.status != 200 {
			t.Fatalf("summary of %s: %d %s", name, r.status, r.body)
		}
		return r.json(t)["count"].(float64)
	}
	counts := func(want float64, when string, names ...string) {
		t.Helper()
		for _, name := range names {
			if n := countOf(name); n != want {
				t.Fatalf("%s counts %v %s, want %v", name, n, when, want)
			}
		}
	}
	restart := func() {
		t.Helper()
		down.restart(t)
		if err := c.waitOK(20 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
	// Written once with the node up, so the client knows the layout.
	if r := post(t, base, metricBody(names[2], sampleTime, 1)); r.status != 201 {
		t.Fatalf("warm-up: %d %s", r.status, r.body)
	}

	// Down before the batch: its check fails, and nothing is stored.
	down.kill()
	if r := idem(); r.status != 503 || strings.Contains(r.body, "stored") {
		t.Fatalf("with a master down: %d %s, want 503 storing nothing", r.status, r.body)
	}
	counts(0, "after a 503 that stored nothing", names[:2]...)
	restart()

	// Down between the check and the writes.
	rs.checked = func() { down.kill() }
	r := idem()
	rs.checked = nil
	if r.status != 503 || r.header.Get("Retry-After") == "" {
		t.Fatalf("with a master failing mid-batch: %d %s, want 503 with Retry-After", r.status, r.body)
	}
	var got struct {
		Detail string   `json:"detail"`
		Stored []string `json:"stored"`
	}
	if err := json.Unmarshal([]byte(r.body), &got); err != nil || got.Detail == "" {
		t.Fatalf("503 body %s: %v", r.body, err)
	}
	if want := slices.Sorted(slices.Values(names[:2])); !slices.Equal(got.Stored, want) {
		t.Fatalf("stored %v, want %v", got.Stored, want)
	}
	counts(3, "after a 503 that names it stored", names[:2]...)
	if m := get(t, base+"/metrics").body; !regexp.MustCompile(`store_errors_total\{op="ingest"\} [1-9]`).MatchString(m) {
		t.Fatal("/metrics counts no failed ingest after the 503")
	}

	restart()
	// The batch held its third type from its check; the hold, on the
	// node that went down, lapses after REDIS_TIMEOUT.
	hc, err := redis.Dial("tcp", down.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) { // polling Redis for a state
		if n, err := redis.Int(hc.Do("EXISTS", keys{prefix: prefix}.hold(names[2]))); err == nil && n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the batch's hold of its third type did not lapse")
		}
	}
	if r := idem(); r.status != 201 || r.header.Get("Idempotent-Replayed") != "" {
		t.Fatalf("retry after the node is back: %d %v %s, want a 201 that is no replay", r.status, r.header, r.body)
	}
	if r := idem(); r.status != 201 || r.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("a repeat of the completed batch: %d %v %s, want its replay", r.status, r.header, r.body)
	}
	counts(3, "once the batch is complete", names[:2]...)
	counts(4, "once the batch is complete (with the warm-up's)", names[2])
	// Another request under the key is refused.
	other := sendWith(t, "POST", base+"/api/metrics", metricBody(names[0], sampleTime, 9), "Content-Type", "application/json", "Idempotency-Key", "batch-1")
	if other.status != 422 {
		t.Fatalf("another body under the key: %d %s, want 422", other.status, other.body)
	}
}

// TestClusterReshardUnderLoad moves the slot of a busy type to another
// master with redis-cli --cluster reshard while two instances write to
// it and read it: every write is acknowledged and every read answered,
// the client following MOVED and ASK and waiting out TRYAGAIN, and the
// type counts every acknowledged sample once.
func TestClusterReshardUnderLoad(t *testing.T) {
	c := ownCluster(t)
	cfg := testConfig(t)
	cfg.RedisCluster = c.addrs()
	prefix := testPrefix()
	clock := newFakeClock(storeEpoch)
	poolB := newRedisPool(cfg, nil)
	t.Cleanup(func() { poolB.Close() })
	bases := []string{
		serve(t, cfg, newRedisBackend(testPool(t, cfg, prefix), prefix, cfg, clock.now)),
		serve(t, cfg, newRedisBackend(poolB, prefix, cfg, clock.now)),
	}

	// The type on the first slot of a master, which is what reshard moves
	// first.
	st := c.layout(t)
	from := st.master(0)
	busy := typeOn(prefix, "busy", func(slot int) bool { return slot == 0 })
	var to string
	for _, m := range st.masters {
		if m != from {
			to = m
			break
		}
	}
	ids := map[string]string{}
	for _, n := range c.nodes {
		conn, err := redis.Dial("tcp", n.addr)
		if err != nil {
			t.Fatal(err)
		}
		ids[n.addr], err = redis.String(conn.Do("CLUSTER", "MYID"))
		conn.Close()
		if err != nil {
			t.Fatal(err)
		}
	}

	// Ten minutes of two hosts: a few thousand keys on the slot.
	start := sampleTime
	prefilled := 0
	for chunk := 0; chunk < 600; chunk += 200 {
		var items []string
		for s := chunk; s < chunk+200; s++ {
			for h := range 2 {
				items = append(items, fmt.Sprintf(`{"type":%q,"value":%d,"timestamp":%q,"labels":{"host":"h%d"}}`, busy, s%7, start.Add(time.Duration(s)*time.Second).Format(time.RFC3339), h))
			}
		}
		if r := post(t, bases[0], "["+strings.Join(items, ",")+"]"); r.status != 201 {
			t.Fatalf("prefill: %d %s", r.status, r.body)
		}
		prefilled += len(items)
	}

	var stored, reads, during atomic.Int64
	var resharding, moved atomic.Bool
	// The move starts once the load has been acknowledged a while, and the
	// load stops once it has gone on a while after the move.
	warmed, after := make(chan struct{}), make(chan struct{})
	var warm, cool sync.Once
	var afterMove atomic.Int64
	failures := make(chan string, 100)
	fail := func(f string) { // the first hundred are kept
		select {
		case failures <- f:
		default:
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				base := bases[(w+i)%2]
				if i%3 == 2 {
					res, err := http.Get(base + "/api/metrics/summary?metric_type=" + busy)
					if err != nil || res.StatusCode != 200 {
						fail(fmt.Sprintf("read: %v %v", err, res))
					}
					if res != nil {
						io.Copy(io.Discard, res.Body)
						res.Body.Close()
					}
					reads.Add(1)
					continue
				}
				// Into old buckets and new ones alike.
				at := start.Add(time.Duration((w*7919+i*31)%900) * time.Second).Format(time.RFC3339)
				r, err := tryPost(base, fmt.Sprintf(`{"type":%q,"value":1,"timestamp":%q,"labels":{"host":"h%d"}}`, busy, at, i%3))
				if err != nil || r.status != 201 {
					fail(fmt.Sprintf("write: %v %d %s", err, r.status, r.body))
					continue
				}
				if stored.Add(1) == 30 {
					warm.Do(func() { close(warmed) })
				}
				if resharding.Load() {
					during.Add(1)
				}
				if moved.Load() && afterMove.Add(1) == 30 {
					cool.Do(func() { close(after) })
				}
			}
		})
	}
	waitFor := func(ch chan struct{}, what string) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(10 * time.Second): // a bound, should the load fail
			close(stop)
			wg.Wait()
			t.Fatalf("%s: not 30 writes acknowledged within 10 s", what)
		}
	}
	waitFor(warmed, "before the move")
	resharding.Store(true)
	out, err := exec.Command("redis-cli", "--cluster", "reshard", from, "--cluster-from", ids[from], "--cluster-to", ids[to],
		"--cluster-slots", "1", "--cluster-yes", "--cluster-pipeline", "10").CombinedOutput()
	resharding.Store(false)
	moved.Store(true)
	if err == nil {
		waitFor(after, "after the move")
	}
	close(stop)
	wg.Wait()
	close(failures)
	if err != nil {
		t.Fatalf("reshard: %v\n%s", err, out)
	}
	for f := range failures {
		t.Error(f)
	}
	if now := c.layout(t).master(0); now != to {
		t.Fatalf("slot 0 is on %s after the reshard, want %s", now, to)
	}
	if during.Load() == 0 {
		t.Fatal("no write was acknowledged while the slot moved")
	}
	r := get(t, bases[1]+"/api/metrics/summary?metric_type="+busy)
	if got, want := r.json(t)["count"], float64(prefilled)+float64(stored.Load()); got != want {
		t.Fatalf("%s counts %v, want %v (%d prefilled, %d acknowledged under load)", busy, got, want, prefilled, stored.Load())
	}
	t.Logf("%d writes (%d while the slot moved) and %d reads under load", stored.Load(), during.Load(), reads.Load())
}

// TestClusterScriptFailingMidMigration: while a type's slot is migrating,
// Redis runs a script whose declared keys are all there, and fails it
// where it touches a key it did not declare that is gone. The ingest
// script touches such keys (retention's deletes of a series' old seconds)
// before any other write, so the failure stores nothing: the ingest is
// tried again until its deadline and answered 503, the type's count
// unchanged, and stored once the slot is stable again.
func TestClusterScriptFailingMidMigration(t *testing.T) {
	c := ownCluster(t)
	cfg := testConfig(t)
	cfg.RedisCluster = c.addrs()
	cfg.RedisTimeout = 300 * time.Millisecond
	prefix := testPrefix()
	pool := testPool(t, cfg, prefix)
	clock := newFakeClock(storeEpoch)
	base := serve(t, cfg, newRedisBackend(pool, prefix, cfg, clock.now))
	k := keys{prefix: prefix}
	at := func(s int) string { return sampleTime.Add(time.Duration(s) * time.Second).Format(time.RFC3339) }
	sample := func(host string, s int) string {
		return fmt.Sprintf(`{"type":"mig","value":1,"timestamp":%q,"labels":{"host":%q}}`, at(s), host)
	}
	var items []string
	for s := 0; s < 120; s += 2 { // every other second: half the names a sweep deletes are absent
		items = append(items, sample("a", s))
	}
	for _, body := range []string{"[" + strings.Join(items, ",") + "]", sample("a", 3700), sample("b", 3790)} {
		if r := post(t, base, body); r.status != 201 {
			t.Fatalf("%s: %d %s", body[:40], r.status, r.body)
		}
	}
	// Host a's sweep of its second minute is now due, at its next ingest.
	// Every key the script declares must exist for Redis to run it while
	// the slot migrates: the set of buckets to merge too.
	slot := keySlot(k.meta("mig"))
	st := c.layout(t)
	src := st.master(slot)
	var dst string
	ids := map[string]string{}
	conns := map[string]redis.Conn{}
	for _, n := range c.nodes {
		conn, err := redis.Dial("tcp", n.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conns[n.addr] = conn
		ids[n.addr], _ = redis.String(conn.Do("CLUSTER", "MYID"))
		if n.addr != src {
			dst = n.addr
		}
	}
	count := func() float64 {
		t.Helper()
		r := get(t, base+"/api/metrics/summary?metric_type=mig")
		if r.status != 200 {
			t.Fatalf("summary: %d %s", r.status, r.body)
		}
		return r.json(t)["count"].(float64)
	}
	before := count()
	if _, err := conns[src].Do("SADD", k.compactBuckets("mig"), "placeholder"); err != nil {
		t.Fatal(err)
	}
	for _, step := range [][]any{
		{dst, "IMPORTING", ids[src]},
		{src, "MIGRATING", ids[dst]},
	} {
		if _, err := conns[step[0].(string)].Do("CLUSTER", "SETSLOT", slot, step[1], step[2]); err != nil {
			t.Fatal(err)
		}
	}
	total := func() []byte { // the type's running total, as stored
		t.Helper()
		v, err := redis.Bytes(conns[src].Do("GET", k.bucket("mig", resAll, 0)))
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	stored := total()
	r := post(t, base, sample("a", 3700))
	if !bytes.Equal(total(), stored) {
		t.Fatal("the running total changed under a 503: the failed script wrote")
	}
	for _, addr := range []string{src, dst} {
		if _, err := conns[addr].Do("CLUSTER", "SETSLOT", slot, "STABLE"); err != nil {
			t.Fatal(err)
		}
	}
	if r.status != 503 {
		t.Fatalf("an ingest whose sweep meets a key gone mid-migration: %d %s, want 503", r.status, r.body)
	}
	if after := count(); after != before {
		t.Fatalf("count %v after the 503, was %v: the failed script wrote", after, before)
	}
	if r := post(t, base, sample("a", 3700)); r.status != 201 {
		t.Fatalf("once the slot is stable: %d %s", r.status, r.body)
	}
	if after := count(); after != before+1 {
		t.Fatalf("count %v, want %v", after, before+1)
	}
}

// TestClusterFaults drives one cluster's nodes into the states a client
// has to live with, one after the other: a hanging cache node, a hanging
// cluster at the service's start, a hanging node of the set of type names,
// one key under two bodies at once, a batch raced by writes into its types,
// a key moved during its slot's migration (ASK), a slot no master serves.
func TestClusterFaults(t *testing.T) {
	c := ownCluster(t)
	cfg := testConfig(t)
	cfg.RedisCluster = c.addrs()
	// The defaults, whose bounds SPEC gives.
	def, _ := loadConfig(func(string) string { return "" })
	cfg.RedisTimeout, cfg.LimiterTimeout = def.RedisTimeout, def.LimiterTimeout
	prefix := testPrefix()
	k := keys{prefix: prefix}
	clock := newFakeClock(storeEpoch)
	pool := testPool(t, cfg, prefix)
	base := serve(t, cfg, newRedisBackend(pool, prefix, cfg, clock.now))
	st := c.layout(t)
	conn := func(addr string) redis.Conn {
		t.Helper()
		cn, err := redis.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cn.Close() })
		return cn
	}
	pause := func(addr string, d time.Duration) {
		t.Helper()
		if _, err := conn(addr).Do("CLIENT", "PAUSE", d.Milliseconds(), "ALL"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn(addr).Do("CLIENT", "UNPAUSE") })
	}
	unpause := func(addr string) { conn(addr).Do("CLIENT", "UNPAUSE") }
	cacheNode := st.master(keySlot(k.cacheIndex()))
	typesNode := st.master(keySlot(k.types()))
	elsewhere := func(avoid ...string) func(int) bool {
		return func(slot int) bool { return !slices.Contains(avoid, st.master(slot)) }
	}

	t.Run("cache node hangs", func(t *testing.T) {
		typ := typeOn(prefix, "c", elsewhere(cacheNode))
		if r := post(t, base, metricBody(typ, sampleTime, 5)); r.status != 201 {
			t.Fatalf("%d %s", r.status, r.body)
		}
		pause(cacheNode, 2*time.Second)
		defer unpause(cacheNode)
		start := time.Now()
		r := get(t, base+"/api/metrics/summary?metric_type="+typ)
		if r.status != 200 || r.json(t)["count"] != 1.0 {
			t.Fatalf("a read of a type whose node is up, with the cache's node hung: %d %s, want its answer", r.status, r.body)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("the read took %v", d)
		}
	})

	t.Run("cluster hangs at the start", func(t *testing.T) {
		for _, addr := range st.masters {
			pause(addr, 3*time.Second)
		}
		defer func() {
			for _, addr := range st.masters {
				unpause(addr)
			}
		}()
		fresh := newRedisPool(cfg, nil) // no slot table yet
		defer fresh.Close()
		cold := serve(t, cfg, newRedisBackend(fresh, prefix, cfg, clock.now))
		var items []string
		for i := range 4 {
			items = append(items, metricBody(fmt.Sprintf("cold%d", i), sampleTime, 1))
		}
		start := time.Now()
		r := post(t, cold, "["+strings.Join(items, ",")+"]")
		if d := time.Since(start); r.status != 503 || d > 2*time.Second {
			t.Fatalf("a batch of 4 types on a hung cluster: %d after %v, want 503 within 2 s", r.status, d)
		}
	})

	t.Run("the node of the type names hangs", func(t *testing.T) {
		// A new type first, so that the connection to the node is open
		// when it hangs, and what is sent on it reaches Redis.
		if r := post(t, base, metricBody(typeOn(prefix, "warm", elsewhere(typesNode)), sampleTime, 1)); r.status != 201 {
			t.Fatalf("%d %s", r.status, r.body)
		}
		pause(typesNode, 1100*time.Millisecond) // past REDIS_TIMEOUT, short of failing the connection
		var wg sync.WaitGroup
		for i := range 10 {
			typ := typeOn(prefix, fmt.Sprintf("n%d-", i), elsewhere(typesNode))
			wg.Go(func() { tryPost(base, metricBody(typ, sampleTime, 1)) })
		}
		wg.Wait()
		// A registration Redis runs after the service gave up takes no
		// room: every name in the set is a type that holds data. The
		// read waits out the pause behind the registrations held by it,
		// which Redis then runs first.
		names, err := redis.Strings(conn(typesNode).Do("SMEMBERS", k.types()))
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			if v, _ := redis.Int(conn(st.master(keySlot(k.meta(n)))).Do("EXISTS", k.meta(n))); v != 1 {
				t.Errorf("%s takes MAX_TYPES room and holds nothing", n)
			}
		}
	})

	t.Run("one key, two bodies at once", func(t *testing.T) {
		types := []string{typeOn(prefix, "k", elsewhere()), typeOn(prefix, "l", elsewhere()), typeOn(prefix, "m", elsewhere())}
		for round := range 8 {
			bodies := make([]string, 2)
			for b := range bodies {
				var items []string
				for _, typ := range types {
					items = append(items, metricBody(fmt.Sprintf("%s%d", typ, round), sampleTime, float64(b+1)))
				}
				bodies[b] = "[" + strings.Join(items, ",") + "]"
			}
			statuses := make([]int, 2)
			var wg sync.WaitGroup
			for b := range bodies {
				wg.Go(func() {
					req, _ := http.NewRequest("POST", base+"/api/metrics", strings.NewReader(bodies[b]))
					req.Header.Set("Content-Type", "application/json")
					req.Header.Set("Idempotency-Key", fmt.Sprintf("two-%d", round))
					if res, err := http.DefaultClient.Do(req); err == nil {
						statuses[b] = res.StatusCode
						res.Body.Close()
					}
				})
			}
			wg.Wait()
			slices.Sort(statuses)
			if !slices.Equal(statuses, []int{201, 422}) {
				t.Fatalf("round %d: %v, want one 201 and one 422", round, statuses)
			}
			var sums []float64
			for _, typ := range types {
				r := get(t, base+"/api/metrics/summary?metric_type="+fmt.Sprintf("%s%d", typ, round))
				sums = append(sums, r.json(t)["sum"].(float64))
			}
			if sums[0] != sums[1] || sums[1] != sums[2] {
				t.Fatalf("round %d: the types hold %v: the two bodies mixed", round, sums)
			}
		}
	})

	t.Run("a batch racing writes into its types", func(t *testing.T) {
		// Two series a type: a batch bringing one to a type while two
		// single writes bring theirs is stored whole or refused whole.
		cfg := cfg
		cfg.MaxSeries = 2
		prefix := testPrefix()
		base := serve(t, cfg, newRedisBackend(testPool(t, cfg, prefix), prefix, cfg, clock.now))
		at := func(typ, host string) string {
			return fmt.Sprintf(`{"type":%q,"value":1,"timestamp":"2025-01-01T10:00:00Z","labels":{"host":%q}}`, typ, host)
		}
		outcomes := map[int]int{}
		for round := range 30 {
			x, y, z := fmt.Sprintf("x%d", round), fmt.Sprintf("y%d", round), fmt.Sprintf("z%d", round)
			batch := "[" + at(x, "p") + "," + at(y, "p") + "," + at(z, "p") + "]"
			var wg sync.WaitGroup
			var status int
			var body string
			wg.Go(func() {
				r, err := tryPost(base, batch)
				if err == nil {
					status, body = r.status, r.body
				}
			})
			for _, h := range []string{"q", "r"} {
				wg.Go(func() { tryPost(base, at(x, h)) })
			}
			wg.Wait()
			outcomes[status]++
			count := func(typ string) float64 {
				return get(t, base+"/api/metrics/summary?metric_type="+typ).json(t)["count"].(float64)
			}
			switch status {
			case 201:
				if count(y) != 1 || count(z) != 1 {
					t.Fatalf("round %d: 201, and y, z count %v, %v", round, count(y), count(z))
				}
			case 422:
				if count(y) != 0 || count(z) != 0 {
					t.Fatalf("round %d: 422 %s, and y, z count %v, %v: a refused batch stored part of itself", round, body, count(y), count(z))
				}
			default:
				t.Fatalf("round %d: %d %s, want 201 or 422", round, status, body)
			}
		}
		t.Logf("the batch's answers: %v", outcomes)
	})

	t.Run("a key moved during its slot's migration", func(t *testing.T) {
		// The source answers ASK for a key it no longer holds; the
		// command goes once to the target, after ASKING.
		key := prefix + "{asked}:k"
		slot := keySlot(key)
		src := st.master(slot)
		dst := st.masters[(slices.Index(st.masters, src)+1)%len(st.masters)]
		id := func(addr string) string {
			v, err := redis.String(conn(addr).Do("CLUSTER", "MYID"))
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
		if _, err := conn(src).Do("SET", key, "v"); err != nil {
			t.Fatal(err)
		}
		_, dport, _ := net.SplitHostPort(dst)
		for _, step := range [][]any{
			{dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", id(src)},
			{src, "CLUSTER", "SETSLOT", slot, "MIGRATING", id(dst)},
			{src, "MIGRATE", "127.0.0.1", dport, key, 0, 5000},
		} {
			if _, err := conn(step[0].(string)).Do(step[1].(string), step[2:]...); err != nil {
				t.Fatal(step, err)
			}
		}
		defer func() {
			for _, addr := range []string{src, dst} {
				conn(addr).Do("CLUSTER", "SETSLOT", slot, "NODE", id(src))
			}
			conn(src).Do("DEL", key)
		}()
		c := pool.Get()
		defer c.Close()
		if v, err := redis.String(c.Do("GET", key)); err != nil || v != "v" {
			t.Fatalf("GET of a key moved mid-migration: %q, %v", v, err)
		}
	})

	t.Run("a slot no master serves", func(t *testing.T) {
		owner := st.master(0)
		if _, err := conn(owner).Do("CLUSTER", "DELSLOTS", 0); err != nil {
			t.Fatal(err)
		}
		defer conn(owner).Do("CLUSTER", "ADDSLOTS", 0)
		if r := get(t, base+"/health"); r.status != 503 {
			t.Fatalf("/health with a slot unserved: %d %s, want 503", r.status, r.body)
		}
	})
}

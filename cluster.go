package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gomodule/redigo/redis"
)

// Redis Cluster (REDIS_CLUSTER). Every key is routed by its slot to the
// master that holds it, over that node's own pipeline and pool (a
// redisPool per node, as for a single Redis). The slot table comes from
// CLUSTER SLOTS; a MOVED reply sends the command to the node it names at
// once and has the table read again, an ASK sends it there once with
// ASKING first, and a TRYAGAIN (a slot half migrated) waits a little and
// tries again, all within the operation's deadline. Redis refuses a command
// or a MULTI ... EXEC block that would see a slot half migrated, so a block
// is never read torn.

const clusterSlots = 16384

// keySlot is the cluster slot of key: the CRC16 (XMODEM) of its hash tag,
// what lies between its first '{' and the next '}' when that is not
// empty, or of the whole key.
func keySlot(key string) int {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	var crc uint16
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc % clusterSlots)
}

// slotTable is which master serves each slot, as one CLUSTER SLOTS said.
type slotTable struct {
	masters []string             // host:port, sorted
	owner   [clusterSlots]uint16 // 1 + the index in masters; 0 for none
}

func (t *slotTable) master(slot int) string {
	if t == nil || t.owner[slot] == 0 {
		return ""
	}
	return t.masters[t.owner[slot]-1]
}

// cluster knows the cluster's layout and holds a redisPool per node.
type cluster struct {
	seeds   []string
	timeout time.Duration
	newNode func(addr string) *redisPool

	mu    sync.Mutex
	nodes map[string]*redisPool
	slots atomic.Pointer[slotTable]

	refreshes flightGroup
	// refreshing is a refresh started by a redirection, in the background;
	// close waits for it.
	refreshing sync.WaitGroup
	refreshed  atomic.Int64 // Unix ns of the last background refresh's start
}

// errNoSlotOwner is a key whose slot no known master serves.
var errNoSlotOwner = errors.New("redis cluster: no master serves the key's slot")

func (cl *cluster) node(addr string) *redisPool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	n, ok := cl.nodes[addr]
	if !ok {
		n = cl.newNode(addr)
		cl.nodes[addr] = n
	}
	return n
}

// close closes every node's pool.
func (cl *cluster) close() {
	cl.refreshing.Wait()
	cl.mu.Lock()
	defer cl.mu.Unlock()
	for _, n := range cl.nodes {
		n.Close()
	}
	cl.nodes = map[string]*redisPool{}
}

// refresh reads the slot table from the known masters and the seeds, all
// asked at once, and takes the first answer: one hung node costs no more
// than REDIS_TIMEOUT. Concurrent callers share one refresh.
func (cl *cluster) refresh(ctx context.Context) error {
	_, err := cl.refreshes.do(ctx, "slots", func(ctx context.Context) (any, error) {
		candidates := slices.Clone(cl.seeds)
		if t := cl.slots.Load(); t != nil {
			candidates = append(slices.Clone(t.masters), cl.seeds...)
		}
		candidates = distinct(candidates)
		type answer struct {
			t   *slotTable
			err error
		}
		answers := make(chan answer, len(candidates)) // buffered: the slow ones finish on their own
		for _, addr := range candidates {
			cl.refreshing.Add(1)
			go func() {
				defer cl.refreshing.Done()
				t, err := cl.readSlots(ctx, addr)
				if err != nil {
					err = fmt.Errorf("%s: %w", addr, err)
				}
				answers <- answer{t, err}
			}()
		}
		var errs []error
		for range candidates {
			a := <-answers
			if a.err == nil {
				cl.slots.Store(a.t)
				return nil, nil
			}
			errs = append(errs, a.err)
		}
		return nil, errors.Join(errs...)
	})
	return err
}

// refreshSoon reads the slot table again in the background, at most once
// per 100 ms: after a MOVED, or when a node failed.
func (cl *cluster) refreshSoon() {
	now := time.Now().UnixNano()
	last := cl.refreshed.Load()
	if now-last < int64(100*time.Millisecond) || !cl.refreshed.CompareAndSwap(last, now) {
		return
	}
	cl.refreshing.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), cl.timeout)
		defer cancel()
		cl.refresh(ctx)
	})
}

// readSlots asks one node for the cluster's slots and their masters.
func (cl *cluster) readSlots(ctx context.Context, addr string) (*slotTable, error) {
	var reply []any
	err := cl.node(addr).with(ctx, "cluster_slots", func(c redis.Conn, deadline time.Time) error {
		var err error
		reply, err = redis.Values(do(c, deadline, "CLUSTER", "SLOTS"))
		return err
	})
	if err != nil {
		return nil, err
	}
	return parseSlots(reply, addr)
}

// parseSlots reads a CLUSTER SLOTS reply: ranges of slots, each with its
// master's address first. A master announced with no host is the node
// that was asked (from).
func parseSlots(reply []any, from string) (*slotTable, error) {
	type span struct {
		first, last int64
		addr        string
	}
	var spans []span
	seen := map[string]bool{}
	for _, r := range reply {
		v, ok := r.([]any)
		if !ok || len(v) < 3 {
			return nil, errors.New("CLUSTER SLOTS: unexpected reply")
		}
		first, err1 := redis.Int64(v[0], nil)
		last, err2 := redis.Int64(v[1], nil)
		node, ok := v[2].([]any)
		if err1 != nil || err2 != nil || !ok || len(node) < 2 || first < 0 || last >= clusterSlots || first > last {
			return nil, errors.New("CLUSTER SLOTS: unexpected reply")
		}
		host, _ := redis.String(node[0], nil)
		port, err := redis.Int64(node[1], nil)
		if err != nil {
			return nil, errors.New("CLUSTER SLOTS: unexpected reply")
		}
		if host == "" || host == "?" {
			host, _, _ = net.SplitHostPort(from)
		}
		addr := net.JoinHostPort(host, strconv.FormatInt(port, 10))
		spans = append(spans, span{first, last, addr})
		seen[addr] = true
	}
	if len(spans) == 0 {
		return nil, errors.New("CLUSTER SLOTS: no slot is served")
	}
	t := &slotTable{}
	for addr := range seen {
		t.masters = append(t.masters, addr)
	}
	slices.Sort(t.masters)
	for _, s := range spans {
		i, _ := slices.BinarySearch(t.masters, s.addr)
		for slot := s.first; slot <= s.last; slot++ {
			t.owner[slot] = uint16(i + 1)
		}
	}
	return t, nil
}

// table is the slot table, read first if there is none yet.
func (cl *cluster) table(ctx context.Context) (*slotTable, error) {
	if t := cl.slots.Load(); t != nil {
		return t, nil
	}
	if err := cl.refresh(ctx); err != nil {
		return nil, err
	}
	return cl.slots.Load(), nil
}

// route is the address of the master serving key's slot; a keyless
// command ("") goes to the first master.
func (cl *cluster) route(ctx context.Context, key string) (string, error) {
	t, err := cl.table(ctx)
	if err != nil {
		return "", err
	}
	if key == "" {
		return t.masters[0], nil
	}
	slot := keySlot(key)
	if addr := t.master(slot); addr != "" {
		return addr, nil
	}
	// A slot no master serves may have been assigned since.
	if err := cl.refresh(ctx); err != nil {
		return "", err
	}
	if addr := cl.slots.Load().master(slot); addr != "" {
		return addr, nil
	}
	return "", errNoSlotOwner
}

// masters is the masters of the slot table, read first if need be.
func (cl *cluster) masters(ctx context.Context) ([]string, error) {
	t, err := cl.table(ctx)
	if err != nil {
		return nil, err
	}
	return t.masters, nil
}

// errClusterDown is a master that answers but says the cluster is not ok:
// it refuses every command on a key then.
var errClusterDown = errors.New("redis cluster: cluster_state is not ok")

// ping asks every master whether it answers and serves: a master answers
// PING even while the cluster, a master short, refuses every key.
func (cl *cluster) ping(ctx context.Context) error {
	masters, err := cl.masters(ctx)
	if err != nil {
		return err
	}
	errs := make([]error, len(masters))
	var wg sync.WaitGroup
	for i, addr := range masters {
		wg.Go(func() {
			errs[i] = cl.node(addr).with(ctx, "ping", func(c redis.Conn, deadline time.Time) error {
				info, err := redis.String(do(c, deadline, "CLUSTER", "INFO"))
				if err == nil && !strings.Contains(info, "cluster_state:ok") {
					err = errClusterDown
				}
				return err
			})
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		cl.refreshSoon()
		return err
	}
	return nil
}

// maxRedirects bounds how often one command is sent elsewhere after MOVED
// or ASK; its deadline bounds that and TRYAGAIN.
const maxRedirects = 16

// tryAgainWait is how long a command refused with TRYAGAIN first waits,
// twice that the next time, up to maxTryAgainWait: its slot is being
// migrated, key by key.
const (
	tryAgainWait    = 2 * time.Millisecond
	maxTryAgainWait = 50 * time.Millisecond
)

// clusterConn is a redis.Conn over a cluster: each command, or each MULTI
// ... EXEC block, goes to the master of its key's slot. A flush sends every
// node its share in one write, the nodes side by side, and the replies come
// back in the order the commands were sent.
type clusterConn struct {
	cl  *cluster
	ctx context.Context
	// deadline bounds a flush without a timeout of its own; zero: the
	// cluster's timeout from the flush.
	deadline time.Time
	// pooled takes each node's pooled connections, never its pipeline: for
	// what must not share one (the ingest script, as on a single Redis).
	pooled bool

	units   []*clusterUnit // sent, not flushed yet
	block   *clusterUnit   // a MULTI not closed yet
	replies []any          // flushed, not received yet; errors as values
}

var _ redis.ConnWithTimeout = (*clusterConn)(nil)

// clusterUnit is one command, or one MULTI ... EXEC block, sent to one node.
type clusterUnit struct {
	cmds    [][]any
	key     string // the first key, which routes it; "" for none
	target  string // where a MOVED or an ASK sent it; "" to route by key
	asking  bool   // send ASKING first (after an ASK)
	replies []any  // one per command
	err     error  // the connection's failure
}

// commandKey is the key that routes a command: the first argument, or the
// first key of a script; "" for a command without keys.
func commandKey(cmd string, args []any) string {
	switch strings.ToUpper(cmd) {
	case "EVAL", "EVALSHA":
		if len(args) > 2 {
			if n, _ := redis.Int(args[1], nil); n > 0 {
				return argString(args[2])
			}
		}
		return ""
	case "PING", "TIME", "INFO", "CLUSTER", "SCRIPT", "PUBLISH", "MULTI", "EXEC", "DISCARD", "ASKING", "CLIENT", "CONFIG", "DBSIZE", "KEYS", "SCAN", "FLUSHDB", "FLUSHALL":
		return ""
	}
	if len(args) == 0 {
		return ""
	}
	return argString(args[0])
}

func argString(a any) string {
	switch v := a.(type) {
	case string:
		return v
	case []byte:
		return string(v)
	}
	return fmt.Sprint(a)
}

func (c *clusterConn) Close() error { c.units, c.block, c.replies = nil, nil, nil; return nil }
func (c *clusterConn) Err() error   { return nil }

func (c *clusterConn) Send(cmd string, args ...any) error {
	line := append([]any{cmd}, args...)
	switch up := strings.ToUpper(cmd); {
	case up == "MULTI":
		c.block = &clusterUnit{cmds: [][]any{line}}
	case c.block != nil:
		c.block.cmds = append(c.block.cmds, line)
		if c.block.key == "" {
			c.block.key = commandKey(cmd, args)
		}
		if up == "EXEC" || up == "DISCARD" {
			c.units = append(c.units, c.block)
			c.block = nil
		}
	default:
		c.units = append(c.units, &clusterUnit{cmds: [][]any{line}, key: commandKey(cmd, args)})
	}
	return nil
}

func (c *clusterConn) Flush() error {
	return c.flush(c.opDeadline(0))
}

func (c *clusterConn) opDeadline(timeout time.Duration) time.Time {
	d := c.deadline
	if timeout > 0 && (d.IsZero() || time.Now().Add(timeout).Before(d)) {
		d = time.Now().Add(timeout)
	}
	if d.IsZero() {
		d = time.Now().Add(c.cl.timeout)
	}
	return d
}

func (c *clusterConn) Receive() (any, error) { return c.ReceiveWithTimeout(0) }

func (c *clusterConn) ReceiveWithTimeout(timeout time.Duration) (any, error) {
	if len(c.units) > 0 {
		if err := c.flush(c.opDeadline(timeout)); err != nil {
			return nil, err
		}
	}
	if len(c.replies) == 0 {
		return nil, errors.New("redis cluster: Receive without a reply pending")
	}
	r := c.replies[0]
	c.replies = c.replies[1:]
	if err, ok := r.(error); ok {
		return nil, err
	}
	return r, nil
}

func (c *clusterConn) Do(cmd string, args ...any) (any, error) {
	return c.DoWithTimeout(0, cmd, args...)
}

// DoWithTimeout is redigo's Do: with a command, its reply and the first
// error among the replies pending; without one, every pending reply.
func (c *clusterConn) DoWithTimeout(timeout time.Duration, cmd string, args ...any) (any, error) {
	if cmd != "" {
		c.Send(cmd, args...)
	}
	if err := c.flush(c.opDeadline(timeout)); err != nil {
		return nil, err
	}
	replies := c.replies
	c.replies = nil
	if cmd == "" {
		for _, r := range replies {
			if err, ok := r.(error); ok && !isRedisError(err) {
				return nil, err
			}
		}
		return replies, nil
	}
	if len(replies) == 0 {
		return nil, nil
	}
	var first error
	for _, r := range replies {
		if err, ok := r.(error); ok && first == nil {
			first = err
		}
	}
	last := replies[len(replies)-1]
	if _, ok := last.(error); ok {
		last = nil
	}
	return last, first
}

func isRedisError(err error) bool {
	_, ok := err.(redis.Error)
	return ok
}

// flush sends every unit sent since the last flush to its node, following
// redirections, and queues their replies.
func (c *clusterConn) flush(deadline time.Time) error {
	if c.block != nil {
		return errors.New("redis cluster: MULTI without EXEC")
	}
	units := c.units
	c.units = nil
	pending := units
	redirects, wait := 0, tryAgainWait
	for len(pending) > 0 {
		if redirects > maxRedirects || !time.Now().Before(deadline) {
			for _, u := range pending {
				if u.err == nil {
					u.err = fmt.Errorf("redis cluster: still redirected after %d redirections, or past the deadline", redirects)
				}
			}
			break
		}
		byNode := map[string][]*clusterUnit{}
		for _, u := range pending {
			addr := u.target
			if addr == "" {
				var err error
				ctx, cancel := context.WithDeadline(c.context(), deadline)
				addr, err = c.cl.route(ctx, u.key)
				cancel()
				if err != nil {
					u.err = err
					continue
				}
			}
			byNode[addr] = append(byNode[addr], u)
		}
		if len(byNode) == 1 {
			for addr, us := range byNode {
				c.runOn(addr, us, deadline)
			}
		} else {
			// A panic in a node's goroutine is the caller's, where the
			// request's recovery sees it, not the process's end.
			var wg sync.WaitGroup
			var panicked atomic.Value
			for addr, us := range byNode {
				wg.Go(func() {
					defer func() {
						if p := recover(); p != nil {
							panicked.Store(fmt.Sprintf("%v\n%s", p, debug.Stack()))
						}
					}()
					c.runOn(addr, us, deadline)
				})
			}
			wg.Wait()
			if p := panicked.Load(); p != nil {
				panic(p)
			}
		}
		var again []*clusterUnit
		tryAgain, redirected := false, false
		for _, u := range pending {
			if u.err != nil {
				continue
			}
			kind, addr := u.redirection()
			switch kind {
			case "MOVED":
				u.target, u.asking = addr, false
				redirected = true
				c.cl.refreshSoon()
			case "ASK":
				u.target, u.asking = addr, true
				redirected = true
			case "TRYAGAIN":
				u.target, u.asking = "", false
				tryAgain = true
			default:
				continue
			}
			again = append(again, u)
		}
		if redirected {
			redirects++
		}
		if tryAgain {
			// The slot is moving key by key: waiting longer each time,
			// up to the deadline.
			time.Sleep(min(wait, time.Until(deadline)))
			wait = min(2*wait, maxTryAgainWait)
		}
		pending = again
	}
	for _, u := range units {
		for i := range u.cmds {
			if u.err != nil {
				c.replies = append(c.replies, u.err)
			} else {
				c.replies = append(c.replies, u.replies[i])
			}
		}
	}
	return nil
}

func (c *clusterConn) context() context.Context {
	if c.ctx == nil {
		return context.Background()
	}
	return c.ctx
}

// runOn sends units to the node at addr in one write and reads their
// replies, setting each unit's replies, or its err when the connection
// fails.
func (c *clusterConn) runOn(addr string, units []*clusterUnit, deadline time.Time) {
	node := c.cl.node(addr)
	// The failure is counted by the operation's caller, as on one Redis.
	fail := func(err error) {
		for _, u := range units {
			u.err = err
		}
		c.cl.refreshSoon()
	}
	var conn redis.Conn
	var err error
	if c.pooled {
		ctx, cancel := context.WithDeadline(c.context(), deadline)
		conn, err = node.GetContext(ctx)
		cancel()
	} else {
		conn, err = node.borrow(c.context(), deadline)
	}
	if err != nil {
		fail(err)
		return
	}
	defer conn.Close()
	for _, u := range units {
		if u.asking {
			conn.Send("ASKING")
		}
		for _, cmd := range u.cmds {
			conn.Send(cmd[0].(string), cmd[1:]...)
		}
	}
	left := time.Until(deadline)
	if left <= 0 {
		fail(context.DeadlineExceeded)
		return
	}
	reply, err := redis.DoWithTimeout(conn, left, "")
	replies, _ := reply.([]any)
	if err == nil && len(replies) != countReplies(units) {
		err = errors.New("redis cluster: replies missing")
	}
	if err != nil {
		fail(err)
		return
	}
	for _, u := range units {
		if u.asking {
			replies = replies[1:]
		}
		// Redis's errors stay in the replies as redis.Error values.
		u.replies = replies[:len(u.cmds):len(u.cmds)]
		replies = replies[len(u.cmds):]
	}
}

func countReplies(units []*clusterUnit) int {
	n := 0
	for _, u := range units {
		n += len(u.cmds)
		if u.asking {
			n++
		}
	}
	return n
}

// redirection is how the unit's node sent it elsewhere: MOVED or ASK with
// the address, or TRYAGAIN; "" when it did not. A block's EXEC says so, or
// aborts because a command queued in it was redirected.
func (u *clusterUnit) redirection() (kind, addr string) {
	check := func(r any) (string, string) {
		e, ok := r.(redis.Error)
		if !ok {
			return "", ""
		}
		f := strings.Fields(string(e))
		switch {
		case len(f) == 3 && (f[0] == "MOVED" || f[0] == "ASK"):
			return f[0], f[2]
		case len(f) > 0 && f[0] == "TRYAGAIN":
			return "TRYAGAIN", ""
		case strings.Contains(string(e), "Script attempted to access a non local key"):
			// A key the script did not declare is half migrated; the
			// scripts touch such keys before any other write (see
			// lua/ingest.lua), so the script can run again.
			return "TRYAGAIN", ""
		}
		return "", ""
	}
	last := u.replies[len(u.replies)-1]
	if kind, addr = check(last); kind != "" || len(u.cmds) == 1 {
		return kind, addr
	}
	if e, ok := last.(redis.Error); ok && strings.HasPrefix(string(e), "EXECABORT") {
		for _, r := range u.replies[1 : len(u.replies)-1] {
			if kind, addr = check(r); kind != "" {
				return kind, addr
			}
		}
	}
	return "", ""
}

// newClusterPool is the redisPool of a cluster: its operations route each
// command (clusterConn) to a node's own redisPool, and its Pool hands out
// routing connections that take the nodes' pooled connections.
func newClusterPool(cfg config, tel *telemetry) *redisPool {
	p := &redisPool{timeout: cfg.RedisTimeout, tel: tel}
	if tel != nil {
		tel.redisConns = &p.open
	}
	cl := &cluster{seeds: cfg.RedisCluster, timeout: cfg.RedisTimeout, nodes: map[string]*redisPool{}}
	cl.newNode = func(addr string) *redisPool { return newNodePool(cfg, addr, tel, &p.open) }
	p.cluster = cl
	p.Pool = &redis.Pool{
		MaxIdle:     maxRedisConns,
		IdleTimeout: 5 * time.Minute,
		Dial: func() (redis.Conn, error) {
			return &clusterConn{cl: cl, pooled: true}, nil
		},
	}
	// The stream's subscriber listens on any node: a PUBLISH reaches every
	// node's subscribers. A node that fails is left for the next.
	var next atomic.Uint32
	p.dialOwn = func(ctx context.Context, readTimeout time.Duration) (redis.Conn, error) {
		addrs := slices.Clone(cfg.RedisCluster)
		if t := cl.slots.Load(); t != nil {
			addrs = append(slices.Clone(t.masters), addrs...)
		}
		addrs = distinct(addrs)
		var errs []error
		for range addrs {
			addr := addrs[int(next.Add(1))%len(addrs)]
			c, err := cl.node(addr).dialOwn(ctx, readTimeout)
			if err == nil {
				return c, nil
			}
			errs = append(errs, err)
			if ctx.Err() != nil {
				break
			}
		}
		return nil, errors.Join(errs...)
	}
	return p
}

// distinct is addrs without repeats, in their first order.
func distinct(addrs []string) []string {
	var out []string
	for _, a := range addrs {
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out
}

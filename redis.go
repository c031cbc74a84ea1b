package main

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gomodule/redigo/redis"
)

// redisPool is the one connection pool every Redis-backed component shares,
// with the deadline that bounds each of their round trips.
type redisPool struct {
	*redis.Pool
	timeout time.Duration
	tel     *telemetry // counts failed operations; nil counts nothing
	pings   flightGroup
	open    atomic.Int64 // connections open to Redis

	// checkIdleAfter is how long a connection may sit idle before it is
	// checked with a PING when borrowed. Set before the pool is used.
	checkIdleAfter time.Duration

	// pipe carries the request path's commands over shared connections
	// (pipeline.go); nil with REDIS_PIPELINE=false, when every operation
	// borrows a connection of the pool, as the stream's subscriber and
	// anything else stateful always does.
	pipe *pipeline

	// dialOwn opens a connection outside the pool, whose reads may wait
	// up to readTimeout: for the stream's subscriber, which blocks on
	// reads far longer than REDIS_TIMEOUT.
	dialOwn func(ctx context.Context, readTimeout time.Duration) (redis.Conn, error)

	// cluster routes every command by its key's slot (cluster.go); nil
	// for a single Redis.
	cluster *cluster

	// clockOffset is Redis's clock minus this host's, in microseconds,
	// measured on every new connection. Deadlines sent to Redis (the
	// ingest fence) are shifted by it, so the two clocks need not agree.
	clockOffset atomic.Int64
}

// readClock asks Redis for its time and records how far it is from ours,
// taking the middle of the round trip as the moment Redis read its clock.
func (p *redisPool) readClock(ctx context.Context, c redis.Conn) error {
	timeout := p.timeout
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(d))
	}
	before := time.Now()
	t, err := redis.Int64s(redis.DoWithTimeout(c, timeout, "TIME"))
	if err != nil {
		return err
	}
	if len(t) != 2 {
		return errors.New("TIME: unexpected reply")
	}
	mid := before.Add(time.Since(before) / 2)
	p.clockOffset.Store(t[0]*1_000_000 + t[1] - mid.UnixMicro())
	return nil
}

// redisMicros is t on Redis's clock, in Unix microseconds.
func (p *redisPool) redisMicros(t time.Time) int64 {
	return t.UnixMicro() + p.clockOffset.Load()
}

// maxRedisConns bounds the connections one instance opens. Requests beyond
// it wait for a free connection, up to their deadline, instead of piling new
// connections onto a Redis that is already slow.
const maxRedisConns = 64

const redisClientName = "analytics"

func newRedisPool(cfg config, tel *telemetry) *redisPool {
	if len(cfg.RedisCluster) > 0 {
		return newClusterPool(cfg, tel)
	}
	p := newNodePool(cfg, cfg.RedisAddr, tel, nil)
	if tel != nil {
		tel.redisConns = &p.open
	}
	return p
}

// newNodePool is the pool of one Redis at addr; its connections are counted
// in open (its own count when nil).
func newNodePool(cfg config, addr string, tel *telemetry, open *atomic.Int64) *redisPool {
	p := &redisPool{timeout: cfg.RedisTimeout, tel: tel, checkIdleAfter: time.Second}
	if open == nil {
		open = &p.open
	}
	dialer := &net.Dialer{Timeout: cfg.RedisTimeout, KeepAlive: 5 * time.Minute}
	// Every connection is counted from dial to close: the pool's own
	// counter includes dials in progress, this one what is open.
	dialCounted := func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dialer.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		open.Add(1)
		return &countedConn{Conn: c, open: open}, nil
	}
	opts := dialOptions(cfg, dialCounted)
	p.dialOwn = func(ctx context.Context, readTimeout time.Duration) (redis.Conn, error) {
		return redis.DialContext(ctx, "tcp", addr, append(slices.Clip(opts), redis.DialReadTimeout(readTimeout))...)
	}
	if cfg.RedisPipeline {
		// redigo dials and says hello (AUTH, SELECT, CLIENT SETNAME), the
		// clock is read on it, and the pipeline takes the bare connection.
		p.pipe = &pipeline{tel: tel, stall: cfg.RedisTimeout + ingestGrace, dialTimeout: cfg.RedisTimeout, dial: func(ctx context.Context) (net.Conn, error) {
			var raw net.Conn
			capture := redis.DialContextFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := dialCounted(ctx, network, addr)
				raw = c
				return c, err
			})
			c, err := redis.DialContext(ctx, "tcp", addr, append(slices.Clip(opts), capture)...)
			if err == nil {
				err = p.readClock(ctx, c)
			}
			if err != nil {
				if c != nil {
					c.Close()
				}
				return nil, err
			}
			raw.SetDeadline(time.Time{}) // redigo's, for the hello; the pipeline sets its own
			return raw, nil
		}}
	}
	p.Pool = &redis.Pool{
		MaxActive:   maxRedisConns,
		MaxIdle:     maxRedisConns,
		IdleTimeout: 5 * time.Minute,
		Wait:        true,
		DialContext: func(ctx context.Context) (redis.Conn, error) {
			c, err := redis.DialContext(ctx, "tcp", addr, opts...)
			if err == nil {
				if err = p.readClock(ctx, c); err != nil {
					c.Close()
				}
			}
			return c, err
		},
		// A connection that sat idle may point at a Redis that has
		// since restarted; check it before use rather than fail the
		// request that borrows it. Busy connections skip the check.
		// The check spends only the borrower's remaining time: redigo
		// tries the idle connections one after another, and against a
		// hung Redis each would otherwise take a full timeout.
		TestOnBorrowContext: func(ctx context.Context, c redis.Conn, lastUsed time.Time) error {
			if time.Since(lastUsed) < p.checkIdleAfter {
				return nil
			}
			timeout := cfg.RedisTimeout
			if d, ok := ctx.Deadline(); ok {
				timeout = min(timeout, time.Until(d))
			}
			if timeout <= 0 {
				return context.DeadlineExceeded
			}
			_, err := redis.DoWithTimeout(c, timeout, "PING")
			return err
		},
	}
	return p
}

// dialOptions are the options of every connection to Redis: deadlines,
// database, name and credentials.
func dialOptions(cfg config, dial func(ctx context.Context, network, addr string) (net.Conn, error)) []redis.DialOption {
	opts := []redis.DialOption{
		redis.DialContextFunc(dial),
		redis.DialReadTimeout(cfg.RedisTimeout),
		redis.DialWriteTimeout(cfg.RedisTimeout),
		redis.DialDatabase(cfg.RedisDB),
		// Named, so an operator's CLIENT LIST tells this service's
		// connections apart.
		redis.DialClientName(redisClientName),
	}
	if cfg.RedisPassword != "" {
		opts = append(opts, redis.DialPassword(cfg.RedisPassword))
	}
	if cfg.RedisUsername != "" {
		opts = append(opts, redis.DialUsername(cfg.RedisUsername))
	}
	return opts
}

// countedConn takes itself off the count of open connections when closed.
type countedConn struct {
	net.Conn
	open *atomic.Int64
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.open.Add(-1) })
	return c.Conn.Close()
}

// conn borrows a connection for one operation and returns the deadline that
// operation must meet: REDIS_TIMEOUT from now, or sooner if ctx says so.
func (p *redisPool) conn(ctx context.Context) (redis.Conn, time.Time, error) {
	deadline := time.Now().Add(p.timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	c, err := p.borrow(ctx, deadline)
	return c, deadline, err
}

// borrow is a connection for one operation that must start by deadline:
// the pipeline's, or one of the pool's.
func (p *redisPool) borrow(ctx context.Context, deadline time.Time) (redis.Conn, error) {
	if p.cluster != nil {
		return &clusterConn{cl: p.cluster, ctx: ctx, deadline: deadline}, nil
	}
	if p.pipe != nil {
		return &pipeOp{p: p.pipe, deadline: deadline}, nil
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	return p.GetContext(ctx)
}

// Close closes the pipeline's connection and the pool.
func (p *redisPool) Close() error {
	if p.cluster != nil {
		p.cluster.close()
	}
	if p.pipe != nil {
		p.pipe.close()
	}
	return p.Pool.Close()
}

// do runs one command with a deadline. It uses the connection's own read
// deadline rather than redis.DoContext, which spends a goroutine per call.
func do(c redis.Conn, deadline time.Time, cmd string, args ...any) (any, error) {
	left := time.Until(deadline)
	if left <= 0 {
		return nil, context.DeadlineExceeded
	}
	return redis.DoWithTimeout(c, left, cmd, args...)
}

// with borrows a connection, runs fn with it and the operation's deadline,
// and returns the connection to the pool. A failure is counted under op,
// unless it is a refusal the store meant (tooManyTypesError).
func (p *redisPool) with(ctx context.Context, op string, fn func(c redis.Conn, deadline time.Time) error) error {
	c, deadline, err := p.conn(ctx)
	if err == nil {
		err = fn(c, deadline)
		c.Close()
	}
	if tm := (*tooManyTypesError)(nil); err != nil && !errors.As(err, &tm) {
		p.tel.storeError(op)
	}
	return err
}

// ping asks Redis whether it answers. Concurrent health checks share the
// PING in flight: its answer arrives while each of them waits, so it says
// as much as a PING of their own would, and a burst of checks costs Redis
// one command.
func (p *redisPool) ping(ctx context.Context) error {
	if p.cluster != nil {
		return p.cluster.ping(ctx)
	}
	_, err := p.pings.do(ctx, "ping", func(ctx context.Context) (any, error) {
		return nil, p.with(ctx, "ping", func(c redis.Conn, deadline time.Time) error {
			_, err := do(c, deadline, "PING")
			return err
		})
	})
	return err
}

// script is a Lua script run by its hash, loaded on first use and again
// after a Redis restart has dropped it.
type script struct {
	src  string
	hash string
}

func newScript(src string) *script {
	h := sha1.Sum([]byte(src))
	return &script{src: src, hash: hex.EncodeToString(h[:])}
}

// run evaluates the script. EVALSHA failing with NOSCRIPT did not run
// anything, so falling back to EVAL cannot apply a write twice.
func (s *script) run(c redis.Conn, deadline time.Time, keys []string, args ...any) (any, error) {
	cmd := make([]any, 0, 2+len(keys)+len(args))
	cmd = append(cmd, s.hash, len(keys))
	for _, k := range keys {
		cmd = append(cmd, k)
	}
	cmd = append(cmd, args...)
	v, err := do(c, deadline, "EVALSHA", cmd...)
	if err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT") {
		cmd[0] = s.src
		v, err = do(c, deadline, "EVAL", cmd...)
	}
	return v, err
}

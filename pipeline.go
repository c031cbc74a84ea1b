package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gomodule/redigo/redis"
)

// pipeline multiplexes the commands of concurrent requests over one shared
// Redis connection (redialled when it fails), so that many requests' commands
// go out in one write and their replies come back in one read: on a loaded
// service a round trip costs each request a fraction of the system calls,
// and Redis a fraction of the CPU, of a connection of its own.
//
// A writer goroutine takes calls from a bounded queue and, before it
// flushes, yields to the scheduler a few times so that the requests woken
// meanwhile add theirs to the same write; a reader goroutine reads the
// replies in order and hands each call its own. A call is all the commands
// of one caller, written together, so MULTI ... EXEC and a script's
// EVALSHA stay in one piece.
//
// Deadlines stay the callers': a caller that gives up returns at once, and
// its replies are read and dropped when they come, so they can never reach
// another caller. There are no per-command socket deadlines, which would
// fail the connection for everyone; instead a connection that owes replies
// and delivers none for stall is failed, failing what it owes, and the
// next call dials a new one.
type pipeline struct {
	dial        func(ctx context.Context) (net.Conn, error)
	dialTimeout time.Duration // a dial's own, whoever's call started it
	stall       time.Duration
	tel         *telemetry // batch sizes; nil counts nothing

	mu      sync.Mutex
	current *pipeConn // nil until dialled, and after it failed
	dialing chan struct{}
	dialErr error
	closed  bool
}

var errPipelineClosed = errors.New("redis pipeline closed")

// pipeQueue bounds the calls waiting to be written on one connection; a
// caller finding it full waits, up to its deadline.
const pipeQueue = 4096

// pipeYields is how often the writer lets other goroutines run before it
// flushes what it holds: a writer that flushes as soon as one call is there
// runs as soon as the first caller blocks, and carries little more than
// that call. With two yields, 32 concurrent writers averaged about 4
// commands a write (TestPipelineBatches); 4 or 8 yields measured no better.
const pipeYields = 2

type pipeCall struct {
	cmds      [][]any // each: name, then args
	reply     []any   // one per command, or err
	err       error
	done      chan struct{}
	abandoned atomic.Bool // its caller gave up: not sent if not sent yet
}

type pipeConn struct {
	conn     net.Conn
	queue    chan *pipeCall
	inflight chan *pipeCall // written, awaiting replies, in order
	owed     atomic.Int64   // calls sent and not yet answered

	// The read deadline is the stall watchdog while replies are owed,
	// and none while none are; owing changes under this lock with it.
	deadline sync.Mutex
	stall    time.Duration
	tel      *telemetry

	failOnce sync.Once
	failed   chan struct{}
	err      error // set before failed is closed
}

var errPipelineFull = errors.New("redis pipeline: queue full until the deadline")

// do sends cmds as one call and waits for their replies until deadline.
func (p *pipeline) do(deadline time.Time, cmds [][]any) ([]any, error) {
	pc, err := p.conn(deadline)
	if err != nil {
		return nil, err
	}
	call := &pipeCall{cmds: cmds, done: make(chan struct{})}
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case pc.queue <- call:
	case <-pc.failed:
		return nil, pc.err
	case <-timer.C:
		return nil, errPipelineFull
	}
	select {
	case <-call.done:
		return call.reply, call.err
	case <-pc.failed:
		// Its replies will not come, unless they just did.
		select {
		case <-call.done:
			return call.reply, call.err
		default:
			call.abandoned.Store(true)
			return nil, pc.err
		}
	case <-timer.C:
		// Not sent, if the writer has not come to it; otherwise its
		// replies are read and dropped when they come.
		call.abandoned.Store(true)
		return nil, context.DeadlineExceeded
	}
}

// conn is the current connection, dialled by one caller for all when
// there is none; the others wait for that dial, up to their deadline.
func (p *pipeline) conn(deadline time.Time) (*pipeConn, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, errPipelineClosed
		}
		if pc := p.current; pc != nil {
			select {
			case <-pc.failed:
				p.current = nil
			default:
				p.mu.Unlock()
				return pc, nil
			}
		}
		if p.dialing == nil {
			p.dialing = make(chan struct{})
			go p.redial()
		}
		wait := p.dialing
		p.mu.Unlock()
		left := time.Until(deadline)
		if left <= 0 {
			return nil, context.DeadlineExceeded
		}
		t := time.NewTimer(left)
		select {
		case <-wait:
			t.Stop()
			p.mu.Lock()
			err := p.dialErr
			p.mu.Unlock()
			if err != nil {
				return nil, err
			}
		case <-t.C:
			return nil, context.DeadlineExceeded
		}
	}
}

// redial dials with a timeout of its own: the callers waiting for it each
// wait up to their own deadline, and the one whose call started it may
// have the least time of all.
func (p *pipeline) redial() {
	ctx, cancel := context.WithTimeout(context.Background(), p.dialTimeout)
	defer cancel()
	c, err := p.dial(ctx)
	p.mu.Lock()
	defer p.mu.Unlock()
	if err == nil && p.closed {
		c.Close()
		err = errPipelineClosed
	}
	p.dialErr = err
	if err == nil {
		p.current = startPipeConn(c, p.stall, p.tel)
	}
	close(p.dialing)
	p.dialing = nil
}

// close fails the current connection and every later call, for shutdown.
func (p *pipeline) close() {
	p.mu.Lock()
	pc := p.current
	p.current = nil
	p.closed = true
	p.mu.Unlock()
	if pc != nil {
		pc.fail(errPipelineClosed)
	}
}

func startPipeConn(c net.Conn, stall time.Duration, tel *telemetry) *pipeConn {
	pc := &pipeConn{conn: c, queue: make(chan *pipeCall, pipeQueue), inflight: make(chan *pipeCall, pipeQueue),
		stall: stall, tel: tel, failed: make(chan struct{})}
	go pc.write()
	go pc.read()
	return pc
}

// fail closes the connection and fails every call it holds, once.
func (pc *pipeConn) fail(err error) {
	pc.failOnce.Do(func() {
		pc.err = fmt.Errorf("redis pipeline: %w", err)
		close(pc.failed)
		pc.conn.Close()
		// Calls still queued or in flight get the error; the writer and
		// reader stop at the closed connection or at failed. A call the
		// writer was holding just then may miss it, and its caller
		// returns at its deadline instead.
		for {
			select {
			case call := <-pc.inflight:
				call.err = pc.err
				close(call.done)
			case call := <-pc.queue:
				call.err = pc.err
				close(call.done)
			default:
				return
			}
		}
	})
}

func (pc *pipeConn) write() {
	bw := bufio.NewWriterSize(pc.conn, 64<<10)
	var buf []byte
	for {
		var call *pipeCall
		select {
		case call = <-pc.queue:
		case <-pc.failed:
			return
		}
		// A write larger than the buffer goes to the socket at once: the
		// deadline covers the whole batch, from its first write.
		pc.conn.SetWriteDeadline(time.Now().Add(pc.stall))
		n := 0
		for yields := 0; call != nil; {
			if call.abandoned.Load() {
				call = pc.next(&yields)
				continue
			}
			buf = buf[:0]
			for _, cmd := range call.cmds {
				buf = appendCommand(buf, cmd)
			}
			n += len(call.cmds)
			pc.deadline.Lock()
			if pc.owed.Add(1) == 1 {
				pc.conn.SetReadDeadline(time.Now().Add(pc.stall))
			}
			pc.deadline.Unlock()
			select {
			case pc.inflight <- call:
			default:
				// As many calls in flight as it holds: what is written
				// goes out before the writer waits for the reader, or
				// the reader would wait for replies never sent.
				if err := bw.Flush(); err != nil {
					pc.fail(err)
					return
				}
				select {
				case pc.inflight <- call:
				case <-pc.failed:
					call.err = pc.err
					close(call.done)
					return
				}
			}
			if _, err := bw.Write(buf); err != nil {
				pc.fail(err)
				return
			}
			call = pc.next(&yields)
		}
		if n == 0 {
			continue
		}
		pc.conn.SetWriteDeadline(time.Now().Add(pc.stall))
		if err := bw.Flush(); err != nil {
			pc.fail(err)
			return
		}
		if pc.tel != nil {
			pc.tel.pipeBatches.observe(n)
		}
	}
}

// next is the next call to add to the write in progress, or nil when the
// queue stays empty after the writer has yielded pipeYields times in all.
func (pc *pipeConn) next(yields *int) *pipeCall {
	for *yields <= pipeYields {
		select {
		case call := <-pc.queue:
			return call
		default:
			if *yields < pipeYields {
				runtime.Gosched()
			}
			*yields++
		}
	}
	return nil
}

// read delivers replies in order. It waits on the connection even when no
// reply is owed, so that a connection Redis closed is failed at once, not
// by the next call that would find it dead.
func (pc *pipeConn) read() {
	br := bufio.NewReaderSize(pc.conn, 64<<10)
	for {
		if _, err := br.Peek(1); err != nil {
			pc.fail(err)
			return
		}
		var call *pipeCall
		select {
		case call = <-pc.inflight:
		case <-pc.failed:
			return
		}
		replies := make([]any, len(call.cmds))
		for i := range replies {
			r, err := readReply(br)
			if err != nil {
				call.err = fmt.Errorf("redis pipeline: %w", err)
				close(call.done)
				pc.fail(err)
				return
			}
			replies[i] = r
		}
		call.reply = replies
		close(call.done)
		pc.deadline.Lock()
		if pc.owed.Add(-1) == 0 {
			pc.conn.SetReadDeadline(time.Time{})
		} else {
			pc.conn.SetReadDeadline(time.Now().Add(pc.stall)) // progress: the watchdog starts again
		}
		pc.deadline.Unlock()
	}
}

// appendCommand is cmd in RESP: an array of bulk strings, each argument
// formatted as redigo formats it.
func appendCommand(b []byte, cmd []any) []byte {
	b = append(b, '*')
	b = strconv.AppendInt(b, int64(len(cmd)), 10)
	b = append(b, '\r', '\n')
	for _, a := range cmd {
		switch v := a.(type) {
		case string:
			b = appendBulk(b, v)
		case []byte:
			b = appendBulk(b, v)
		case int:
			b = appendBulk(b, strconv.AppendInt(nil, int64(v), 10))
		case int64:
			b = appendBulk(b, strconv.AppendInt(nil, v, 10))
		case uint64:
			b = appendBulk(b, strconv.AppendUint(nil, v, 10))
		case float64:
			b = appendBulk(b, strconv.AppendFloat(nil, v, 'g', -1, 64))
		case bool: // as redigo sends it
			if v {
				b = appendBulk(b, "1")
			} else {
				b = appendBulk(b, "0")
			}
		case nil:
			b = appendBulk(b, "")
		default:
			b = appendBulk(b, fmt.Sprint(v))
		}
	}
	return b
}

func appendBulk[T string | []byte](b []byte, s T) []byte {
	b = append(b, '$')
	b = strconv.AppendInt(b, int64(len(s)), 10)
	b = append(b, '\r', '\n')
	b = append(b, s...)
	return append(b, '\r', '\n')
}

// readReply reads one RESP2 reply as redigo returns it: a status as a
// string, an error as redis.Error, an integer as int64, a bulk string as
// []byte, an array as []any, and a null as nil.
func readReply(br *bufio.Reader) (any, error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return nil, err
	}
	if len(line) < 3 || line[len(line)-2] != '\r' {
		return nil, errors.New("malformed reply line")
	}
	body := line[1 : len(line)-2]
	switch line[0] {
	case '+':
		return string(body), nil
	case '-':
		return redis.Error(body), nil
	case ':':
		return strconv.ParseInt(string(body), 10, 64)
	case '$':
		n, err := strconv.Atoi(string(body))
		if err != nil || n < -1 || n > 512<<20 { // Redis's own limit on a string
			return nil, errors.New("malformed bulk length")
		}
		if n == -1 {
			return nil, nil
		}
		v := make([]byte, n+2)
		if _, err := io.ReadFull(br, v); err != nil {
			return nil, err
		}
		return v[:n], nil
	case '*':
		n, err := strconv.Atoi(string(body))
		if err != nil || n < -1 {
			return nil, errors.New("malformed array length")
		}
		if n == -1 {
			return nil, nil
		}
		out := make([]any, n)
		for i := range out {
			if out[i], err = readReply(br); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown reply type %q", line[0])
}

// pipeOp is a redis.Conn for one operation on the pipeline, so that the
// stores' code reads the same on it as on a pooled connection: Send queues
// a command here; Do (or DoWithTimeout) sends what was queued and its own
// command as one call and answers as redigo does, "" for the command
// returning every reply.
type pipeOp struct {
	p        *pipeline
	deadline time.Time // the operation's, for Do, Flush and Receive without a timeout
	cmds     [][]any
	pending  []any // replies of a Flush, for Receive
}

var _ redis.ConnWithTimeout = (*pipeOp)(nil)

func (o *pipeOp) Close() error { o.cmds = nil; return nil }
func (o *pipeOp) Err() error   { return nil }

func (o *pipeOp) Send(cmd string, args ...any) error {
	o.cmds = append(o.cmds, append([]any{cmd}, args...))
	return nil
}

func (o *pipeOp) Flush() error {
	replies, err := o.p.do(o.deadline, o.cmds)
	o.cmds = nil
	o.pending = append(o.pending, replies...)
	return err
}

func (o *pipeOp) Receive() (any, error) { return o.ReceiveWithTimeout(0) }

func (o *pipeOp) ReceiveWithTimeout(time.Duration) (any, error) {
	if len(o.pending) == 0 {
		return nil, errors.New("redis pipeline: Receive without a reply pending")
	}
	r := o.pending[0]
	o.pending = o.pending[1:]
	if e, ok := r.(redis.Error); ok {
		return nil, e
	}
	return r, nil
}

func (o *pipeOp) Do(cmd string, args ...any) (any, error) {
	return o.DoWithTimeout(time.Until(o.deadline), cmd, args...)
}

func (o *pipeOp) DoWithTimeout(timeout time.Duration, cmd string, args ...any) (any, error) {
	if cmd != "" {
		o.Send(cmd, args...)
	}
	cmds := o.cmds
	o.cmds = nil
	if len(cmds) == 0 {
		return nil, nil
	}
	replies, err := o.p.do(time.Now().Add(timeout), cmds)
	if err != nil {
		return nil, err
	}
	if cmd == "" {
		return replies, nil
	}
	for _, r := range replies {
		if e, ok := r.(redis.Error); ok {
			return replies[len(replies)-1], e
		}
	}
	return replies[len(replies)-1], nil
}

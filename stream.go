package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The live stream, GET /api/metrics/stream: what each acknowledged ingest
// added to the 1 s buckets of its series, sent to browsers as server-sent
// events.
//
// An ingest's additions (updatesOf) reach the hub in process (memory
// store) or through a Redis channel that every instance's subscriber reads
// (subscribe.go), so a POST to any instance reaches the streams of all.
// The hub merges what arrives for flushEvery into one frame and hands it to
// every client. A client whose writer has not sent the last frame yet gets
// the new one merged into what it holds, up to maxPendingPoints; past that
// it is told to read everything again (resync). Nothing on the ingest path
// waits for a client: handing over is a merge under the client's lock and a
// wake-up that never blocks.

// point is what ingests added to one 1 s bucket.
type point struct {
	sec int64 // its start, Unix seconds
	stats
}

// update is what one ingest added to one series' 1 s buckets; with a
// resync reason, it says instead that the type changed in a way events do
// not carry, so its clients should read it again.
type update struct {
	typ    string
	series string  // the series id; unused with resync
	points []point // by second
	resync string  // "" for points
}

// Why a type is resynced.
const (
	resyncLarge    = "large update" // more points than an event carries
	resyncBackfill = "backfill"     // data older than the 1 s buckets keep
	resyncDeleted  = "deleted"      // series or the whole type deleted (delete.go)
)

const (
	// maxEventPoints is the most points one event carries; a series with
	// more new ones has its type resynced instead.
	maxEventPoints = 60
	// maxIngestPoints is the most points one ingest sends of one type,
	// over all its series; a larger ingest resyncs the type.
	maxIngestPoints = 1000
	// fullFramePoints is where the hub sends a frame without waiting for
	// the rest of flushEvery; maxFramePoints bounds what it merges between
	// two frames, beyond which (frames not keeping up) every stream is
	// resynced.
	fullFramePoints = 5_000
	maxFramePoints  = 10_000
	// maxPendingPoints bounds what one client holds unsent besides the
	// frame it was handed last; beyond it the client is resynced and
	// counted in stream_dropped_total.
	maxPendingPoints = 5_000
)

// updatesOf is what an acknowledged ingest of batches sends: the 1 s
// buckets of each series it added to. A type whose part is too large for
// events, or that went to buckets retention keeps only coarser than 1 s as
// of anchor (a backfill), is resynced instead.
func updatesOf(batches []typeBatch, anchor int64, h retention) []update {
	var out []update
	for _, b := range batches {
		first, n := len(out), 0
		if !h.keeps(res1s, floorDiv(b.first, 1_000_000), anchor) {
			out = append(out, update{typ: b.typ, resync: resyncBackfill})
			continue
		}
		for _, sb := range b.series {
			var pts []point
			for _, d := range sb.deltas {
				if d.res != res1s {
					break // deltas come finest first
				}
				pts = append(pts, point{d.start, d.stats})
			}
			n += len(pts)
			if len(pts) > maxEventPoints || n > maxIngestPoints {
				out = append(out[:first], update{typ: b.typ, resync: resyncLarge})
				break
			}
			out = append(out, update{typ: b.typ, series: sb.id, points: pts})
		}
	}
	return out
}

// ---- merging ----

// pending is updates merged: per type and series the points by second, the
// types to read again, or, with all set, everything to read again (and
// nothing else kept). The hub gathers one between frames; a client holds
// one of what it has not sent yet.
type pending struct {
	series map[string]map[string][]point // by type, then series id
	resync map[string]string             // the types to read again, with why
	all    string                        // why every type must be read again; "" when not
	points int
}

func newPending() *pending {
	return &pending{series: map[string]map[string][]point{}, resync: map[string]string{}}
}

func (p *pending) empty() bool { return p.all == "" && len(p.resync) == 0 && len(p.series) == 0 }

// resyncAll drops everything for one resync of every type.
func (p *pending) resyncAll(reason string) {
	if p.all == "" {
		*p = pending{series: map[string]map[string][]point{}, resync: map[string]string{}, all: reason}
	}
}

func (p *pending) resyncType(typ, reason string) {
	if p.all != "" || p.resync[typ] != "" {
		return
	}
	p.resync[typ] = reason
	for _, pts := range p.series[typ] {
		p.points -= len(pts)
	}
	delete(p.series, typ)
}

// add merges pts into the series' points. Slices given or held are never
// changed in place, so one frame's points can be merged into many clients.
func (p *pending) add(typ, id string, pts []point, limit int) {
	if p.all != "" || p.resync[typ] != "" || len(pts) == 0 {
		return
	}
	byID := p.series[typ]
	if byID == nil {
		byID = map[string][]point{}
		p.series[typ] = byID
	}
	had := byID[id]
	merged := mergePoints(had, pts)
	if len(merged) > maxEventPoints {
		p.resyncType(typ, resyncLarge)
		return
	}
	byID[id] = merged
	p.points += len(merged) - len(had)
	if p.points > limit {
		p.resyncAll("too many updates")
	}
}

// mergePoints is a and b (each by second) merged, a bucket in both summed.
// It returns one of them when the other is empty, and a new slice
// otherwise.
func mergePoints(a, b []point) []point {
	if len(a) == 0 {
		return b
	}
	if len(b) == 0 {
		return a
	}
	out := make([]point, 0, len(a)+len(b))
	for len(a) > 0 && len(b) > 0 {
		switch {
		case a[0].sec < b[0].sec:
			out, a = append(out, a[0]), a[1:]
		case b[0].sec < a[0].sec:
			out, b = append(out, b[0]), b[1:]
		default:
			m := a[0]
			m.merge(b[0].stats)
			out, a, b = append(out, m), a[1:], b[1:]
		}
	}
	return append(append(out, a...), b...)
}

// merge adds o's updates of the types wanted (nil: all).
func (p *pending) merge(o *pending, wanted map[string]bool, limit int) {
	if o.all != "" {
		p.resyncAll(o.all)
		return
	}
	for typ, reason := range o.resync {
		if wanted == nil || wanted[typ] {
			p.resyncType(typ, reason)
		}
	}
	for typ, byID := range o.series {
		if wanted != nil && !wanted[typ] {
			continue
		}
		for id, pts := range byID {
			p.add(typ, id, pts, limit)
		}
	}
}

// ---- events ----

// event is one server-sent event, rendered, with the type it is about (""
// for one about every type).
type event struct {
	typ  string
	text []byte
}

type eventPoint struct {
	Time  string  `json:"time"`
	Count int64   `json:"count"`
	Sum   float64 `json:"sum"`
	Min   float64 `json:"min"`
	Max   float64 `json:"max"`
}

type metricEvent struct {
	Type   string            `json:"type"`
	Labels map[string]string `json:"labels"`
	Points []eventPoint      `json:"points"`
}

type resyncEvent struct {
	Type   string `json:"type,omitempty"` // absent: every type
	Reason string `json:"reason"`
}

// events renders p: a resync of everything, or the types' resyncs, then
// one metric event per series, by type and id.
func (p *pending) events() []event {
	if p.all != "" {
		return []event{{"", sse("resync", resyncEvent{Reason: p.all})}}
	}
	var out []event
	for _, typ := range slices.Sorted(maps.Keys(p.resync)) {
		out = append(out, event{typ, sse("resync", resyncEvent{Type: typ, Reason: p.resync[typ]})})
	}
	for _, typ := range slices.Sorted(maps.Keys(p.series)) {
		byID := p.series[typ]
		for _, id := range slices.Sorted(maps.Keys(byID)) {
			labels, _ := parseSeriesID(id) // made by seriesID
			e := metricEvent{Type: typ, Labels: make(map[string]string, len(labels))}
			for _, l := range labels {
				e.Labels[l.name] = l.value
			}
			for _, pt := range byID[id] {
				sum := finite(pt.sum) // merged sums may overflow
				if math.IsNaN(sum) {
					sum = 0 // +Inf and -Inf merged: nothing JSON can say
				}
				e.Points = append(e.Points, eventPoint{formatTime(pt.sec), pt.count, sum, pt.min, pt.max})
			}
			out = append(out, event{typ, sse("metric", e)})
		}
	}
	return out
}

// sse is one event in the text/event-stream format. The data is JSON on
// one line, so it needs no splitting.
func sse(name string, data any) []byte {
	body, err := json.Marshal(data)
	if err != nil {
		panic(fmt.Sprintf("sse %T: %v", data, err)) // only plain types get here
	}
	out := make([]byte, 0, len(body)+len(name)+16)
	out = append(out, "event: "...)
	out = append(out, name...)
	out = append(out, "\ndata: "...)
	out = append(out, body...)
	return append(out, "\n\n"...)
}

// ---- the hub ----

// hub hands what ingests add to the open streams of this instance. The
// zero value is not usable; newHub makes one. Its fields other than the
// lock-guarded ones are set before it is used.
type hub struct {
	instance string // names this process in hello events
	max      int    // MAX_STREAMS

	// flushEvery is how long the hub gathers updates into one frame,
	// pingEvery how often an idle stream gets a comment, writeTimeout how
	// long one write to a client may take before the client is dropped.
	flushEvery, pingEvery, writeTimeout time.Duration

	mu      sync.Mutex
	clients map[*streamClient]bool
	acc     *pending // updates since the last frame

	open     atomic.Int64  // streams open, for stream_clients
	dropped  atomic.Uint64 // streams resynced or closed for being slow
	kick     chan struct{} // one slot: acc has something
	full     chan struct{} // one slot: acc is large enough to send now
	done     chan struct{} // closed at shutdown
	shutOnce sync.Once
}

func newHub(maxStreams int) *hub {
	host, _ := os.Hostname()
	return &hub{
		instance:     fmt.Sprintf("%s-%04x", cmp.Or(host, "analytics"), rand.Uint32()&0xffff),
		max:          maxStreams,
		flushEvery:   100 * time.Millisecond,
		pingEvery:    10 * time.Second,
		writeTimeout: 10 * time.Second,
		clients:      map[*streamClient]bool{},
		acc:          newPending(),
		kick:         make(chan struct{}, 1),
		full:         make(chan struct{}, 1),
		done:         make(chan struct{}),
	}
}

// idle reports whether no stream is open, so updates need not be made.
func (h *hub) idle() bool { return h.open.Load() == 0 }

// publish hands updates to the hub. It never waits for a client.
func (h *hub) publish(updates []update) {
	if h.idle() || len(updates) == 0 {
		return
	}
	h.mu.Lock()
	for _, u := range updates {
		if u.resync != "" {
			h.acc.resyncType(u.typ, u.resync)
		} else {
			h.acc.add(u.typ, u.series, u.points, maxFramePoints)
		}
	}
	full := h.acc.points >= fullFramePoints
	h.mu.Unlock()
	h.signal()
	if full {
		select {
		case h.full <- struct{}{}:
		default:
		}
	}
}

// resyncAll tells every stream to read everything again, as after a lost
// connection to Redis, when updates may have been missed.
func (h *hub) resyncAll(reason string) {
	h.mu.Lock()
	h.acc.resyncAll(reason)
	h.mu.Unlock()
	h.signal()
}

func (h *hub) signal() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// run sends a frame of what arrived, at most every flushEvery, until stop
// is closed.
func (h *hub) run(stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		case <-h.kick:
		}
		// What arrives within flushEvery of the first update goes into
		// the same frame, unless there is enough for a frame sooner.
		t := time.NewTimer(h.flushEvery)
		select {
		case <-stop:
			t.Stop()
			return
		case <-t.C:
		case <-h.full:
			t.Stop()
		}
		h.mu.Lock()
		f := h.acc
		h.acc = newPending()
		clients := slices.Collect(maps.Keys(h.clients))
		h.mu.Unlock()
		if f.empty() {
			continue
		}
		fr := &frame{p: f, events: f.events()}
		for _, c := range clients {
			if c.hand(fr) {
				h.dropped.Add(1)
			}
		}
	}
}

// frame is what the hub hands every client at once: merged updates and
// their events, rendered once for all.
type frame struct {
	p      *pending
	events []event
}

var (
	errTooManyStreams = errors.New("too many open streams")
	errShuttingDown   = errors.New("shutting down")
)

// join opens a client for the types given (nil: every type).
func (h *hub) join(types map[string]bool) (*streamClient, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closing() {
		return nil, errShuttingDown
	}
	if len(h.clients) >= h.max {
		return nil, errTooManyStreams
	}
	c := &streamClient{types: types, wake: make(chan struct{}, 1)}
	h.clients[c] = true
	h.open.Store(int64(len(h.clients)))
	return c, nil
}

func (h *hub) leave(c *streamClient) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.clients, c)
	h.open.Store(int64(len(h.clients)))
}

// shutdown ends every stream, for the server's Shutdown, which otherwise
// waits for them.
func (h *hub) shutdown() { h.shutOnce.Do(func() { close(h.done) }) }

func (h *hub) closing() bool {
	select {
	case <-h.done:
		return true
	default:
		return false
	}
}

// drop counts a client closed or resynced for being slow, once however
// often it is.
func (h *hub) drop(c *streamClient) {
	c.mu.Lock()
	first := !c.dropped
	c.dropped = true
	c.mu.Unlock()
	if first {
		h.dropped.Add(1)
	}
}

// streamClient is one open stream's unsent updates: a frame as the hub
// handed it, while the client has taken nothing since, or its own merge of
// several.
type streamClient struct {
	types map[string]bool // nil: every type
	wake  chan struct{}   // one slot: something to send

	mu      sync.Mutex
	shared  *frame
	own     *pending
	dropped bool // counted in stream_dropped_total already
}

// hand gives the client a frame. It reports whether this made the client
// too far behind, so that it is resynced.
func (c *streamClient) hand(f *frame) (dropped bool) {
	c.mu.Lock()
	switch {
	case c.shared == nil && c.own == nil:
		c.shared = f
	default:
		if c.own == nil {
			c.own = newPending()
			c.own.merge(c.shared.p, c.types, maxPendingPoints)
			c.shared = nil
		}
		wasAll := c.own.all != ""
		c.own.merge(f.p, c.types, maxPendingPoints)
		if !wasAll && c.own.all != "" && f.p.all == "" {
			c.own.all = "slow client"
			dropped = !c.dropped
			c.dropped = true
		}
	}
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return dropped
}

// take is the text of what the client has to send, and clears it. The
// texts of a frame as handed are shared with other clients, not copied.
func (c *streamClient) take() [][]byte {
	c.mu.Lock()
	shared, own := c.shared, c.own
	c.shared, c.own = nil, nil
	c.mu.Unlock()
	var events []event
	switch {
	case own != nil:
		events = own.events()
	case shared != nil:
		events = shared.events
	}
	var out [][]byte
	for _, e := range events {
		if e.typ == "" || c.types == nil || c.types[e.typ] {
			out = append(out, e.text)
		}
	}
	return out
}

// ---- the handler ----

var (
	streamRetry = []byte("retry: 3000\n\n")
	streamPing  = []byte(": ping\n\n")
)

func handleStream(log *slog.Logger, h *hub) http.Handler {
	hello := sse("hello", struct {
		Instance string `json:"instance"`
	}{h.instance})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		types, err := parseStreamTypes(r.URL.Query())
		if err != nil {
			writeFailure(w, r, log, err)
			return
		}
		c, err := h.join(types)
		if err != nil {
			detail := "the service is shutting down; try again shortly"
			if err == errTooManyStreams {
				detail = fmt.Sprintf("too many open streams (MAX_STREAMS is %d); try again later", h.max)
			}
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, detail)
			return
		}
		defer h.leave(c)

		// The server's ReadTimeout does not end the stream: net/http
		// clears the read deadline once the request is read.
		rc := http.NewResponseController(w)
		hd := w.Header()
		hd.Set("Content-Type", "text/event-stream")
		hd.Set("Cache-Control", "no-cache")
		hd.Set("X-Accel-Buffering", "no") // nginx would buffer the stream
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodHead {
			return // the headers are the whole answer; a stream would hold the connection
		}
		// Each write gets its own deadline, so the server's WriteTimeout
		// does not cut the stream, and a client that stops reading is
		// dropped once its connection's buffers are full for that long.
		// At shutdown the deadline becomes now, which also ends a write
		// that is blocked on such a client; the lock orders the two, so
		// a write that starts after shutdown does not set a later one.
		var deadlines sync.Mutex
		closing := false
		write := func(b ...[]byte) error {
			deadlines.Lock()
			if closing {
				deadlines.Unlock()
				return errShuttingDown
			}
			rc.SetWriteDeadline(time.Now().Add(h.writeTimeout))
			deadlines.Unlock()
			for _, p := range b {
				if _, err := w.Write(p); err != nil {
					return err
				}
			}
			return rc.Flush()
		}
		ended := make(chan struct{})
		defer close(ended)
		go func() {
			select {
			case <-h.done:
				deadlines.Lock()
				closing = true
				rc.SetWriteDeadline(time.Now())
				deadlines.Unlock()
			case <-ended:
			}
		}()

		err = write(streamRetry, hello)
		ping := time.NewTicker(h.pingEvery)
		defer ping.Stop()
		for err == nil {
			select {
			case <-r.Context().Done():
				return
			case <-h.done:
				return
			case <-ping.C:
				err = write(streamPing)
			case <-c.wake:
				if texts := c.take(); len(texts) > 0 {
					err = write(texts...)
					ping.Reset(h.pingEvery)
				}
			}
		}
		if errors.Is(err, os.ErrDeadlineExceeded) && !h.closing() {
			h.drop(c) // closed for being slow
		}
	})
}

// parseStreamTypes reads the metric_type parameters of a stream (none:
// every type).
func parseStreamTypes(q url.Values) (map[string]bool, error) {
	names := q["metric_type"]
	if len(names) == 0 {
		return nil, nil
	}
	types := map[string]bool{}
	for _, t := range names {
		if err := validType(t); err != nil {
			return nil, unprocessable("metric_type %q: %s", truncate(t, 70), strings.TrimPrefix(err.Error(), "type "))
		}
		types[t] = true
	}
	return types, nil
}

// ---- the wire form between instances ----

// encodeUpdates is updates as one message for the Redis channel: a line
// per update, its fields separated by tabs, which neither type names nor
// series ids hold. "R type reason" resyncs a type; "P type id point..."
// carries points, each "second count sum min max", the floats exact.
func encodeUpdates(updates []update) []byte {
	var b []byte
	for _, u := range updates {
		if u.resync != "" {
			b = append(append(append(append(append(b, "R\t"...), u.typ...), '\t'), u.resync...), '\n')
			continue
		}
		b = append(append(append(append(append(b, "P\t"...), u.typ...), '\t'), u.series...), '\t')
		for i, p := range u.points {
			if i > 0 {
				b = append(b, '\t')
			}
			b = strconv.AppendInt(b, p.sec, 10)
			b = append(b, ' ')
			b = strconv.AppendInt(b, p.count, 10)
			for _, f := range []float64{p.sum, p.min, p.max} {
				b = append(b, ' ')
				b = strconv.AppendFloat(b, f, 'g', -1, 64)
			}
		}
		b = append(b, '\n')
	}
	return b
}

// decodeUpdates reads what encodeUpdates wrote, and refuses anything else:
// the channel is open to whoever can reach Redis, and what it carries goes
// into events, whose JSON has no room for a NaN or an infinity.
func decodeUpdates(msg []byte) ([]update, error) {
	var out []update
	for line := range bytes.Lines(msg) {
		f := strings.Split(strings.TrimSuffix(string(line), "\n"), "\t")
		bad := func(why string) error {
			return fmt.Errorf("stream message: %s in line %q", why, truncate(string(line), 60))
		}
		if len(f) < 3 || validType(f[1]) != nil {
			return nil, bad("no valid type")
		}
		switch {
		case f[0] == "R" && len(f) == 3:
			if f[2] != resyncLarge && f[2] != resyncBackfill && f[2] != resyncDeleted {
				return nil, bad("unknown resync reason")
			}
			out = append(out, update{typ: f[1], resync: f[2]})
		case f[0] == "P" && len(f) >= 4 && len(f) <= 3+maxEventPoints:
			if _, err := parseSeriesID(f[2]); err != nil {
				return nil, bad("malformed series id")
			}
			u := update{typ: f[1], series: f[2], points: make([]point, 0, len(f)-3)}
			for _, s := range f[3:] {
				p, ok := parsePoint(s)
				if !ok || len(u.points) > 0 && p.sec <= u.points[len(u.points)-1].sec {
					return nil, bad("malformed point")
				}
				u.points = append(u.points, p)
			}
			out = append(out, u)
		default:
			return nil, bad("malformed")
		}
	}
	return out, nil
}

// parsePoint reads "second count sum min max": a count of at least one,
// finite values with min <= max, a second a timestamp can have.
func parsePoint(s string) (point, bool) {
	f := strings.Fields(s)
	if len(f) != 5 {
		return point{}, false
	}
	var p point
	var errs [5]error
	p.sec, errs[0] = strconv.ParseInt(f[0], 10, 64)
	p.count, errs[1] = strconv.ParseInt(f[1], 10, 64)
	p.sum, errs[2] = strconv.ParseFloat(f[2], 64)
	p.min, errs[3] = strconv.ParseFloat(f[3], 64)
	p.max, errs[4] = strconv.ParseFloat(f[4], 64)
	finite := func(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }
	ok := errors.Join(errs[:]...) == nil && p.count >= 1 && finite(p.sum) && finite(p.min) && finite(p.max) && p.min <= p.max &&
		p.sec >= minTimestamp.Unix() && p.sec < maxTimestamp.Unix()
	return p, ok
}

package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/gomodule/redigo/redis"
)

// subscriber carries to this instance's hub what every instance's ingests
// publish on the Redis stream channel (the ingest script publishes once its
// writes are applied). It holds one connection of its own, not one of the
// pool's: a subscribed connection can do nothing else, and it waits on
// reads far longer than REDIS_TIMEOUT.
//
// Pub/sub delivers at most once: what is published while the connection is
// down is lost. So after a lost connection is back, every stream is told
// to read everything again (resync).
type subscriber struct {
	dial    func(ctx context.Context, readTimeout time.Duration) (redis.Conn, error)
	channel string
	hub     *hub
	tel     *telemetry
	log     *slog.Logger

	// timeout bounds a dial; pingEvery is how often the connection is
	// checked, and a read that waits pingEvery+pongWait for anything
	// fails it, so a Redis that vanished without closing the connection
	// is noticed. pongWait is long because Redis answers the PING only
	// after the script it is running, and a large ingest's takes most of
	// a second.
	timeout, pingEvery, pongWait time.Duration
	// retryFirst is the wait after the first failure, doubled after each
	// further one up to retryMax.
	retryFirst, retryMax time.Duration
}

// run listens until ctx is done, reconnecting after every failure.
func (s *subscriber) run(ctx context.Context) {
	wait, lost := s.retryFirst, false
	for ctx.Err() == nil {
		err := s.listen(ctx, func() {
			if lost {
				s.log.Info("stream subscriber reconnected; streams resync")
				s.hub.resyncAll("store reconnected")
			}
			wait, lost = s.retryFirst, false
		})
		if ctx.Err() != nil {
			return
		}
		if !lost {
			s.log.Warn("stream subscriber lost redis; reconnecting", "err", err)
		}
		lost = true
		s.tel.storeError("subscribe")
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		wait = min(2*wait, s.retryMax)
	}
}

// listen subscribes on one connection and hands what arrives to the hub
// until the connection fails or ctx is done. It calls subscribed once the
// subscription holds.
func (s *subscriber) listen(ctx context.Context, subscribed func()) error {
	dialCtx, cancel := context.WithTimeout(ctx, s.timeout)
	c, err := s.dial(dialCtx, s.pingEvery+s.pongWait)
	cancel()
	if err != nil {
		return err
	}
	psc := redis.PubSubConn{Conn: c}
	defer psc.Close()
	if err := psc.Subscribe(s.channel); err != nil {
		return err
	}
	// redigo allows one goroutine to send while another receives: this
	// one pings, and closes the connection when ctx ends, which ends the
	// Receive below.
	done := make(chan struct{})
	defer close(done)
	go func() {
		t := time.NewTicker(s.pingEvery)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				psc.Close()
				return
			case <-t.C:
				if psc.Ping("") != nil {
					return // Receive sees the failure too
				}
			}
		}
	}()
	for {
		switch v := psc.Receive().(type) {
		case redis.Subscription:
			if v.Kind == "subscribe" {
				subscribed()
			}
		case redis.Message:
			if s.hub.idle() {
				continue
			}
			updates, err := decodeUpdates(v.Data)
			if err != nil {
				// Someone else publishes on the channel: the prefix is
				// shared with something that is not this service.
				s.log.Warn("stream subscriber: unreadable message", "err", err)
				continue
			}
			s.hub.publish(updates)
		case error:
			return v
		}
	}
}

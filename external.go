package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"time"
)

// externalService is the dependency GET /external guards with the breaker.
type externalService interface {
	// fetch returns the service's value. It must give up when ctx ends.
	fetch(ctx context.Context) (float64, error)
}

// newExternalService returns the real service over HTTP when EXTERNAL_URL
// is set, and otherwise one simulated in process, so the service and its
// breaker can be tried without anything else running.
func newExternalService(cfg config) externalService {
	if cfg.ExternalURL != "" {
		return newHTTPService(cfg.ExternalURL, cfg.ExternalTimeout)
	}
	return &simulatedService{
		failureRate: cfg.ExternalFailureRate,
		latency:     cfg.ExternalLatency,
		rand:        rand.Float64,
	}
}

// handleExternal answers GET /external. Every answer is a 200: a failed or
// rejected call is answered with a fallback body, since the fallback is the
// service working as designed. timeout bounds one call; zero means none.
func handleExternal(log *slog.Logger, b *breaker, svc externalService, timeout time.Duration) http.Handler {
	failed := []byte(`{"fallback":true,"reason":"external service failure"}` + "\n")
	rejected := []byte(`{"fallback":true,"reason":"circuit open"}` + "\n")
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var value float64
		st, err := b.call(r.Context(), func(ctx context.Context) error {
			if timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			var err error
			value, err = svc.fetch(ctx)
			return err
		})
		w.Header().Set("X-Circuit-State", st.String())
		switch {
		case err == nil:
			writeJSON(w, http.StatusOK, externalReply{External: "ok", Value: value})
		case errors.Is(err, errCircuitOpen):
			writeRaw(w, http.StatusOK, rejected)
		default:
			// A client that went away is not the service's fault, and nobody
			// reads this answer.
			if r.Context().Err() == nil {
				log.Info("external call failed", "state", st.String(), "err", err)
			}
			writeRaw(w, http.StatusOK, failed)
		}
	})
}

type externalReply struct {
	External string  `json:"external"`
	Value    float64 `json:"value"`
}

// ---- simulated ----

var errSimulatedFailure = errors.New("simulated external service failure")

// simulatedService stands in for a real service: each call takes latency,
// fails with probability failureRate, and otherwise returns a whole number
// from 100 to 200.
type simulatedService struct {
	failureRate float64
	latency     time.Duration
	// rand returns a number in [0, 1). It is called from concurrent
	// requests, so it must be safe for that, as rand.Float64 is.
	rand func() float64
}

func (s *simulatedService) fetch(ctx context.Context) (float64, error) {
	if s.latency > 0 {
		// Not time.Sleep: a call whose deadline passes or whose client
		// goes away must end then, as a real one would.
		t := time.NewTimer(s.latency)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	} else if err := ctx.Err(); err != nil {
		return 0, err
	}
	if s.rand() < s.failureRate {
		return 0, errSimulatedFailure
	}
	// min guards against r*101 rounding up to 101 for r just below 1.
	return float64(min(100+int(s.rand()*101), 200)), nil
}

// ---- HTTP ----

// maxExternalBody bounds how much of a reply is read, so a misbehaving
// service cannot make us buffer without limit. A reply is a few bytes.
const maxExternalBody = 64 << 10

// httpService GETs a URL that answers 2xx with a JSON object holding a
// numeric "value". Anything else is a failure.
type httpService struct {
	url    string
	client *http.Client
}

// newHTTPService builds a client of its own rather than using
// http.DefaultClient, whose transport has no dial or header timeouts and is
// shared with anything else in the process. Every call also carries the
// caller's deadline; timeout is a backstop for calls that have none.
func newHTTPService(url string, timeout time.Duration) *httpService {
	transport := &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   5 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		TLSHandshakeTimeout:   5 * time.Second,
		ResponseHeaderTimeout: timeout,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConns:          100,
		// Every call goes to one host; the default of 2 idle connections
		// per host would close and redial most connections under load.
		MaxIdleConnsPerHost: 100,
		ForceAttemptHTTP2:   true,
	}
	return &httpService{
		url:    url,
		client: &http.Client{Transport: transport, Timeout: timeout},
	}
}

func (s *httpService) fetch(ctx context.Context) (float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		// Drained so the connection can be reused.
		io.Copy(io.Discard, io.LimitReader(resp.Body, maxExternalBody))
		return 0, fmt.Errorf("external service answered %s", resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxExternalBody+1))
	if err != nil {
		return 0, fmt.Errorf("reading external service reply: %w", err)
	}
	if len(body) > maxExternalBody {
		return 0, fmt.Errorf("external service reply is over %d bytes", maxExternalBody)
	}
	var reply struct {
		Value *float64 `json:"value"`
	}
	if err := json.Unmarshal(body, &reply); err != nil {
		return 0, fmt.Errorf("external service reply: %w", err)
	}
	if reply.Value == nil {
		return 0, errors.New(`external service reply has no numeric "value"`)
	}
	return *reply.Value, nil
}

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"
)

// Tests of what an attacker, or a broken client, can send: bytes that are
// not what the contract asks for, requests that never finish, bodies that
// never end, and floods of distinct keys meant to grow server memory.

// fuzzSeeds are the contract's examples and one body per way of being
// refused, so the seed corpus alone (a plain go test) covers each branch of
// parseSamples.
var fuzzSeeds = []string{
	// The contract's examples.
	`{"timestamp":"2025-01-01T10:00:00","value":75,"type":"cpu"}`,
	`[{"timestamp":"2025-01-01T10:01:00Z","value":25,"type":"cpu"},{"timestamp":"2025-01-01T12:02:00+02:00","value":50,"type":"cpu"}]`,
	`{"timestamp":"2025-01-01T12:00:00.123456789+02:00","value":-1.5,"type":"mem.used_MB-2","host":"a","tags":{"x":[1,2]}}`,
	` [ {"type":"b","value":2,"timestamp":"2025-01-01T00:00:01Z"} , {"type":"a","value":1,"timestamp":"2025-01-01T00:00:00Z"},{"type":"b","value":0.1,"timestamp":"2024-12-31T23:59:59.999999Z"} ] `,
	// Labels, plain and written otherwise.
	`[{"timestamp":"2025-01-01T10:00:00Z","value":1,"type":"cpu","labels":{"host":"web-1","region":"eu"}},{"timestamp":"2025-01-01T10:00:01Z","value":2,"type":"cpu","labels":{ "region" : "eu" , "host":"web-1" }},{"labels":{},"timestamp":"2025-01-01T10:00:02Z","value":3,"type":"cpu"}]`,
	`{"timestamp":"2025-01-01T10:00:00Z","value":1,"type":"cpu","labels":{"h":"a\"b","h2":"\u00e9,x=\"y\""}}`,
	`{"timestamp":"2025-01-01T10:00:00Z","value":1,"type":"cpu","labels":{"h":"a","h":"b"}}`,
	`{"timestamp":"2025-01-01T10:00:00Z","value":1,"type":"cpu","labels":null}`,
	`{"timestamp":"2025-01-01T10:00:00Z","value":1,"type":"cpu","labels":{"1h":"a"}}`,
	`{"timestamp":"2025-01-01T10:00:00Z","value":1,"type":"cpu","labels":{"a":"1","b":"1","c":"1","d":"1","e":"1","f":"1","g":"1","h":"1","i":"1"}}`,
	`{"timestamp":"2025-01-01T10:00:00Z","value":1,"type":"cpu","labels":{"h":"\u0001"}}`,
	`{"timestamp":"2025-01-01T10:00:00Z","value":1,"type":"cpu","Labels":{"h":"x"}}`,
	// Not JSON, or JSON of the wrong shape.
	``, ` `, `{`, `{"timestamp":`, `nul`, `null`, `42`, `"cpu"`, `true`, `{}`, `[]`, `[ ]`,
	`[1]`, `[null]`, `[[{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu"}]]`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu"} x`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu"}{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu"}`,
	"\xef\xbb\xbf{\"timestamp\":\"2025-01-01T10:00:00\",\"value\":1,\"type\":\"cpu\"}",
	`[` + strings.Repeat(`[`, 10001) + strings.Repeat(`]`, 10001) + `]`,
	// Values that are not finite numbers of sane magnitude.
	`{"timestamp":"2025-01-01T10:00:00","value":"75","type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":NaN,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":"NaN","type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":Infinity,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":-Infinity,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1e400,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":-1e400,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1e301,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1e300,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":-1e300,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1.0000000000000001e300,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1e-400,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":5e-324,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":-0,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1` + strings.Repeat("0", 400) + `,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":0x10,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":+1,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":.5,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":true,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":null,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":[1],"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":{"v":1},"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","type":"cpu"}`,
	// Type names.
	`{"timestamp":"2025-01-01T10:00:00","value":1}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":""}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"` + strings.Repeat("a", 64) + `"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"` + strings.Repeat("a", 65) + `"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu load"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu}"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"{cpu}:agg"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpü"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"c\u0000pu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"\u0063pu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu\n"}`,
	"{\"timestamp\":\"2025-01-01T10:00:00\",\"value\":1,\"type\":\"cp\xffu\"}",
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"\ud800"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":7}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":["cpu"]}`,
	// Timestamps.
	`{"value":1,"type":"cpu"}`,
	`{"timestamp":1700000000,"value":1,"type":"cpu"}`,
	`{"timestamp":"yesterday","value":1,"type":"cpu"}`,
	`{"timestamp":"2025-13-01T10:00:00","value":1,"type":"cpu"}`,
	`{"timestamp":"2025-02-30T10:00:00","value":1,"type":"cpu"}`,
	`{"timestamp":"2025-01-01","value":1,"type":"cpu"}`,
	`{"timestamp":"2025-01-01 10:00:00","value":1,"type":"cpu"}`,
	`{"timestamp":"2025-01-01t10:00:00z","value":1,"type":"cpu"}`,
	`{"timestamp":"2025-06-30T23:59:60Z","value":1,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00+24:00","value":1,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00-23:59","value":1,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00.0000001Z","value":1,"type":"cpu"}`,
	`{"timestamp":"1900-01-01T00:00:00Z","value":1,"type":"cpu"}`,
	`{"timestamp":"1899-12-31T23:59:59.999999999Z","value":1,"type":"cpu"}`,
	`{"timestamp":"1900-01-01T00:30:00+01:00","value":1,"type":"cpu"}`,
	`{"timestamp":"1969-12-31T23:59:59.9999995Z","value":1,"type":"cpu"}`,
	`{"timestamp":"2199-12-31T23:59:59.999999999Z","value":1,"type":"cpu"}`,
	`{"timestamp":"2200-01-01T00:00:00Z","value":1,"type":"cpu"}`,
	`{"timestamp":"9999-01-01T00:00:00Z","value":1,"type":"cpu"}`,
	`{"timestamp":"-0001-01-01T00:00:00Z","value":1,"type":"cpu"}`,
	`{"timestamp":"` + strings.Repeat("9", 1000) + `","value":1,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00ü` + strings.Repeat("é", 30) + `","value":1,"type":"cpu"}`,
	`{"timestamp":null,"value":1,"type":"cpu"}`,
	// Duplicate keys (the last counts) and case variants (unknown fields,
	// though encoding/json alone would match them).
	`{"timestamp":"2025-01-01T10:00:00","value":1,"value":2,"type":"cpu","type":"mem"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":"x","value":2,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu","value":1e400}`,
	`{"TIMESTAMP":"2025-01-01T10:00:00","Value":1,"tYpE":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"VALUE":2,"type":"cpu"}`,
	`{"timeſtamp":"2025-01-01T10:00:00","value":1,"type":"cpu"}`,
	`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu","Value":"junk","TYPE":"evil"}`,
	`{"timestamp":"2025-01-01T10:00:00","\u0056alue":2,"value":1,"type":"cpu"}`,
	// Batches.
	`[{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu"},{"timestamp":"2025-01-01T10:00:00","value":"x","type":"cpu"}]`,
	`[{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu"},1]`,
	`[{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu"},]`,
	`[{"timestamp":"2025-01-01T10:00:00","value":1e300,"type":"cpu"},{"timestamp":"2025-01-01T10:00:00","value":1e300,"type":"cpu"},{"timestamp":"2025-01-01T10:00:00","value":-1e300,"type":"cpu"},{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu"}]`,
	`[` + strings.Repeat(`{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu"},`, 300) + `{"timestamp":"2025-01-01T10:00:00","value":1,"type":"cpu"}]`,
}

// validTypeName is the contract's rule for type, written independently of
// validType.
var validTypeName = regexp.MustCompile(`^[A-Za-z0-9_.\-]{1,64}$`)

// summary is what a store should report for a set of samples.
type summary struct {
	count         int64
	sum, min, max float64
}

// expectedSummaries adds each type's samples up in the order given.
func expectedSummaries(samples []sample) map[string]summary {
	out := map[string]summary{}
	for _, s := range samples {
		e, seen := out[s.typ]
		if !seen || s.value < e.min {
			e.min = s.value
		}
		if !seen || s.value > e.max {
			e.max = s.value
		}
		e.count++
		e.sum += s.value
		out[s.typ] = e
	}
	return out
}

func FuzzParseSamples(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s), uint8(3))
	}
	f.Fuzz(func(t *testing.T, body []byte, batchLimit uint8) {
		maxBatch := int(batchLimit) + 1
		samples, batch, err := parseSamples(body, maxBatch)
		// The fast reading must agree with encoding/json's wherever it
		// answers.
		if fast, fastBatch, ok := scanSamples(body, maxBatch); ok {
			slow, slowBatch, err := decodeSamples(body, maxBatch)
			if err != nil || !slices.Equal(fast, slow) || fastBatch != slowBatch {
				t.Fatalf("scanSamples(%q) = %v, batch %v; encoding/json reads %v, batch %v, %v", body, fast, fastBatch, slow, slowBatch, err)
			}
		}
		// Nothing parsed may point into the body, whose buffer is reused.
		scratch := slices.Clone(body)
		again, _, _ := parseSamples(scratch, maxBatch)
		for i := range scratch {
			scratch[i] = 'x'
		}
		if !slices.Equal(again, samples) {
			t.Fatalf("parseSamples(%q) = %v, then %v once the body was overwritten", body, samples, again)
		}
		if err != nil {
			// Anything but a requestError would be answered 503 and logged
			// as a store failure.
			var re *requestError
			if !errors.As(err, &re) || re.status != http.StatusUnprocessableEntity {
				t.Fatalf("parseSamples(%q) error = %#v, want a 422 requestError", body, err)
			}
			if len(re.detail) > 512 || !utf8.ValidString(re.detail) {
				t.Fatalf("parseSamples(%q) detail = %q (%d bytes), want at most 512 bytes of UTF-8", body, re.detail, len(re.detail))
			}
			if samples != nil {
				t.Fatalf("parseSamples(%q) = %v with error %v, want no samples", body, samples, err)
			}
			return
		}
		items := oracleItems(t, body, batch)
		if len(samples) != len(items) || batch && len(samples) > maxBatch {
			t.Fatalf("parseSamples(%q, %d) = %d samples, want %d (batch limit %d)", body, maxBatch, len(samples), len(items), maxBatch)
		}
		for i, s := range samples {
			if math.IsNaN(s.value) || math.IsInf(s.value, 0) || s.value > 1e300 || s.value < -1e300 {
				t.Fatalf("parseSamples(%q) sample %d value = %v, want finite, |v| <= 1e300", body, i, s.value)
			}
			if !validTypeName.MatchString(s.typ) {
				t.Fatalf("parseSamples(%q) sample %d type = %q, want 1 to 64 of A-Z a-z 0-9 _ . -", body, i, s.typ)
			}
			if at := time.UnixMicro(s.at); at.Year() < 1900 || at.Year() >= 2200 {
				t.Fatalf("parseSamples(%q) sample %d timestamp = %v, want years 1900 to 2199", body, i, at.UTC())
			}
			checkAgainstBody(t, body, i, s, items[i])
		}
		checkStored(t, body, samples)
	})
}

// FuzzQuickTimestamp checks the fast timestamp reading against the time
// package's wherever it answers.
func FuzzQuickTimestamp(f *testing.F) {
	for _, s := range []string{
		"2025-01-01T10:00:00Z", "2025-01-01t10:00:00.123456789z", "2024-02-29T23:59:59+23:59",
		"2023-02-29T00:00:00", "1900-01-01T00:00:00+00:01", "2199-12-31T23:59:59.999999-00:01",
		"2025-01-01T10:00:00.1234567891Z", "2025-01-01T24:00:00Z", "2025-01-01T10:00:00+24:00",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		quick, ok := quickTimestamp(s)
		if !ok {
			return
		}
		if general, err := generalTimestamp(s); err != nil || general != quick {
			t.Fatalf("quickTimestamp(%q) = %d; the time package reads %d, %v", s, quick, general, err)
		}
		if b, ok := quickTimestamp([]byte(s)); !ok || b != quick {
			t.Fatalf("quickTimestamp([]byte(%q)) = %d, %v; as a string %d", s, b, ok, quick)
		}
	})
}

// TestQuickTimestamp reads random timestamps of every shape the fast
// reading takes, near the edges of each field too, and compares them with
// the time package's reading; a shape it does not take must not change the
// answer either.
func TestQuickTimestamp(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	pick := func(lo, hi int) int {
		if rng.IntN(4) == 0 { // an edge, or just past it
			return []int{lo, hi, lo - 1, hi + 1}[rng.IntN(4)]
		}
		return lo + rng.IntN(hi-lo+1)
	}
	check := func(s string) bool {
		general, gerr := generalTimestamp(s)
		quick, ok := quickTimestamp(s)
		if ok && (gerr != nil || general != quick) {
			t.Fatalf("quickTimestamp(%q) = %d; the time package reads %d, %v", s, quick, general, gerr)
		}
		if got, err := parseTimestamp(s); got != general || (err == nil) != (gerr == nil) {
			t.Fatalf("parseTimestamp(%q) = %d, %v; the time package reads %d, %v", s, got, err, general, gerr)
		}
		return ok
	}
	for _, s := range []string{
		"1900-02-29T00:00:00Z", "2100-02-29T00:00:00Z", "2000-02-29T00:00:00Z", "2024-02-29T12:00:00Z",
		"2025-04-31T00:00:00Z", "2025-12-31T23:59:59.999999999Z", "2199-12-31T23:59:59.999999Z",
		"2200-01-01T00:00:00+00:01", "1900-01-01T00:00:00+00:01", "1900-01-01T00:00:00-00:01",
	} {
		check(s)
	}
	taken := 0
	for range 200_000 {
		s := fmt.Sprintf("%04d-%02d-%02d%c%02d:%02d:%02d", max(0, pick(1899, 2200)), max(0, pick(1, 12)), max(0, pick(1, 31)),
			"Tt"[rng.IntN(2)], max(0, pick(0, 23)), max(0, pick(0, 59)), max(0, pick(0, 59)))
		if rng.IntN(2) == 0 {
			s += "." + strconv.FormatUint(rng.Uint64(), 10)[:1+rng.IntN(10)]
		}
		switch rng.IntN(4) {
		case 0:
			s += []string{"Z", "z"}[rng.IntN(2)]
		case 1:
			s += fmt.Sprintf("%c%02d:%02d", "+-"[rng.IntN(2)], max(0, pick(0, 23)), max(0, pick(0, 59)))
		case 2:
			s += []string{"+0200", "+02", " ", "ZZ"}[rng.IntN(4)]
		}
		if check(s) {
			taken++
		}
	}
	if taken < 50_000 {
		t.Fatalf("the fast reading took %d of 200,000 timestamps, want most of the valid ones", taken)
	}
}

// oracleItems decodes an accepted body with a generic decoder: its metric
// objects, one for a single metric.
func oracleItems(t *testing.T, body []byte, batch bool) []map[string]any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("parseSamples accepted %q, which does not decode: %v", body, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		t.Fatalf("parseSamples accepted %q, which has more after its value", body)
	}
	var raw []any
	switch v := v.(type) {
	case []any:
		raw = v
	case map[string]any:
		raw = []any{v}
	}
	if _, isArray := v.([]any); isArray != batch {
		t.Fatalf("parseSamples(%q) batch = %v, want %v", body, batch, isArray)
	}
	items := make([]map[string]any, len(raw))
	for i, r := range raw {
		m, ok := r.(map[string]any)
		if !ok {
			t.Fatalf("parseSamples accepted %q, whose item %d is %T, not an object", body, i, r)
		}
		items[i] = m
	}
	return items
}

// checkAgainstBody checks that s carries what item does under the exact
// keys: a key that differs in case ("VALUE", "timeſtamp") is an unknown
// field, which must not count.
func checkAgainstBody(t *testing.T, body []byte, i int, s sample, item map[string]any) {
	t.Helper()
	num, _ := item["value"].(json.Number)
	v, err := strconv.ParseFloat(string(num), 64)
	if err != nil || v != s.value {
		t.Fatalf("parseSamples(%q) sample %d value = %v, want %v from the body", body, i, s.value, item["value"])
	}
	if typ, _ := item["type"].(string); typ != s.typ {
		t.Fatalf("parseSamples(%q) sample %d type = %q, want %q from the body", body, i, s.typ, typ)
	}
	ts, _ := item["timestamp"].(string)
	// RFC 3339 allows a lowercase "t" and "z"; Go's layout wants them upper.
	ts = strings.NewReplacer("t", "T", "z", "Z").Replace(ts)
	at, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		at, err = time.Parse("2006-01-02T15:04:05.999999999", ts) // no zone: UTC
	}
	// The stored time is the microsecond the given instant falls in.
	if ns := at.UnixNano(); err != nil || ns < s.at*1000 || ns >= s.at*1000+1000 {
		t.Fatalf("parseSamples(%q) sample %d at = %d µs, want the microsecond of %q", body, i, s.at, ts)
	}
}

// checkStored adds samples to a fresh memory store and checks every
// type's summaries against sums computed here. The store adds a second's
// samples, then seconds into minutes and so on up, so a sum is compared
// to within the rounding of that many additions, bounded by the sum of
// the magnitudes; count, min and max exactly.
func checkStored(t *testing.T, body []byte, samples []sample) {
	t.Helper()
	cfg := testConfig(t)
	cfg.MaxTypes = len(samples) // exactly as many types as can occur
	cfg.Retention = retention{}
	b := newMemoryBackend(cfg, func() time.Time { return maxTimestamp })
	if err := storeAdd(b, samples...); err != nil {
		t.Fatalf("add(parseSamples(%q)) = %v, want nil", body, err)
	}
	w := window{math.MaxInt64, math.MinInt64}
	magnitude := map[string]float64{}
	for _, s := range samples {
		w.from, w.to = min(w.from, s.second()), max(w.to, s.second()+1)
		magnitude[s.typ] += math.Abs(s.value)
	}
	for typ, want := range expectedSummaries(samples) {
		rounding := float64(want.count) * 1e-15 * magnitude[typ]
		for _, w := range []window{allTime, w} {
			got, _, err := summarize(b, typ, w)
			if err != nil || got.Count != want.count || *got.Min != want.min || *got.Max != want.max ||
				math.Abs(got.Sum-want.sum) > rounding {
				t.Fatalf("body %q: summarize(%s, %v) = %+v, %v, want %+v", body, typ, w, got, err, want)
			}
		}
	}
}

// TestSlowHeadersCutOff is slowloris: a client that keeps a connection
// busy by sending its headers a byte at a time, never finishing them.
func TestSlowHeadersCutOff(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	addr, done := startRun(t, ctx, map[string]string{"ADDR": "127.0.0.1:0"})
	t.Cleanup(func() { cancel(); <-done })

	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	if _, err := io.WriteString(conn, "POST /api/metrics HTTP/1.1\r\nHost: analytics\r\nX-Slow: "); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		tick := time.NewTicker(500 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if _, err := conn.Write([]byte("x")); err != nil {
					return // cut off
				}
			}
		}
	}()

	// The server may answer (408) before it hangs up; either way the read
	// ends at EOF or an error other than our own deadline.
	const within = 8 * time.Second
	conn.SetReadDeadline(start.Add(within))
	_, err = io.Copy(io.Discard, conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("a client trickling its headers was still connected after %v, want cut off by ReadHeaderTimeout (5s)", within)
	}
	t.Logf("cut off after %v (err %v)", time.Since(start).Round(time.Millisecond), err)
}

// TestBodyOverLimitContentLength: a declared length over MAX_BODY_BYTES is
// refused on the header alone, before a byte of the body is needed.
func TestBodyOverLimitContentLength(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	cfg.MaxBodyBytes = 64 << 10
	u, err := url.Parse(serve(t, cfg, newMemoryBackend(cfg, time.Now)))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const within = 2 * time.Second
	conn.SetDeadline(time.Now().Add(within))
	fmt.Fprintf(conn, "POST /api/metrics HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n[", u.Host, 100<<20)
	conn.Write(bytes.Repeat([]byte(" "), 4<<10))

	br := bufio.NewReader(conn)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the answer to a 100 MB Content-Length with 4 KB sent: %v; want 413 within %v", err, within)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(b), "bytes") {
		t.Fatalf("POST with Content-Length 100 MB = %d %s, want 413 naming the byte limit", res.StatusCode, b)
	}
	// Keeping the connection would mean reading, or waiting for, the
	// other 100 MB first.
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("after the 413, reading the connection = %v, want EOF: the server must hang up, not drain the body", err)
	}
}

// TestBodyOverLimitChunked: a body of no declared length is cut off once it
// passes MAX_BODY_BYTES, rather than read to its end.
func TestBodyOverLimitChunked(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	cfg.MaxBodyBytes = 64 << 10
	base := serve(t, cfg, newMemoryBackend(cfg, time.Now))

	const total = 50 << 20
	pr, pw := io.Pipe()
	var written atomic.Int64
	go func() {
		chunk := []byte(strings.Repeat(metricBody("cpu", sampleTime, 1)+",", 512))
		pw.Write([]byte("["))
		for written.Load() < total {
			n, err := pw.Write(chunk)
			written.Add(int64(n))
			if err != nil {
				return // the client gave up on the body: the answer is in
			}
		}
		pw.Close()
	}()
	defer pr.CloseWithError(errors.New("test over"))

	req, err := http.NewRequest("POST", base+"/api/metrics", pr)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.ContentLength = -1 // unknown: sent chunked
	client := &http.Client{Timeout: 10 * time.Second}
	res, err := client.Do(req)
	sent := written.Load()
	if err != nil {
		t.Fatalf("POST of a 50 MB chunked body: %v, want 413 (%d bytes sent)", err, sent)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("POST of a 50 MB chunked body = %d %s, want 413", res.StatusCode, b)
	}
	// Socket buffers on both sides may hold a few MB the server never read.
	if sent >= 8<<20 {
		t.Errorf("client wrote %d bytes of a chunked body before the 413, want < 8 MB: the server read far past MAX_BODY_BYTES (64 KiB)", sent)
	}
	t.Logf("%d bytes written before the 413", sent)
}

// heapAlloc is the live heap after a full collection.
func heapAlloc() int64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC() // the first may leave objects for finalizers or sweeping
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// TestLimiterFloodBounded: one request from each of 100,000 addresses fills
// the limiter; a sweep in the window after the next must drop every counter
// of it and give the memory back. Not parallel: it measures the process's
// heap.
func TestLimiterFloodBounded(t *testing.T) {
	const clients = 100_000
	// The heap is the whole process's, and goroutines that earlier tests
	// left behind can allocate or free during a measurement. A leak shows in
	// every attempt; such noise rarely does.
	const attempts = 3
	var failure string
	for range attempts {
		if failure = limiterFlood(t, clients); failure == "" {
			return
		}
		t.Log(failure)
	}
	t.Errorf("in %d attempts: %s", attempts, failure)
}

// limiterFlood runs one flood and sweep and reports how the heap failed to
// come back, or "" when it did.
func limiterFlood(t *testing.T, clients int) string {
	t.Helper()
	ctx := context.Background()
	lim := newMemoryLimiter(5, time.Minute)
	before := heapAlloc()
	for i := range clients {
		addr := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).String()
		at := testEpoch.Add(time.Duration(i) * 500 * time.Microsecond) // all in the first minute
		if d, err := lim.allow(ctx, addr, at); err != nil || !d.allowed {
			t.Fatalf("allow(%s) = %+v, %v, want allowed", addr, d, err)
		}
	}
	flooded := heapAlloc()
	if n := counters(lim); n != clients {
		t.Fatalf("%d counters after %d clients, want %d", n, clients, clients)
	}
	lim.allow(ctx, "192.0.2.1", testEpoch.Add(time.Minute))
	lim.allow(ctx, "192.0.2.1", testEpoch.Add(2*time.Minute))
	lim.sweep(testEpoch.Add(2 * time.Minute))
	if n := counters(lim); n != 2 {
		t.Fatalf("%d counters two windows later, want 2 (this window's and the last)", n)
	}
	after := heapAlloc()
	runtime.KeepAlive(lim)

	const slack = 2 << 20
	if grown := flooded - min(before, after); grown < 4*slack {
		t.Fatalf("heap: %d before, %d flooded, %d after: the flood grew it by only %d bytes, too little to tell a leak from noise",
			before, flooded, after, grown)
	}
	if after-before > slack {
		return fmt.Sprintf("heap after the sweep = %d bytes over the start (%d before, %d flooded, %d after), want at most %d",
			after-before, before, flooded, after, slack)
	}
	t.Logf("heap: %d before, %d flooded, %d after the sweep", before, flooded, after)
	return ""
}

// TestTypeFloodBounded: a client inventing metric types cannot grow the
// store past MAX_TYPES, even racing itself, and the types already there
// keep working.
func TestTypeFloodBounded(t *testing.T) {
	const maxTypes = 100
	forEachStore(t, func(c *config) { c.MaxTypes = maxTypes }, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		metric := func(typ string) string {
			return metricBody(typ, sampleTime, 1)
		}
		refused := func(r response) bool {
			var body errorBody
			return r.status == http.StatusUnprocessableEntity &&
				json.Unmarshal([]byte(r.body), &body) == nil && strings.Contains(body.Detail, "type")
		}
		for i := range maxTypes - 10 {
			if r := post(t, base, metric(fmt.Sprintf("old%03d", i))); r.status != 201 {
				t.Fatalf("POST type %d of %d = %d %s, want 201", i, maxTypes, r.status, r.body)
			}
		}

		// 40 new types at once for the last 10 places.
		const racers = 40
		var (
			wg       sync.WaitGroup
			mu       sync.Mutex
			accepted []string
			rejected []string
		)
		for i := range racers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				typ := fmt.Sprintf("new%03d", i)
				r, err := tryPost(base, metric(typ))
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err != nil:
					t.Errorf("POST new type %s: %v", typ, err)
				case r.status == 201:
					accepted = append(accepted, typ)
				case refused(r):
					rejected = append(rejected, typ)
				default:
					t.Errorf("POST new type %s = %d %s, want 201 or 422 naming type", typ, r.status, r.body)
				}
			}()
		}
		wg.Wait()
		if len(accepted) != 10 || len(rejected) != racers-10 {
			t.Fatalf("%d racing new types: %d accepted, %d refused, want 10 and %d", racers, len(accepted), len(rejected), racers-10)
		}

		// Full: a new type alone, or hidden in a batch of known ones.
		if r := post(t, base, metric("one.more")); !refused(r) {
			t.Errorf("POST type %d = %d %s, want 422 naming type", maxTypes+1, r.status, r.body)
		}
		batch := "[" + metric("old000") + "," + metric("sneaky") + "," + metric(accepted[0]) + "]"
		if r := post(t, base, batch); !refused(r) {
			t.Errorf("POST batch of 2 known types and 1 new = %d %s, want 422 naming type", r.status, r.body)
		}
		for typ, want := range map[string]int64{"old000": 1, accepted[0]: 1, "sneaky": 0, "one.more": 0, rejected[0]: 0} {
			if n := count(t, e.b, typ); n != want {
				t.Errorf("count(%s) = %d after the refusals, want %d", typ, n, want)
			}
		}

		// Known types keep being accepted, alone and together.
		if r := post(t, base, "["+metric("old000")+","+metric(accepted[0])+"]"); r.status != 201 {
			t.Errorf("POST batch of known types at MAX_TYPES = %d %s, want 201", r.status, r.body)
		}
		if r := post(t, base, metric("old089")); r.status != 201 {
			t.Errorf("POST known type at MAX_TYPES = %d %s, want 201", r.status, r.body)
		}
		for typ, want := range map[string]int64{"old000": 2, accepted[0]: 2, "old089": 2} {
			if n := count(t, e.b, typ); n != want {
				t.Errorf("count(%s) = %d, want %d", typ, n, want)
			}
		}
	})
}

// TestSlowBodiesHoldWhatTheySent reproduces the body preallocation: any
// Content-Length up to 64 KiB was allocated in full before the body
// arrived, so 6,000 slow connections held 485 MB. Now a body grows as it
// arrives: 1,000 connections that declare 64 KiB and send one byte hold
// far less than 1,000 x 64 KiB. Not parallel: it measures the heap.
func TestSlowBodiesHoldWhatTheySent(t *testing.T) {
	const conns, declared = 1000, 64 << 10
	cfg := testConfig(t)
	b := newMemoryBackend(cfg, time.Now)
	var entered atomic.Int64
	h := newHandler(discardLogger(), cfg, newTelemetry(), b)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered.Add(1)
		h.ServeHTTP(w, r)
	}))
	defer srv.Close()
	before := heapAlloc()
	var open []net.Conn
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	for range conns {
		c, err := net.Dial("tcp", srv.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, c)
		fmt.Fprintf(c, "POST /api/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n[", declared)
	}
	for deadline := time.Now().Add(10 * time.Second); entered.Load() < conns; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d requests reached the handler", entered.Load(), conns)
		}
	}
	grown := heapAlloc() - before
	t.Logf("%d slow bodies of %d bytes declared: heap grew by %d KiB", conns, declared, grown>>10)
	if grown > conns*declared/4 {
		t.Errorf("heap grew by %d KiB for %d one-byte bodies, want far less than the %d KiB declared", grown>>10, conns, conns*declared>>10)
	}
}

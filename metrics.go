package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"mime"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// ---- HTTP handlers ----

var storedOne = []byte(`{"message":"Metric stored successfully"}` + "\n")

func handleIngest(log *slog.Logger, cfg config, tel *telemetry, store metricStore) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		samples, batch, err := readSamples(w, r, cfg)
		if err == nil {
			err = store.add(r.Context(), samples)
		}
		if tm := (*tooManyTypesError)(nil); errors.As(err, &tm) {
			err = unprocessable("%stype %q is new, and the limit of %d distinct metric types is reached",
				itemPrefix(samples, batch, tm.typ), tm.typ, cfg.MaxTypes)
		}
		if err != nil {
			writeFailure(w, r, log, err)
			return
		}
		tel.ingested.Add(uint64(len(samples)))
		if !batch {
			writeRaw(w, http.StatusCreated, storedOne)
			return
		}
		writeJSON(w, http.StatusCreated, struct {
			Message string `json:"message"`
			Count   int    `json:"count"`
		}{"Metrics stored successfully", len(samples)})
	})
}

// itemPrefix names the first sample of type typ, for messages about a
// batch.
func itemPrefix(samples []sample, batch bool, typ string) string {
	if !batch {
		return ""
	}
	for i, s := range samples {
		if s.typ == typ {
			return fmt.Sprintf("item %d: ", i)
		}
	}
	return ""
}

func handleSummary(log *slog.Logger, summaries *summaryCache) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		typ, win, err := parseSummaryQuery(r.URL.Query())
		if err != nil {
			writeFailure(w, r, log, err)
			return
		}
		body, err := summaries.get(r.Context(), typ, win)
		if err != nil {
			writeFailure(w, r, log, err)
			return
		}
		writeRaw(w, http.StatusOK, body)
	})
}

// ---- validation ----

// readSamples reads and validates the body of an ingest: one metric object
// or an array of them. It reports whether the body was an array.
func readSamples(w http.ResponseWriter, r *http.Request, cfg config) ([]sample, bool, error) {
	if ct := r.Header.Get("Content-Type"); ct != "" && ct != "application/json" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			return nil, false, &requestError{http.StatusUnsupportedMediaType, "Content-Type must be application/json"}
		}
	}
	tooLarge := func() error {
		return &requestError{http.StatusRequestEntityTooLarge, fmt.Sprintf("body exceeds %d bytes", cfg.MaxBodyBytes)}
	}
	if r.ContentLength > cfg.MaxBodyBytes {
		return nil, false, tooLarge() // refused before reading a byte of it
	}
	var body []byte
	var err error
	if r.ContentLength > 0 && r.ContentLength <= 64<<10 {
		// The usual case: one allocation of the declared size. Larger
		// bodies grow as they arrive, so a slow client declaring a large
		// one holds no more memory than it has sent.
		body = make([]byte, r.ContentLength)
		_, err = io.ReadFull(r.Body, body)
	} else {
		body, err = io.ReadAll(http.MaxBytesReader(w, r.Body, cfg.MaxBodyBytes))
	}
	if err != nil {
		if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
			return nil, false, tooLarge()
		}
		return nil, false, &requestError{http.StatusBadRequest, "could not read the body"}
	}
	return parseSamples(body, cfg.MaxBatch)
}

// parseSamples decodes and validates a whole body; it is the part of
// ingest that sees untrusted bytes.
func parseSamples(body []byte, maxBatch int) ([]sample, bool, error) {
	if samples, batch, ok := scanSamples(body, maxBatch); ok {
		return samples, batch, nil
	}
	return decodeSamples(body, maxBatch)
}

// decodeSamples is parseSamples by encoding/json, for any body.
func decodeSamples(body []byte, maxBatch int) ([]sample, bool, error) {
	switch firstByte(body) {
	case '{':
		s, err := parseSample(body)
		if err != nil {
			return nil, false, unprocessable("%s", err)
		}
		return []sample{s}, false, nil
	case '[':
		var items []json.RawMessage
		if err := json.Unmarshal(body, &items); err != nil {
			return nil, true, unprocessable("%s", errNotJSON)
		}
		if len(items) == 0 {
			return nil, true, unprocessable("batch is empty")
		}
		if len(items) > maxBatch {
			return nil, true, unprocessable("batch has %d metrics, more than the limit of %d", len(items), maxBatch)
		}
		samples := make([]sample, len(items))
		for i, item := range items {
			s, err := parseSample(item)
			if err != nil {
				return nil, true, unprocessable("item %d: %s", i, err)
			}
			samples[i] = s
		}
		return samples, true, nil
	case 0:
		return nil, false, unprocessable("body is empty: send a JSON metric object or an array of them")
	default:
		if !json.Valid(body) {
			return nil, false, unprocessable("%s", errNotJSON)
		}
		return nil, false, unprocessable("body must be a metric object or an array of them")
	}
}

var errNotJSON = errors.New("body is not valid JSON")

func firstByte(b []byte) byte {
	for _, c := range b {
		if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return c
		}
	}
	return 0
}

// maxAbsValue keeps every sum finite in practice: a type would need more
// than 1e8 samples at this magnitude to overflow float64.
const maxAbsValue = 1e300

// sampleJSON is a metric as sent. encoding/json matches keys to these
// fields ignoring case, so decodeSample makes sure only exact keys count.
type sampleJSON struct {
	Timestamp *string  `json:"timestamp"`
	Value     *float64 `json:"value"`
	Type      *string  `json:"type"`
}

var sampleFields = [][]byte{[]byte("timestamp"), []byte("value"), []byte("type")}

// decodeSample decodes one metric object. The fast path is one Unmarshal
// into the struct; an object with a key that only folds to a field name
// ("Value", "TYPE", or one written with escapes) is decoded key by key, so
// that such a key is an unknown field, ignored as the spec says.
func decodeSample(raw []byte) (sampleJSON, error) {
	var in sampleJSON
	err := json.Unmarshal(raw, &in)
	if se := (*json.SyntaxError)(nil); errors.As(err, &se) || exactKeys(raw) {
		return in, err
	}
	in = sampleJSON{}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return in, err
	}
	for _, f := range []struct {
		name string
		dst  any
	}{{"timestamp", &in.Timestamp}, {"value", &in.Value}, {"type", &in.Type}} {
		if v, ok := fields[f.name]; ok {
			if err := json.Unmarshal(v, f.dst); err != nil {
				if te := (*json.UnmarshalTypeError)(nil); errors.As(err, &te) {
					te.Field = f.name
				}
				return in, err
			}
		}
	}
	return in, nil
}

// exactKeys reports whether no top-level key of the valid JSON object obj
// is a case variant of a field name or written with escapes.
func exactKeys(obj []byte) bool {
	depth := 0
	for i := 0; i < len(obj); i++ {
		switch obj[i] {
		case '{', '[':
			depth++
		case '}', ']':
			depth--
		case '"':
			j, escaped := i+1, false
			for ; obj[j] != '"'; j++ {
				if obj[j] == '\\' {
					escaped = true
					j++
				}
			}
			if depth == 1 && firstByte(obj[j+1:]) == ':' {
				key := obj[i+1 : j]
				if escaped {
					return false
				}
				for _, f := range sampleFields {
					if bytes.EqualFold(key, f) && !bytes.Equal(key, f) {
						return false
					}
				}
			}
			i = j
		}
	}
	return true
}

func parseSample(raw []byte) (sample, error) {
	if firstByte(raw) != '{' {
		return sample{}, errors.New("must be a metric object")
	}
	in, err := decodeSample(raw)
	if err != nil {
		if se := (*json.SyntaxError)(nil); errors.As(err, &se) {
			return sample{}, errNotJSON
		}
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			switch te.Field {
			case "value":
				return sample{}, errors.New("value must be a finite JSON number")
			case "timestamp", "type":
				return sample{}, fmt.Errorf("%s must be a string", te.Field)
			}
		}
		return sample{}, errors.New("must be a metric object")
	}
	switch {
	case in.Timestamp == nil:
		return sample{}, errors.New("timestamp is required")
	case in.Value == nil:
		return sample{}, errors.New("value is required")
	case in.Type == nil:
		return sample{}, errors.New("type is required")
	}
	return checkSample(*in.Timestamp, *in.Value, *in.Type)
}

// checkSample validates a decoded sample's fields.
func checkSample(timestamp string, v float64, typ string) (sample, error) {
	at, err := parseTimestamp(timestamp)
	if err != nil {
		return sample{}, fmt.Errorf("timestamp %w", err)
	}
	if math.IsNaN(v) || math.Abs(v) > maxAbsValue {
		return sample{}, fmt.Errorf("value must be a finite number of magnitude at most %g", maxAbsValue)
	}
	if v == 0 {
		v = 0 // -0 is stored as 0, so a minimum never reads "-0"
	}
	if err := validType(typ); err != nil {
		return sample{}, err
	}
	return sample{typ: typ, at: at, value: v}, nil
}

// Timestamps are kept to the microsecond, which Redis sorted-set scores (a
// float64) hold exactly across the accepted range of years.
var (
	minTimestamp = time.Date(1900, 1, 1, 0, 0, 0, 0, time.UTC)
	maxTimestamp = time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC)
)

// parseTimestamp accepts RFC 3339 with or without a zone; no zone means UTC.
// RFC 3339 allows a lowercase "t" and "z", which Go's layout does not.
func parseTimestamp(s string) (int64, error) {
	u := strings.ToUpper(s)
	t, err := time.Parse(time.RFC3339Nano, u)
	if err != nil {
		t, err = time.ParseInLocation("2006-01-02T15:04:05.999999999", u, time.UTC)
	}
	if err != nil {
		return 0, fmt.Errorf("must be RFC 3339, such as 2025-01-01T10:00:00Z or 2025-01-01T10:00:00 (UTC); got %q", truncate(s, 40))
	}
	if t.Before(minTimestamp) || !t.Before(maxTimestamp) {
		return 0, errors.New("must be from the year 1900 up to, not including, 2200")
	}
	return t.UnixMicro(), nil
}

func validType(t string) error {
	if len(t) == 0 || len(t) > 64 {
		return errors.New("type must be 1 to 64 characters")
	}
	for i := 0; i < len(t); i++ {
		c := t[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '.' || c == '-') {
			return errors.New("type may contain only A-Z, a-z, 0-9, '_', '.' and '-'")
		}
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

func parseSummaryQuery(q url.Values) (string, window, error) {
	typ := q.Get("metric_type")
	if typ == "" {
		return "", window{}, unprocessable("metric_type is required")
	}
	if err := validType(typ); err != nil {
		return "", window{}, unprocessable("metric_type: %s", strings.TrimPrefix(err.Error(), "type "))
	}
	w := allTime
	for _, b := range []struct {
		name string
		dst  *int64
	}{{"from", &w.from}, {"to", &w.to}} {
		if s := q.Get(b.name); s != "" {
			at, err := parseTimestamp(s)
			if err != nil {
				return "", window{}, unprocessable("%s %s", b.name, err)
			}
			*b.dst = at
		}
	}
	if w.from > w.to {
		return "", window{}, unprocessable("from must not be after to")
	}
	return typ, w, nil
}

// render is the summary's JSON body. A type with no samples has no min or
// max.
func (s stats) render(typ string) []byte {
	out := struct {
		Type    string   `json:"type"`
		Count   int64    `json:"count"`
		Average float64  `json:"average"`
		Sum     float64  `json:"sum"`
		Min     *float64 `json:"min,omitempty"`
		Max     *float64 `json:"max,omitempty"`
	}{Type: typ, Count: s.count, Sum: finite(s.sum)}
	if s.count > 0 {
		out.Average = finite(s.sum / float64(s.count))
		out.Min, out.Max = &s.min, &s.max
	}
	body, _ := json.Marshal(out) // cannot fail: every float is finite
	return append(body, '\n')
}

// finite clamps a sum that overflowed float64 to the largest finite value,
// since JSON has no infinity.
func finite(f float64) float64 {
	return math.Max(-math.MaxFloat64, math.Min(math.MaxFloat64, f))
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
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

// handleIngest stores samples, and once they are stored hands them to
// announce for the live streams, when it is not nil.
func handleIngest(log *slog.Logger, cfg config, tel *telemetry, store metricStore, announce func([]typeBatch, time.Time), now func() time.Time) http.Handler {
	var bodies bodyBuffers
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key, err := readOnceKey(r)
		var print *[32]byte // the request's digest, for a key
		if key != "" {
			print = new([32]byte)
		}
		var samples []sample
		var batch bool
		if err == nil {
			samples, batch, err = readSamples(w, r, cfg, &bodies, print)
		}
		answer := storedOne
		if err == nil && batch {
			answer = fmt.Appendf(nil, `{"message":"Metrics stored successfully","count":%d}`+"\n", len(samples))
		}
		var o *onceKey
		if err == nil && key != "" {
			o = newOnceKey(key, onceScope(r), *print, http.StatusCreated, answer)
		}
		if err == nil {
			err = ingestSamples(r.Context(), cfg, tel, store, announce, samples, o, func(i int) string { return item(batch, i) }, now())
		}
		if replayed(w, err) {
			return
		}
		if err != nil {
			writeFailure(w, r, log, err)
			return
		}
		writeRaw(w, http.StatusCreated, answer)
	})
}

// ingestSamples stores one request's samples as one ingest, with the record
// o of its Idempotency-Key when it is not nil, and once they are stored
// hands them to announce for the live streams, when it is not nil. Its
// refusals name the sample at fault by where (item i, line n).
func ingestSamples(ctx context.Context, cfg config, tel *telemetry, store metricStore, announce func([]typeBatch, time.Time), samples []sample, o *onceKey, where func(int) string, t time.Time) error {
	if err := checkFuture(samples, where, t, cfg.MaxFuture, tel); err != nil {
		return err
	}
	batches := aggregate(samples, cfg.Retention)
	var err error
	if o != nil {
		err = store.addOnce(ctx, batches, t, o)
	} else {
		err = store.add(ctx, batches, t)
	}
	if err != nil {
		return ingestRefusal(err, samples, where, cfg, tel)
	}
	if announce != nil {
		announce(batches, t)
	}
	tel.ingested.Add(uint64(len(samples)))
	return nil
}

// checkFuture refuses samples more than MAX_FUTURE ahead of the clock.
func checkFuture(samples []sample, where func(int) string, now time.Time, ahead time.Duration, tel *telemetry) error {
	limit := now.Add(ahead).UnixMicro()
	for i, s := range samples {
		if s.at > limit {
			tel.refused("future", len(samples))
			return unprocessable("%stimestamp %s is more than %s ahead of the server's clock",
				where(i), time.UnixMicro(s.at).UTC().Format(time.RFC3339Nano), ahead)
		}
	}
	return nil
}

// ingestRefusal words the store's refusals, naming the first sample at
// fault; other errors pass through.
func ingestRefusal(err error, samples []sample, where func(int) string, cfg config, tel *telemetry) error {
	if tm := (*tooManyTypesError)(nil); errors.As(err, &tm) {
		tel.refused("max_types", len(samples))
		return unprocessable("%stype %q is new, and the limit of %d distinct metric types is reached",
			where(firstOf(samples, tm.typ, nil)), tm.typ, cfg.MaxTypes)
	}
	if ts := (*tooManySeriesError)(nil); errors.As(err, &ts) {
		tel.refused("max_series", len(samples))
		i := firstOf(samples, ts.typ, func(s sample) bool { return s.series == ts.id })
		return unprocessable("%slabels {%s} make a new series of %s, and the limit of %d series per type is reached",
			where(i), ts.id, ts.typ, cfg.MaxSeries)
	}
	if to := (*tooOldError)(nil); errors.As(err, &to) {
		tel.refused("retention", len(samples))
		i := firstOf(samples, to.typ, func(s sample) bool { return !cfg.Retention.keepsSample(s.second(), to.anchor) })
		kept := to.anchor
		for r := res1s; r < numRes; r++ {
			kept = min(kept, cfg.Retention.firstKept(r, to.anchor))
		}
		return unprocessable("%stimestamp %s is older than retention keeps: data of %s is kept from %s",
			where(i), time.UnixMicro(samples[i].at).UTC().Format(time.RFC3339Nano), to.typ, formatTime(kept))
	}
	return err
}

// firstOf is the index of the first sample of type typ for which ok holds
// (any, when ok is nil).
func firstOf(samples []sample, typ string, ok func(sample) bool) int {
	for i, s := range samples {
		if s.typ == typ && (ok == nil || ok(s)) {
			return i
		}
	}
	return 0
}

// item names a batch's element in a message; a single metric needs no
// name.
func item(batch bool, i int) string {
	if !batch {
		return ""
	}
	return fmt.Sprintf("item %d: ", i)
}

func handleSummary(log *slog.Logger, q *reader) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		query := r.URL.Query()
		typ, from, to, err := parseSummaryQuery(query)
		var f labelFilter
		if err == nil {
			f, err = parseLabelFilter(query["label"], query["group_by"])
		}
		var body any
		var raw []byte
		switch {
		case err != nil:
		case f.groupBy != "":
			body, raw, err = q.groupedSummary(r.Context(), typ, from, to, f, true)
		default:
			body, raw, err = q.summaryAnswer(r.Context(), typ, from, to, f, true)
		}
		writeAnswer(w, r, log, body, raw, err)
	})
}

func handleSeries(log *slog.Logger, q *reader) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		query := r.URL.Query()
		typ, plan, err := parseSeriesQuery(query, q.now())
		var f labelFilter
		if err == nil {
			f, err = parseLabelFilter(query["label"], query["group_by"])
		}
		var body any
		var raw []byte
		switch {
		case err != nil:
		case f.groupBy != "":
			body, raw, err = q.groupedSeries(r.Context(), typ, plan, f, true)
		default:
			body, raw, err = q.series(r.Context(), typ, plan, f, true)
		}
		writeAnswer(w, r, log, body, raw, err)
	})
}

// writeAnswer writes a read's answer: raw when the cache gave its JSON
// as it is (the JSON writeJSON would write for body), body otherwise.
func writeAnswer(w http.ResponseWriter, r *http.Request, log *slog.Logger, body any, raw []byte, err error) {
	switch {
	case err != nil:
		writeFailure(w, r, log, err)
	case raw != nil:
		writeRaw(w, http.StatusOK, append(raw, '\n'))
	default:
		writeJSON(w, http.StatusOK, body)
	}
}

func handleLabels(log *slog.Logger, q *reader) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		typ, err := parseMetricType(r.URL.Query())
		var labels map[string][]string
		if err == nil {
			labels, err = q.labels(r.Context(), typ)
		}
		if err != nil {
			writeFailure(w, r, log, err)
			return
		}
		writeJSON(w, http.StatusOK, struct {
			Type   string              `json:"type"`
			Labels map[string][]string `json:"labels"`
		}{typ, labels})
	})
}

func handleTypes(log *slog.Logger, q *reader) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		prefix := r.URL.Query().Get("prefix")
		types, err := q.types(r.Context(), prefix)
		if err != nil {
			writeFailure(w, r, log, err)
			return
		}
		writeJSON(w, http.StatusOK, struct {
			Types []typeInfo `json:"types"`
		}{types})
	})
}

// ---- validation ----

// readSamples reads and validates the body of an ingest: one metric object
// or an array of them. It reports whether the body was an array, and puts
// the request's digest (requestPrint) in print when that is not nil.
func readSamples(w http.ResponseWriter, r *http.Request, cfg config, bodies *bodyBuffers, print *[32]byte) ([]sample, bool, error) {
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
	// The body grows as it arrives, so a slow client declaring a large
	// one holds no more memory than about twice what it has sent.
	body, err := bodies.read(http.MaxBytesReader(w, r.Body, cfg.MaxBodyBytes))
	if err != nil {
		if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
			return nil, false, tooLarge()
		}
		return nil, false, &requestError{http.StatusBadRequest, "could not read the body"}
	}
	defer bodies.release(body) // samples hold no part of it
	if print != nil {
		*print = requestPrint(r.URL.Path, "", body)
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
	Timestamp *string         `json:"timestamp"`
	Value     *float64        `json:"value"`
	Type      *string         `json:"type"`
	Labels    json.RawMessage `json:"labels"`
}

var sampleFields = [][]byte{[]byte("timestamp"), []byte("value"), []byte("type"), []byte("labels")}

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
	}{{"timestamp", &in.Timestamp}, {"value", &in.Value}, {"type", &in.Type}, {"labels", &in.Labels}} {
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
	smp, err := checkSample(*in.Timestamp, *in.Value, *in.Type)
	if err != nil || in.Labels == nil {
		return smp, err
	}
	labels, err := parseLabels(in.Labels)
	if err != nil {
		return sample{}, err
	}
	smp.series = seriesID(labels)
	return smp, nil
}

// checkSample validates a decoded sample's fields.
func checkSample(timestamp string, v float64, typ string) (sample, error) {
	at, err := parseTimestamp(timestamp)
	if err != nil {
		return sample{}, fmt.Errorf("timestamp %w", err)
	}
	if v, err = checkValue(v); err != nil {
		return sample{}, err
	}
	if err := validType(typ); err != nil {
		return sample{}, err
	}
	return sample{typ: typ, at: at, value: v}, nil
}

// checkValue refuses values no sum can hold, and stores -0 as 0, so a
// minimum never reads "-0".
func checkValue(v float64) (float64, error) {
	if math.IsNaN(v) || math.Abs(v) > maxAbsValue {
		return 0, fmt.Errorf("value must be a finite number of magnitude at most %g", maxAbsValue)
	}
	if v == 0 {
		return 0, nil
	}
	return v, nil
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
	if at, ok := quickTimestamp(s); ok {
		return at, nil
	}
	return generalTimestamp(s)
}

// generalTimestamp is parseTimestamp by the time package, for any string.
func generalTimestamp(s string) (int64, error) {
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

func parseMetricType(q url.Values) (string, error) {
	typ := q.Get("metric_type")
	if typ == "" {
		return "", unprocessable("metric_type is required")
	}
	if err := validType(typ); err != nil {
		return "", unprocessable("metric_type: %s", strings.TrimPrefix(err.Error(), "type "))
	}
	return typ, nil
}

// parseBound reads a window bound: RFC 3339 as for ingest, a whole second.
// A "+hh:mm" offset typed unescaped into a query string arrives with its
// plus turned into a space; a space in that place is read as the plus.
func parseBound(name, s string) (int64, error) {
	if n := len(s); n > 6 && s[n-6] == ' ' && s[n-3] == ':' {
		s = s[:n-6] + "+" + s[n-5:]
	}
	at, err := parseTimestamp(s)
	if err != nil {
		return 0, unprocessable("%s %s", name, err)
	}
	if at%1_000_000 != 0 {
		return 0, unprocessable("%s must be a whole second: windows are resolved to the second; got %q", name, truncate(s, 40))
	}
	return at / 1_000_000, nil
}

func parseSummaryQuery(q url.Values) (typ string, from, to *int64, err error) {
	if typ, err = parseMetricType(q); err != nil {
		return "", nil, nil, err
	}
	for _, b := range []struct {
		name string
		dst  **int64
	}{{"from", &from}, {"to", &to}} {
		if s := q.Get(b.name); s != "" {
			t, err := parseBound(b.name, s)
			if err != nil {
				return "", nil, nil, err
			}
			*b.dst = &t
		}
	}
	if from != nil && to != nil && *from > *to {
		return "", nil, nil, unprocessable("from must not be after to")
	}
	return typ, from, to, nil
}

// parseSeriesQuery reads a series request: step (a duration or seconds,
// default 1m), and from and to as RFC 3339 or a negative duration before
// now; to defaults to now, from to an hour before to.
func parseSeriesQuery(q url.Values, now time.Time) (string, seriesPlan, error) {
	typ, err := parseMetricType(q)
	if err != nil {
		return "", seriesPlan{}, err
	}
	step := int64(60)
	if s := q.Get("step"); s != "" {
		d, err := parseDuration(s)
		if err != nil || d <= 0 || d%time.Second != 0 || d > 366*24*time.Hour {
			return "", seriesPlan{}, unprocessable("step must be a whole number of seconds, as a Go duration (5m) or seconds (300), up to a year; got %q", truncate(s, 40))
		}
		step = int64(d / time.Second)
	}
	nowUs := now.UnixMicro()
	bound := func(name string, roundUp bool) (*int64, error) {
		s := q.Get(name)
		if s == "" {
			return nil, nil
		}
		var t int64
		if strings.HasPrefix(s, "-") {
			d, err := time.ParseDuration(s)
			if err != nil || d >= 0 {
				return nil, unprocessable("%s must be RFC 3339 or a negative duration such as -15m; got %q", name, truncate(s, 40))
			}
			us := nowUs + d.Microseconds()
			t = floorDiv(us, 1_000_000)
			if roundUp {
				t = -floorDiv(-us, 1_000_000)
			}
		} else if t, err = parseBound(name, s); err != nil {
			return nil, err
		}
		return &t, nil
	}
	from, err := bound("from", false)
	if err != nil {
		return "", seriesPlan{}, err
	}
	to, err := bound("to", true)
	if err != nil {
		return "", seriesPlan{}, err
	}
	end := -floorDiv(-nowUs, 1_000_000)
	if to != nil {
		end = *to
	}
	start := end - 3600
	if from != nil {
		start = *from
	}
	if lo, hi := minTimestamp.Unix(), maxTimestamp.Unix(); start < lo || end > hi {
		return "", seriesPlan{}, unprocessable("from and to must be from the year 1900 up to, not including, 2200")
	}
	if start > end {
		return "", seriesPlan{}, unprocessable("from must not be after to")
	}
	plan, err := planSeries(start, end, step)
	return typ, plan, err
}

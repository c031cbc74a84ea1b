package main

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// The InfluxDB write endpoints, POST /write (v1) and POST /api/v2/write
// (v2), take the line protocol, so Telegraf, the InfluxDB client
// libraries and anything else that speaks it can send data unchanged:
//
//	measurement[,tag=value...] field=value[,field=value...] [timestamp]
//
// Each numeric field of a line (a float, an integer with i, an unsigned
// with u; strings and booleans are skipped) is a sample: of the type
// measurement when the field is named value, measurement.field otherwise,
// with the tags as its labels. One request is one ingest, as a batch of
// POST /api/metrics is: every line is stored, or none.

// linePrecisions maps each precision the two APIs name to its factor to
// microseconds; a negative factor divides.
var linePrecisions = map[string]int64{"": -1000, "n": -1000, "ns": -1000, "u": 1, "us": 1, "ms": 1000, "s": 1_000_000,
	"m": 60_000_000, "h": 3_600_000_000} // v1's minutes and hours too

// errTooManySamples is a body with more than MAX_BATCH samples: a limit,
// 422, as for a batch of POST /api/metrics, not a malformed line.
var errTooManySamples = errors.New("more than the limit")

// lineSamples is a line protocol body's samples with, for each, the number
// of its line (from 1).
type lineSamples struct {
	samples []sample
	lines   []int
}

// parseLineProtocol reads a whole body. scale is the precision's factor
// (linePrecisions); now, in Unix microseconds, stamps lines without a
// timestamp. It fails on the first bad line, naming it, and on more than
// maxBatch samples.
func parseLineProtocol(body []byte, scale, now int64, maxBatch int) (lineSamples, error) {
	var out lineSamples
	for n := 1; len(body) > 0; {
		line, rest := nextLine(body)
		at := n
		n += 1 + bytes.Count(line, []byte{'\n'}) // a string may hold newlines
		body = rest
		line = bytes.TrimRight(bytes.TrimLeft(line, " \t"), " \t\r")
		if len(line) == 0 || line[0] == '#' {
			continue
		}
		before := len(out.samples)
		var err error
		if out.samples, err = parseLine(line, scale, now, maxBatch-before, out.samples); err != nil {
			return lineSamples{}, fmt.Errorf("line %d: %w", at, err)
		}
		for range len(out.samples) - before {
			out.lines = append(out.lines, at)
		}
	}
	return out, nil
}

// nextLine cuts the first line off body: up to a newline that is neither
// escaped nor inside a string field's quotes; a comment ends at the first.
func nextLine(body []byte) (line, rest []byte) {
	if t := bytes.TrimLeft(body, " \t"); len(t) > 0 && t[0] == '#' {
		if i := bytes.IndexByte(body, '\n'); i >= 0 {
			return body[:i], body[i+1:]
		}
		return body, nil
	}
	fields, quoted := false, false
	for i := 0; i < len(body); i++ {
		switch c := body[i]; {
		case c == '\\':
			i++ // whatever it escapes
		case quoted:
			quoted = c != '"'
		case c == '\n':
			return body[:i], body[i+1:]
		case c == ' ':
			fields = true
		case fields && c == '"' && i > 0 && body[i-1] == '=':
			quoted = true
		}
	}
	return body, nil
}

// token scans from s[i] to the first of the unescaped bytes in stops, or
// the end, skipping what a backslash escapes; it returns the token
// unescaped and where it ended.
func token(s []byte, i int, stops string) (string, int) {
	start, escaped := i, false
	for i < len(s) && strings.IndexByte(stops, s[i]) < 0 {
		if s[i] == '\\' && i+1 < len(s) {
			escaped = true
			i++
		}
		i++
	}
	if !escaped {
		return string(s[start:i]), i
	}
	return unescape(s[start:i], stops), i
}

// unescape drops the backslash before a byte of specials or another
// backslash; any other backslash is a backslash.
func unescape(s []byte, specials string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) && (s[i+1] == '\\' || strings.IndexByte(specials, s[i+1]) >= 0) {
			i++
		}
		out = append(out, s[i])
	}
	return string(out)
}

// parseLine appends one line's samples to out, failing past budget of
// them.
func parseLine(s []byte, scale, now int64, budget int, out []sample) ([]sample, error) {
	measurement, i := token(s, 0, ", ")
	if measurement == "" {
		return out, errors.New("the measurement is missing")
	}
	var labels []label
	for i < len(s) && s[i] == ',' {
		var name, value string
		name, i = token(s, i+1, ",= ")
		if i >= len(s) || s[i] != '=' {
			return out, fmt.Errorf("tag %q has no value", truncate(name, 70))
		}
		value, i = token(s, i+1, ",= ")
		if value == "" {
			return out, fmt.Errorf("tag %q has an empty value", truncate(name, 70))
		}
		if err := validLabelName(name); err != nil {
			return out, fmt.Errorf("tag: %w", err)
		}
		if err := validLabelValue(name, value); err != nil {
			return out, fmt.Errorf("tag %w", err)
		}
		for _, l := range labels {
			if l.name == name {
				return out, fmt.Errorf("tag %s appears twice", name)
			}
		}
		if len(labels) == maxLabels {
			return out, fmt.Errorf("at most %d tags per line", maxLabels)
		}
		labels = append(labels, label{name, value})
	}
	if i >= len(s) || s[i] != ' ' {
		return out, errors.New("the field set is missing")
	}
	for i < len(s) && s[i] == ' ' {
		i++
	}
	type field struct {
		name  string
		value float64
	}
	var fields []field
	seen := map[string]int{} // each field's place in fields
	for {
		var name string
		name, i = token(s, i, ",= ")
		if name == "" || i >= len(s) || s[i] != '=' {
			return out, errors.New("a field must be key=value")
		}
		i++
		var v float64
		var numeric bool
		var err error
		if v, numeric, i, err = fieldValue(s, i); err != nil {
			return out, fmt.Errorf("field %s: %w", truncate(name, 70), err)
		}
		if numeric {
			// A field named twice counts once, with its last value.
			if k, ok := seen[name]; ok {
				fields[k].value = v
			} else if seen[name] = len(fields); len(fields) == budget {
				return out, fmt.Errorf("%w of %d samples in one request", errTooManySamples, budget+len(out))
			} else {
				fields = append(fields, field{name, v})
			}
		}
		if i >= len(s) || s[i] != ',' {
			break
		}
		i++
	}
	at := now
	for i < len(s) && s[i] == ' ' {
		i++
	}
	if i < len(s) {
		ts, err := strconv.ParseInt(string(s[i:]), 10, 64)
		if err != nil {
			return out, fmt.Errorf("timestamp %q must be an integer", truncate(string(s[i:]), 40))
		}
		var ok bool
		if at, ok = scaled(ts, scale); !ok || at < minTimestamp.UnixMicro() || at >= maxTimestamp.UnixMicro() {
			return out, errors.New("timestamp must be from the year 1900 up to, not including, 2200")
		}
	}
	series := seriesID(labels)
	for _, f := range fields {
		typ := measurement
		if f.name != "value" {
			typ = measurement + "." + f.name
		}
		if err := validType(typ); err != nil {
			return out, fmt.Errorf("measurement %q, field %q: %w", truncate(measurement, 70), truncate(f.name, 70), err)
		}
		out = append(out, sample{typ: typ, series: series, at: at, value: f.value})
	}
	return out, nil
}

// fieldValue reads the value of a field from s[i]: whether it is a number
// (and which), and where it ends.
func fieldValue(s []byte, i int) (v float64, numeric bool, end int, err error) {
	if i < len(s) && s[i] == '"' {
		// A string: skipped, up to its unescaped closing quote.
		for j := i + 1; j < len(s); j++ {
			switch s[j] {
			case '\\':
				j++
			case '"':
				return 0, false, j + 1, nil
			}
		}
		return 0, false, len(s), errors.New("a string has no closing quote")
	}
	end = i
	for end < len(s) && s[end] != ',' && s[end] != ' ' {
		end++
	}
	text := string(s[i:end])
	switch text {
	case "t", "T", "true", "True", "TRUE", "f", "F", "false", "False", "FALSE":
		return 0, false, end, nil
	case "":
		return 0, false, end, errors.New("the value is missing")
	}
	switch last := text[len(text)-1]; {
	// An integer's suffix follows something number-like; tru or 5xi
	// fall through to the general refusal below.
	case last == 'i' && floatSyntax(text[:len(text)-1]):
		n, perr := strconv.ParseInt(text[:len(text)-1], 10, 64)
		if perr != nil {
			return 0, false, end, fmt.Errorf("%q is not a 64-bit integer", truncate(text, 40))
		}
		return float64(n), true, end, nil
	case last == 'u' && floatSyntax(text[:len(text)-1]):
		n, perr := strconv.ParseUint(text[:len(text)-1], 10, 64)
		if perr != nil {
			return 0, false, end, fmt.Errorf("%q is not a 64-bit unsigned integer", truncate(text, 40))
		}
		return float64(n), true, end, nil
	}
	if !floatSyntax(text) {
		return 0, false, end, fmt.Errorf("%q is not a number, string or boolean", truncate(text, 40))
	}
	v, perr := strconv.ParseFloat(text, 64)
	if perr != nil || math.IsInf(v, 0) {
		return 0, false, end, fmt.Errorf("%q is out of range", truncate(text, 40))
	}
	return v, true, end, nil
}

// floatSyntax accepts the line protocol's floats, [-+]digits[.digits][e[-+]digits]
// (either digits part may be empty, not both), and not what else
// ParseFloat takes: inf, nan, hexadecimal, underscores.
func floatSyntax(s string) bool {
	i := 0
	if i < len(s) && (s[i] == '-' || s[i] == '+') {
		i++
	}
	digits := func() int {
		from := i
		for i < len(s) && '0' <= s[i] && s[i] <= '9' {
			i++
		}
		return i - from
	}
	n := digits()
	if i < len(s) && s[i] == '.' {
		i++
		n += digits()
	}
	if n == 0 {
		return false
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '-' || s[i] == '+') {
			i++
		}
		if digits() == 0 {
			return false
		}
	}
	return i == len(s)
}

// scaled is ts in microseconds, by the precision's factor, or false when
// that overflows.
func scaled(ts, scale int64) (int64, bool) {
	if scale < 0 {
		return floorDiv(ts, -scale), true
	}
	if ts > math.MaxInt64/scale || ts < math.MinInt64/scale {
		return 0, false
	}
	return ts * scale, true
}

// handleLineProtocol is both write endpoints. It answers 204 with no body
// when every line was stored, and its errors in the InfluxDB form,
// {"code":"...","message":"..."}.
func handleLineProtocol(log *slog.Logger, cfg config, tel *telemetry, store metricStore, announce func([]typeBatch, time.Time), now func() time.Time) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t := now()
		scale, ok := linePrecisions[r.URL.Query().Get("precision")]
		if !ok {
			writeInfluxError(w, http.StatusBadRequest, fmt.Sprintf("precision %q must be ns, us, ms or s (or v1's n, u, m or h)", truncate(r.URL.Query().Get("precision"), 20)))
			return
		}
		key, err := readOnceKey(r)
		var body []byte
		if err == nil {
			body, err = readLineBody(w, r, cfg.MaxBodyBytes)
		}
		if err != nil {
			var re *requestError
			errors.As(err, &re)
			writeInfluxError(w, re.status, re.detail)
			return
		}
		ls, err := parseLineProtocol(body, scale, t.UnixMicro(), cfg.MaxBatch)
		if err != nil {
			status := http.StatusBadRequest
			if errors.Is(err, errTooManySamples) {
				status = http.StatusUnprocessableEntity
			}
			writeInfluxError(w, status, err.Error())
			return
		}
		var o *onceKey
		if key != "" {
			// The precision as read: "", "ns" and "n" ask the same.
			print := requestPrint(r.URL.Path, strconv.FormatInt(scale, 10), body)
			o = newOnceKey(key, onceScope(r), print, http.StatusNoContent, nil)
		}
		// A body of no samples stores nothing, but its key is recorded all
		// the same: the key is then this request's.
		if len(ls.samples) > 0 || o != nil {
			where := func(i int) string { return fmt.Sprintf("line %d: ", ls.lines[i]) }
			err := ingestSamples(r.Context(), cfg, tel, store, announce, ls.samples, o, where, t)
			if replayed(w, err) {
				return
			}
			if err != nil {
				var re *requestError
				if !errors.As(err, &re) {
					log.Error("ingest failed", "route", "POST "+r.URL.Path, "err", err)
					re = &requestError{http.StatusServiceUnavailable, "store unavailable, try again shortly"}
				}
				if re.status == http.StatusServiceUnavailable {
					w.Header().Set("Retry-After", "1")
				}
				if stored := storedTypes(err); stored != nil {
					writeJSON(w, re.status, struct {
						Code    string   `json:"code"`
						Message string   `json:"message"`
						Stored  []string `json:"stored"`
					}{influxCodes[re.status], partlyStoredDetail, stored})
					return
				}
				writeInfluxError(w, re.status, re.detail)
				return
			}
		}
		w.WriteHeader(http.StatusNoContent)
	})
}

// readLineBody reads the body within maxBytes, as it arrives and, when
// gzipped, as it is unpacked.
func readLineBody(w http.ResponseWriter, r *http.Request, maxBytes int64) ([]byte, error) {
	tooLarge := &requestError{http.StatusRequestEntityTooLarge, fmt.Sprintf("body exceeds %d bytes", maxBytes)}
	if r.ContentLength > maxBytes {
		return nil, tooLarge
	}
	var in io.Reader = http.MaxBytesReader(w, r.Body, maxBytes)
	// Encodings are named without regard to case (RFC 9110, 8.4.1).
	switch enc := strings.ToLower(strings.TrimSpace(r.Header.Get("Content-Encoding"))); enc {
	case "", "identity":
	case "gzip", "x-gzip":
		zr, err := gzip.NewReader(in)
		if err != nil {
			return nil, &requestError{http.StatusBadRequest, "the body is not gzip"}
		}
		in = zr
	default:
		return nil, &requestError{http.StatusUnsupportedMediaType, fmt.Sprintf("Content-Encoding %q: only gzip is understood", truncate(enc, 20))}
	}
	body, err := io.ReadAll(io.LimitReader(in, maxBytes+1))
	switch mbe := (*http.MaxBytesError)(nil); {
	case errors.As(err, &mbe) || int64(len(body)) > maxBytes:
		return nil, tooLarge
	case err != nil:
		return nil, &requestError{http.StatusBadRequest, "could not read the body"}
	}
	return body, nil
}

// influxCodes are the InfluxDB API's error codes, by status.
var influxCodes = map[int]string{
	http.StatusBadRequest:            "invalid",
	http.StatusUnauthorized:          "unauthorized",
	http.StatusRequestEntityTooLarge: "request too large",
	http.StatusUnsupportedMediaType:  "unsupported media type",
	http.StatusUnprocessableEntity:   "unprocessable entity",
	http.StatusTooManyRequests:       "too many requests",
	http.StatusServiceUnavailable:    "unavailable",
}

func writeInfluxError(w http.ResponseWriter, status int, message string) {
	code, ok := influxCodes[status]
	if !ok {
		code = "internal error"
	}
	writeJSON(w, status, struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}{code, message})
}

package main

import (
	"bytes"
	"slices"
	"strconv"
)

// scanSamples reads the usual ingest body a few times faster than
// encoding/json: one metric object, or an array of them, whose keys are
// exactly "timestamp", "value" and "type", once each, with plain strings
// and JSON numbers, every sample valid. ok is false for anything else, and
// the body then goes through encoding/json, which also words the error;
// the fuzz target checks that both readings agree.
func scanSamples(body []byte, maxBatch int) (samples []sample, batch bool, ok bool) {
	s := scanner{b: body}
	s.space()
	if s.peek() == '{' {
		smp, ok := s.object()
		s.space()
		if !ok || s.i != len(s.b) {
			return nil, false, false
		}
		return []sample{smp}, false, true
	}
	if !s.take('[') {
		return nil, false, false
	}
	// One string per type name and per label set in the batch.
	s.types, s.ids = map[string]string{}, map[string]string{}
	// No object the fast path takes is shorter than minObjectBytes, so this
	// is room for every sample, however the body is spaced.
	samples = make([]sample, 0, min(maxBatch, len(body)/minObjectBytes+1))
	for {
		s.space()
		smp, ok := s.object()
		if !ok || len(samples) == maxBatch {
			return nil, true, false
		}
		samples = append(samples, smp)
		s.space()
		if s.take(']') {
			break
		}
		if !s.take(',') {
			return nil, true, false
		}
	}
	s.space()
	return samples, true, s.i == len(s.b)
}

// minObjectBytes is the length of the shortest object the fast path takes:
// {"timestamp":"2025-01-01T10:00:00","value":0,"type":"a"}.
const minObjectBytes = 56

// scanner walks a JSON text; its methods report false at the first byte
// that is not what the fast path expects.
type scanner struct {
	b []byte
	i int
	// The minute (2025-01-01T10:00) of the last timestamp read, and its
	// Unix seconds: a batch's timestamps mostly share it.
	minute     []byte
	minuteSecs int64
	// In a batch, the type names and the series ids already seen (by the
	// labels object as written), so each is checked and allocated once.
	types, ids map[string]string
}

// timestamp is quickTimestamp, reading a minute only when it differs from
// the last timestamp's.
func (s *scanner) timestamp(ts []byte) (int64, bool) {
	if len(ts) < 16 || !bytes.Equal(ts[:16], s.minute) {
		secs, ok := quickMinute(ts)
		if !ok {
			return 0, false
		}
		s.minute, s.minuteSecs = ts[:16], secs
	}
	return quickSeconds(s.minuteSecs, ts[16:])
}

func (s *scanner) peek() byte {
	if s.i < len(s.b) {
		return s.b[s.i]
	}
	return 0
}

func (s *scanner) take(c byte) bool {
	if s.peek() == c {
		s.i++
		return true
	}
	return false
}

func (s *scanner) space() {
	if s.i < len(s.b) && s.b[s.i] > ' ' {
		return // the usual case: no space at all
	}
	for s.i < len(s.b) && (s.b[s.i] == ' ' || s.b[s.i] == '\t' || s.b[s.i] == '\n' || s.b[s.i] == '\r') {
		s.i++
	}
}

// keyHint tells "timestamp", "value", "type" and "labels" apart by their
// first letters: 'i' (ti), 'v', 'y' (ty), 'l', or 0.
func (s *scanner) keyHint() byte {
	if s.i+2 >= len(s.b) || s.b[s.i] != '"' {
		return 0
	}
	switch s.b[s.i+1] {
	case 'v', 'l':
		return s.b[s.i+1]
	case 't':
		return s.b[s.i+2]
	}
	return 0
}

// key reads the object key k (quoted, as it is written) and the colon
// after it, or nothing.
func (s *scanner) key(k string) bool {
	if !bytes.HasPrefix(s.b[s.i:], []byte(k)) {
		return false
	}
	s.i += len(k)
	s.space()
	if !s.take(':') {
		return false
	}
	s.space()
	return true
}

// raw reads a string value up to the next quote, escapes and all: its
// caller checks its characters, which never include a backslash, so an
// escaped quote is never taken for the end.
func (s *scanner) raw() ([]byte, bool) {
	if !s.take('"') {
		return nil, false
	}
	n := bytes.IndexByte(s.b[s.i:], '"')
	if n < 0 {
		return nil, false
	}
	v := s.b[s.i : s.i+n]
	s.i += n + 1
	return v, true
}

// num reads a number in JSON's grammar, which is narrower than
// strconv.ParseFloat's (no "Inf", hex, underscores or leading "+").
func (s *scanner) num() (float64, bool) {
	start := s.i
	neg := s.take('-')
	intStart := s.i
	switch {
	case s.take('0'):
	case s.digits() == 0:
		return 0, false
	}
	intEnd, fracDigits := s.i, 0
	if s.take('.') {
		if fracDigits = s.digits(); fracDigits == 0 {
			return 0, false
		}
	}
	if s.take('e') || s.take('E') {
		if !s.take('+') {
			s.take('-')
		}
		if s.digits() == 0 {
			return 0, false
		}
	} else if digits := intEnd - intStart + fracDigits; digits <= 15 {
		// Fifteen digits are an integer below 2^53, so float64 holds it and
		// 10^fracDigits exactly, and one division rounds correctly: the
		// exact fast path strconv takes too, without its parsing.
		m := 0.0
		for _, c := range s.b[intStart:s.i] {
			if c != '.' {
				m = m*10 + float64(c-'0')
			}
		}
		v := m / pow10[fracDigits]
		if neg {
			v = -v
		}
		return v, true
	}
	v, err := strconv.ParseFloat(string(s.b[start:s.i]), 64)
	return v, err == nil
}

var pow10 = [16]float64{1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15}

func (s *scanner) digits() int {
	n := 0
	for s.i < len(s.b) && '0' <= s.b[s.i] && s.b[s.i] <= '9' {
		s.i++
		n++
	}
	return n
}

// object reads one metric object.
func (s *scanner) object() (sample, bool) {
	if !s.take('{') {
		return sample{}, false
	}
	var (
		ts, typ []byte
		v       float64
		series  string
		seen    int
	)
	for {
		s.space()
		var bit int
		ok := false
		// The byte after the quote tells the keys apart, so each object key
		// is compared once.
		switch s.keyHint() {
		case 'i':
			if !s.key(`"timestamp"`) {
				return sample{}, false
			}
			ts, ok = s.raw()
			bit = 1
		case 'v':
			if !s.key(`"value"`) {
				return sample{}, false
			}
			v, ok = s.num()
			bit = 2
		case 'y':
			if !s.key(`"type"`) {
				return sample{}, false
			}
			typ, ok = s.raw()
			bit = 4
		case 'l':
			if !s.key(`"labels"`) {
				return sample{}, false
			}
			series, ok = s.labels()
			bit = 8
		default:
			return sample{}, false // other keys take the general path
		}
		if !ok || seen&bit != 0 {
			return sample{}, false // a repeated key takes the general path
		}
		seen |= bit
		s.space()
		if s.take('}') {
			break
		}
		if !s.take(',') {
			return sample{}, false
		}
	}
	if seen&7 != 7 {
		return sample{}, false // a missing key: the general path words it
	}
	name, ok := s.types[string(typ)]
	if !ok {
		name = string(typ)
		if validType(name) != nil {
			return sample{}, false
		}
		if s.types != nil {
			s.types[name] = name
		}
	}
	at, ok := s.timestamp(ts)
	if !ok {
		return sample{}, false // an unusual timestamp takes the general path
	}
	v, err := checkValue(v)
	return sample{typ: name, series: series, at: at, value: v}, err == nil
}

// labels reads a labels object of plain strings (no escapes), valid as
// parseLabels would find it, as its series id. Anything else, null
// included, takes the general path, which also words the error.
func (s *scanner) labels() (string, bool) {
	start := s.i
	if !s.take('{') {
		return "", false
	}
	var pairs [maxLabels][2][]byte
	n := 0
	s.space()
	for !s.take('}') {
		if n > 0 {
			if !s.take(',') {
				return "", false
			}
			s.space()
		}
		if n == maxLabels {
			return "", false
		}
		name, ok := s.plain()
		s.space()
		if !ok || !s.take(':') {
			return "", false
		}
		s.space()
		value, ok := s.plain()
		if !ok {
			return "", false
		}
		pairs[n] = [2][]byte{name, value}
		n++
		s.space()
	}
	written := s.b[start:s.i]
	if id, ok := s.ids[string(written)]; ok {
		return id, true
	}
	labels := make([]label, n)
	for i, p := range pairs[:n] {
		labels[i] = label{string(p[0]), string(p[1])}
		if validLabelName(labels[i].name) != nil || validLabelValue(labels[i].name, labels[i].value) != nil ||
			slices.ContainsFunc(labels[:i], func(l label) bool { return l.name == labels[i].name }) {
			return "", false
		}
	}
	id := seriesID(labels)
	if s.ids != nil {
		s.ids[string(written)] = id
	}
	return id, true
}

// plain reads a string without escapes or control characters.
func (s *scanner) plain() ([]byte, bool) {
	if !s.take('"') {
		return nil, false
	}
	for j := s.i; j < len(s.b); j++ {
		switch c := s.b[j]; {
		case c == '"':
			v := s.b[s.i:j]
			s.i = j + 1
			return v, true
		case c == '\\' || c < 0x20:
			return nil, false
		}
	}
	return nil, false
}

// quickTimestamp reads the usual timestamp shape, as Unix microseconds:
// 2025-01-01T10:00:00, then up to nine fraction digits after a '.', then
// nothing, Z or an offset such as +02:00 ('t' and 'z' in either case).
// It gives what parseTimestamp gives for these, without allocating; ok is
// false for anything else, including dates out of range, which then take
// the general path (and its error message). A test and a fuzz target
// check both readings agree.
func quickTimestamp[T string | []byte](s T) (at int64, ok bool) {
	minute, ok := quickMinute(s)
	if !ok {
		return 0, false
	}
	return quickSeconds(minute, s[16:])
}

// quickMinute reads the date, hour and minute (2025-01-01T10:00) at the
// start of s, as the Unix seconds of that minute in UTC.
func quickMinute[T string | []byte](s T) (int64, bool) {
	if len(s) < 16 || s[4] != '-' || s[7] != '-' || s[10]|0x20 != 't' || s[13] != ':' {
		return 0, false
	}
	for _, i := range [...]int{0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15} {
		if s[i]-'0' > 9 {
			return 0, false
		}
	}
	two := func(i int) int { return int(s[i]-'0')*10 + int(s[i+1]-'0') }
	year, month, day, hour, minute := two(0)*100+two(2), two(5), two(8), two(11), two(14)
	if month < 1 || month > 12 || day < 1 || day > daysInMonth(year, month) || hour > 23 || minute > 59 {
		return 0, false
	}
	return daysFromCivil(year, month, day)*86400 + int64(hour*3600+minute*60), true
}

// quickSeconds reads the rest of a timestamp after its minute: the
// seconds (:05), any fraction and zone.
func quickSeconds[T string | []byte](minute int64, rest T) (int64, bool) {
	if len(rest) < 3 || rest[0] != ':' || rest[1]-'0' > 9 || rest[2]-'0' > 9 {
		return 0, false
	}
	sec := int(rest[1]-'0')*10 + int(rest[2]-'0')
	if sec > 59 {
		return 0, false
	}
	rest = rest[3:]
	micros := 0
	if len(rest) > 0 && rest[0] == '.' {
		n, frac := 1, 0
		for ; n < len(rest) && rest[n]-'0' <= 9; n++ {
			frac = frac*10 + int(rest[n]-'0')
		}
		if n == 1 || n > 10 {
			return 0, false
		}
		for range 10 - n {
			frac *= 10
		}
		micros = frac / 1000 // nanoseconds down to whole microseconds
		rest = rest[n:]
	}
	offset := 0
	switch {
	case len(rest) == 0:
	case len(rest) == 1 && rest[0]|0x20 == 'z':
	case len(rest) == 6 && (rest[0] == '+' || rest[0] == '-') && rest[3] == ':':
		if rest[1]-'0' > 9 || rest[2]-'0' > 9 || rest[4]-'0' > 9 || rest[5]-'0' > 9 {
			return 0, false
		}
		oh, om := int(rest[1]-'0')*10+int(rest[2]-'0'), int(rest[4]-'0')*10+int(rest[5]-'0')
		if oh > 23 || om > 59 {
			return 0, false
		}
		offset = (oh*60 + om) * 60
		if rest[0] == '-' {
			offset = -offset
		}
	default:
		return 0, false
	}
	secs := minute + int64(sec-offset)
	if secs < minTimestamp.Unix() || secs >= maxTimestamp.Unix() {
		return 0, false
	}
	return secs*1_000_000 + int64(micros), true
}

func daysInMonth(year, month int) int {
	switch month {
	case 2:
		if year%4 == 0 && (year%100 != 0 || year%400 == 0) {
			return 29
		}
		return 28
	case 4, 6, 9, 11:
		return 30
	}
	return 31
}

// daysFromCivil is the number of days from 1970-01-01 to the given date of
// the proleptic Gregorian calendar (Howard Hinnant's algorithm), for years
// from 1 on.
func daysFromCivil(year, month, day int) int64 {
	if month <= 2 {
		year--
	}
	era := year / 400
	yoe := year - era*400
	mp := (month + 9) % 12
	doy := (153*mp+2)/5 + day - 1
	doe := yoe*365 + yoe/4 - yoe/100 + doy
	return int64(era)*146097 + int64(doe) - 719468
}

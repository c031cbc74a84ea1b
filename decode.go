package main

import (
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
		smp, ok := s.object(nil)
		s.space()
		if !ok || s.i != len(s.b) {
			return nil, false, false
		}
		return []sample{smp}, false, true
	}
	if !s.take('[') {
		return nil, false, false
	}
	types := map[string]string{} // one string per type name in the batch
	for {
		s.space()
		smp, ok := s.object(types)
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

// scanner walks a JSON text; its methods report false at the first byte
// that is not what the fast path expects.
type scanner struct {
	b []byte
	i int
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
	for s.i < len(s.b) && (s.b[s.i] == ' ' || s.b[s.i] == '\t' || s.b[s.i] == '\n' || s.b[s.i] == '\r') {
		s.i++
	}
}

// str reads a string without escapes or control characters.
func (s *scanner) str() ([]byte, bool) {
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

// num reads a number in JSON's grammar, which is narrower than
// strconv.ParseFloat's (no "Inf", hex, underscores or leading "+").
func (s *scanner) num() (float64, bool) {
	start := s.i
	s.take('-')
	switch {
	case s.take('0'):
	case s.digits() == 0:
		return 0, false
	}
	if s.take('.') && s.digits() == 0 {
		return 0, false
	}
	if s.take('e') || s.take('E') {
		if !s.take('+') {
			s.take('-')
		}
		if s.digits() == 0 {
			return 0, false
		}
	}
	v, err := strconv.ParseFloat(string(s.b[start:s.i]), 64)
	return v, err == nil
}

func (s *scanner) digits() int {
	n := 0
	for s.i < len(s.b) && '0' <= s.b[s.i] && s.b[s.i] <= '9' {
		s.i++
		n++
	}
	return n
}

// object reads one metric object. types, when not nil, holds the type
// names already seen, so a batch allocates each name once.
func (s *scanner) object(types map[string]string) (sample, bool) {
	if !s.take('{') {
		return sample{}, false
	}
	var (
		ts, typ []byte
		v       float64
		seen    int
	)
	for {
		s.space()
		key, ok := s.str()
		if !ok {
			return sample{}, false
		}
		s.space()
		if !s.take(':') {
			return sample{}, false
		}
		s.space()
		var bit int
		switch string(key) {
		case "timestamp":
			ts, ok = s.str()
			bit = 1
		case "value":
			v, ok = s.num()
			bit = 2
		case "type":
			typ, ok = s.str()
			bit = 4
		default:
			return sample{}, false // unknown fields take the general path
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
	if seen != 7 {
		return sample{}, false // a missing key: the general path words it
	}
	name, ok := types[string(typ)]
	if !ok {
		name = string(typ)
		if types != nil {
			types[name] = name
		}
	}
	smp, err := checkSample(string(ts), v, name)
	return smp, err == nil
}

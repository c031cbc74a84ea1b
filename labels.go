package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// A series is a type plus one set of labels. Its id is the canonical form
// of the labels: sorted by name, each name="value" with '\' and '"' in the
// value escaped, joined by commas, as Prometheus writes a label set. Names
// never hold '=', '"' or ',', and a value ends at its first unescaped
// quote, so two label sets have the same id only when they are equal. The
// unlabelled series' id is "".
type label struct{ name, value string }

const (
	maxLabels          = 8
	maxLabelNameBytes  = 64
	maxLabelValueRunes = 128
)

// typeWide names, where a store is asked for series, the buckets of a
// type's samples of every series together. No label set has this id: a
// label name cannot start with '*'.
const typeWide = "*"

// parseLabels reads the labels object of a metric: at most maxLabels
// string values under valid, distinct names. null means no labels.
func parseLabels(raw json.RawMessage) ([]label, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, errors.New("labels must be an object of string values")
	}
	if tok == nil {
		return nil, nil
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("labels must be an object of string values")
	}
	var out []label
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, errors.New("labels must be an object of string values")
		}
		name := tok.(string) // an object's keys are strings
		if err := validLabelName(name); err != nil {
			return nil, err
		}
		tok, err = dec.Token()
		value, ok := tok.(string)
		if err != nil || !ok {
			return nil, fmt.Errorf("label %s: value must be a string", name)
		}
		if err := validLabelValue(name, value); err != nil {
			return nil, err
		}
		if slices.ContainsFunc(out, func(l label) bool { return l.name == name }) {
			return nil, fmt.Errorf("label %s appears twice", name)
		}
		if len(out) == maxLabels {
			return nil, fmt.Errorf("labels: at most %d per sample", maxLabels)
		}
		out = append(out, label{name, value})
	}
	return out, nil
}

func validLabelName(name string) error {
	ok := len(name) > 0 && len(name) <= maxLabelNameBytes
	for i := 0; i < len(name) && ok; i++ {
		c := name[i]
		ok = 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '_' || i > 0 && '0' <= c && c <= '9'
	}
	if !ok {
		return fmt.Errorf("label name %q must match [A-Za-z_][A-Za-z0-9_]*, at most %d characters", truncate(name, 70), maxLabelNameBytes)
	}
	return nil
}

// validLabelValue refuses a value that is not 1 to 128 printable
// characters. U+FFFD is refused too: it is what JSON decoding makes of
// invalid UTF-8 and of lone surrogates, so values that differ only there
// would otherwise become one series.
func validLabelValue(name, value string) error {
	n := utf8.RuneCountInString(value)
	ok := n >= 1 && n <= maxLabelValueRunes && utf8.ValidString(value)
	for _, r := range value {
		ok = ok && unicode.IsPrint(r) && r != utf8.RuneError
	}
	if !ok {
		return fmt.Errorf("label %s: value must be 1 to %d printable characters of valid UTF-8 (U+FFFD excluded)", name, maxLabelValueRunes)
	}
	return nil
}

// seriesID is the canonical id of a label set, in any order.
func seriesID(labels []label) string {
	if len(labels) == 0 {
		return ""
	}
	sorted := slices.SortedFunc(slices.Values(labels), func(a, b label) int { return strings.Compare(a.name, b.name) })
	var b strings.Builder
	for i, l := range sorted {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(l.name)
		b.WriteString(`="`)
		for _, c := range []byte(l.value) {
			if c == '\\' || c == '"' {
				b.WriteByte('\\')
			}
			b.WriteByte(c)
		}
		b.WriteByte('"')
	}
	return b.String()
}

// parseSeriesID is the label set of an id seriesID made, sorted by name.
func parseSeriesID(id string) ([]label, error) {
	var out []label
	for rest := id; rest != ""; {
		eq := strings.Index(rest, `="`)
		if eq <= 0 {
			return nil, fmt.Errorf("malformed series id %q", id)
		}
		name := rest[:eq]
		rest = rest[eq+2:]
		var v strings.Builder
		closed := false
		for i := 0; i < len(rest); i++ {
			c := rest[i]
			if c == '\\' && i+1 < len(rest) {
				i++
				v.WriteByte(rest[i])
				continue
			}
			if c == '"' {
				rest, closed = rest[i+1:], true
				break
			}
			v.WriteByte(c)
		}
		if !closed || rest != "" && !strings.HasPrefix(rest, ",") {
			return nil, fmt.Errorf("malformed series id %q", id)
		}
		rest = strings.TrimPrefix(rest, ",")
		out = append(out, label{name, v.String()})
	}
	return out, nil
}

// seriesHash names a series in Redis keys: 16 hex digits of the FNV-1a
// hash of its id, so a key's length does not follow its labels. The
// registry maps each hash back to its id, so two ids with one hash are
// refused, never merged.
func seriesHash(id string) string {
	h := fnv.New64a()
	h.Write([]byte(id))
	return strconv.FormatUint(h.Sum64()|1<<63, 16)
}

// labelFilter is what a query asks of the series it reads: every pair in
// match, and a value per label groupBy ("" for no grouping).
type labelFilter struct {
	match   []label // sorted by name, then value
	groupBy string
}

// parseLabelFilter reads the repeatable label=name:value and the one
// group_by=name parameter (the values given for it).
func parseLabelFilter(pairs []string, groupBys []string) (labelFilter, error) {
	var f labelFilter
	if len(groupBys) > 1 {
		return f, unprocessable("group_by may be given once")
	}
	groupBy := ""
	if len(groupBys) == 1 {
		if groupBy = groupBys[0]; groupBy == "" {
			return f, unprocessable("group_by: give a label name, such as group_by=host")
		}
	}
	for _, p := range pairs {
		name, value, ok := strings.Cut(p, ":")
		if !ok {
			return f, unprocessable("label must be name:value, such as host:web-1; got %q", truncate(p, 40))
		}
		if err := validLabelName(name); err != nil {
			return f, unprocessable("label: %s", err)
		}
		if err := validLabelValue(name, value); err != nil {
			return f, unprocessable("label: %s", err)
		}
		f.match = append(f.match, label{name, value})
	}
	if len(f.match) > maxLabels {
		return f, unprocessable("label: at most %d filters", maxLabels)
	}
	slices.SortFunc(f.match, func(a, b label) int {
		return cmpLabels(a, b)
	})
	if groupBy != "" {
		if err := validLabelName(groupBy); err != nil {
			return f, unprocessable("group_by: %s", err)
		}
	}
	f.groupBy = groupBy
	return f, nil
}

func cmpLabels(a, b label) int {
	if c := strings.Compare(a.name, b.name); c != 0 {
		return c
	}
	return strings.Compare(a.value, b.value)
}

// filtered reports whether f reads series rather than the type-wide
// buckets.
func (f labelFilter) filtered() bool { return len(f.match) > 0 || f.groupBy != "" }

// key is f in the cache's key: its own canonical form, after a '|'; ""
// when f asks for no label.
func (f labelFilter) key() string {
	if !f.filtered() {
		return ""
	}
	return "|" + seriesID(f.match) + "|" + f.groupBy
}

// group is the value of f's group_by label among labels, and whether the
// series has it.
func (f labelFilter) group(labels []label) (string, bool) {
	for _, l := range labels {
		if l.name == f.groupBy {
			return l.value, true
		}
	}
	return "", false
}

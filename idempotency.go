package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// Idempotent retries: a write sent with an Idempotency-Key is recorded
// with its key, in the same atomic step as its samples (memoryStore.addOnce,
// lua/ingest.lua). A repeat of it is answered as the first success was,
// with Idempotent-Replayed: true, and stores nothing; the same key with
// another request is refused. Nothing is claimed before the write: a write
// that fails leaves no record, so its retry is applied, and one whose
// answer was lost left its record, so its retry is not applied twice.

const (
	// onceLifetime is how long a key is remembered.
	onceLifetime = 24 * time.Hour
	// maxOnceKey is the longest Idempotency-Key accepted.
	maxOnceKey = 128
	// maxOnceRecords bounds the memory store's records; past it the oldest
	// go before their 24 hours (Redis keeps every one for its lifetime).
	maxOnceRecords = 100_000
)

// onceKey is a write's Idempotency-Key, what its request asked and the
// answer to give a repeat of it.
type onceKey struct {
	id     string   // the key's digest, hex: it names the record
	print  [32]byte // the digest of the request: route, precision, body
	answer []byte   // the success's status, three digits, then its body
}

// record is how the record is stored: the request's digest, then the
// answer.
func (o *onceKey) record() []byte { return append(o.print[:len(o.print):len(o.print)], o.answer...) }

// errKeyReused refuses a request whose key came with another request.
var errKeyReused = &requestError{http.StatusUnprocessableEntity, "Idempotency-Key was already used with another request"}

// replayError is the answer a store recorded for a repeat of a write: it
// stored nothing.
type replayError struct{ answer []byte }

func (e *replayError) Error() string { return "idempotent repeat" }

// replayOf reads a stored record back: the repeat's answer when the
// record's request is o's, or errKeyReused.
func replayOf(o *onceKey, rec []byte) error {
	if len(rec) < len(o.print)+3 || !bytes.Equal(rec[:len(o.print)], o.print[:]) {
		return errKeyReused
	}
	return &replayError{answer: rec[len(o.print):]}
}

// readOnceKey reads a request's Idempotency-Key: nil without one, an error
// for one that is not 1 to 128 printable ASCII characters.
func readOnceKey(r *http.Request) (string, error) {
	vals := r.Header.Values("Idempotency-Key")
	if len(vals) == 0 {
		return "", nil
	}
	bad := &requestError{http.StatusUnprocessableEntity, "Idempotency-Key must be one header of 1 to 128 printable ASCII characters"}
	if len(vals) > 1 || len(vals[0]) == 0 || len(vals[0]) > maxOnceKey {
		return "", bad
	}
	for i := 0; i < len(vals[0]); i++ {
		if c := vals[0][i]; c < 0x20 || c > 0x7e {
			return "", bad
		}
	}
	return vals[0], nil
}

// requestPrint is the digest of a write: its route, its precision (line
// protocol) and its body.
func requestPrint(route, precision string, body []byte) [32]byte {
	h := sha256.New()
	h.Write([]byte(route + "\n" + precision + "\n"))
	h.Write(body)
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// newOnceKey is the record of key, sent under the token scope ("" without
// AUTH_TOKENS, onceScope), for the request of digest print, answered status with body
// answer. Each token has keys of its own: one writer cannot take, or
// answer, another's.
func newOnceKey(key, scope string, print [32]byte, status int, answer []byte) *onceKey {
	id := sha256.Sum256([]byte(scope + "\n" + key))
	return &onceKey{id: hex.EncodeToString(id[:16]), print: print, answer: append([]byte(strconv.Itoa(status)), answer...)}
}

// tokenScope is the context key under which the write gate leaves the
// name of a request's valid token: its place among the configured ones.
type tokenScope struct{}

// onceScope is whose keys a request's are: its token's, with AUTH_TOKENS,
// everyone's without.
func onceScope(r *http.Request) string {
	s, _ := r.Context().Value(tokenScope{}).(string)
	return s
}

// writeReplay answers a repeat with the first success's answer.
func writeReplay(w http.ResponseWriter, answer []byte) {
	status, _ := strconv.Atoi(string(answer[:3]))
	w.Header()["Idempotent-Replayed"] = []string{"true"}
	if len(answer) == 3 {
		w.WriteHeader(status)
		return
	}
	writeRaw(w, status, answer[3:])
}

// replayed reports whether err is a replay, and answers it.
func replayed(w http.ResponseWriter, err error) bool {
	var rp *replayError
	if !errors.As(err, &rp) {
		return false
	}
	writeReplay(w, rp.answer)
	return true
}

// ---- memory ----

// onceRecords are the memory store's records. A key's check, the write
// and its record run under the lock of the key's stripe, so two requests
// with one key are applied one after the other; requests with other keys
// go on side by side.
type onceRecords struct {
	stripes [64]sync.Mutex

	mu    sync.Mutex
	byID  map[string]*onceRecord
	order []*onceRecord // oldest first: every record lives as long
	max   int
}

type onceRecord struct {
	id      string
	rec     []byte
	expires int64 // Unix ns
}

func (o *onceRecords) stripe(id string) *sync.Mutex {
	h := uint32(2166136261)
	for i := 0; i < len(id); i++ {
		h = (h ^ uint32(id[i])) * 16777619
	}
	return &o.stripes[h%uint32(len(o.stripes))]
}

// lookup is the live record of id, if any.
func (o *onceRecords) lookup(id string, now time.Time) []byte {
	o.mu.Lock()
	defer o.mu.Unlock()
	if r := o.byID[id]; r != nil && now.UnixNano() < r.expires {
		return r.rec
	}
	return nil
}

// keep records o as of now, dropping the oldest records past the bound.
func (o *onceRecords) keep(k *onceKey, now time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.byID == nil {
		o.byID = map[string]*onceRecord{}
	}
	r := &onceRecord{id: k.id, rec: k.record(), expires: now.Add(onceLifetime).UnixNano()}
	o.byID[k.id] = r
	o.order = append(o.order, r)
	for len(o.byID) > o.max {
		o.dropOldest()
	}
}

// dropOldest forgets the oldest record; the caller holds mu.
func (o *onceRecords) dropOldest() {
	r := o.order[0]
	o.order[0] = nil
	o.order = o.order[1:]
	if o.byID[r.id] == r { // not a later record of the same key
		delete(o.byID, r.id)
	}
}

// sweep drops the records past their lifetime.
func (o *onceRecords) sweep(now time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for len(o.order) > 0 && now.UnixNano() >= o.order[0].expires {
		o.dropOldest()
	}
	// A fresh array once most of the old one is behind us.
	if len(o.order) < cap(o.order)/4 {
		o.order = append([]*onceRecord(nil), o.order...)
	}
}

package main

import "strconv"

// keys names every Redis key and channel the service uses, all under the
// configured prefix (REDIS_PREFIX), so several deployments can share one
// Redis. Keys of one metric type share its hash tag ({cpu}), so an ingest
// of a type and a read of it stay on one Redis Cluster slot.
//
//	types                  set: the type names, for MAX_TYPES
//	compact                set: the types with buckets to compact
//	{T}:m                  hash: the type's version (v, bumped by every
//	                       ingest of it, and by a delete), first (f) and
//	                       newest (n) sample in Unix microseconds, what
//	                       deletes took off its count (d), w while its
//	                       type-wide buckets are added up again after a
//	                       delete; a deleted type's has x, and g until
//	                       its keys are reclaimed (lua/delete.lua)
//	{T}:gc                 set: the type's deleted series whose keys are
//	                       not reclaimed yet ('*': its type-wide keys)
//	reclaim                set: the types with deleted keys to reclaim
//	{T}:b:<res>:<start>    string: one bucket (res 1s, 1m, 1h or 1d; start
//	                       in Unix seconds): an 8-byte header, then records
//	                       of what ingests added (count, sum, min, max,
//	                       zeros, bins; see bucketRecord), appended as they
//	                       come and merged in the background. A string per
//	                       bucket costs a few bytes a bin and lets a bucket
//	                       expire whole.
//	{T}:b:all              string: the running total of every sample, in
//	                       the same form, when days are kept forever
//	{T}:z                  set: the type's buckets that have grown by a
//	                       quarter past their size at their last compaction
//	{T}:i:<res>            sorted set: the chunks (a minute of seconds, an
//	                       hour of minutes, ...) that hold buckets of res,
//	                       by start, so retention finds what to delete and
//	                       a delete every bucket (every resolution has one)
//	{T}:series             hash: the type's series, the hash of each id
//	                       (labels.go, seriesHash) to the id, for
//	                       MAX_SERIES and for finding them
//	{T}:until              sorted set: each series' hash, scored by the
//	                       anchor from which it holds no data (never with
//	                       a resolution kept forever); past it the series
//	                       is dropped, and frees its MAX_SERIES room
//	{T}:l:<name>="<value>" set: the ids of the type's series that hold that
//	                       label (written as in a series id), for filters
//	{T}:s:<hash>:          the same keys as the type's (m, b:..., i:...)
//	                       for one series: its buckets, its retention
//	                       indexes, and in m the anchor its retention last
//	                       finished at (s); the type-wide keys above hold
//	                       every series together
//	{cache}:e:<T>|<query>  string: one cached answer, "version body", with a
//	                       TTL; one tag for the whole cache, so the bound
//	                       on its size is one script on one slot
//	{cache}:idx            sorted set: the cached answers by expiry
//	rl:{client}:<window>   string: a rate-limit counter, expiring with its
//	                       window
//	{T}:lock               string: on a Redis Cluster, the token of a batch
//	                       of several types that holds the type from its
//	                       check to its write (clusterstore.go)
//	{T}:o:<digest>         string: on a Redis Cluster, an Idempotency-Key's
//	                       record of the type's part of an ingest
//	once:<digest>          string: an Idempotency-Key's record, by the
//	                       digest of the token's place and the key
//	                       (idempotency.go): the request's digest and the
//	                       answer given, kept 24 h
//	stream                 channel: what each ingest added to 1 s buckets
//	                       (stream.go, encodeUpdates), published by the
//	                       ingest script, read by every instance's
//	                       subscriber for its live streams
type keys struct{ prefix string }

func (k keys) types() string { return k.prefix + "types" }

func (k keys) compactTypes() string { return k.prefix + "compact" }

func (k keys) compactBuckets(typ string) string { return k.tag(typ) + "z" }

func (k keys) tag(typ string) string { return k.prefix + "{" + typ + "}:" }

func (k keys) meta(typ string) string { return k.tag(typ) + "m" }

func (k keys) seriesRegistry(typ string) string { return k.tag(typ) + "series" }

// seriesUntil scores each series' hash with the anchor from which it holds
// no data, for retention to drop it.
func (k keys) seriesUntil(typ string) string { return k.tag(typ) + "until" }

// labelIndex is the set of the ids of typ's series that hold label l.
func (k keys) labelIndex(typ string, l label) string {
	return k.tag(typ) + "l:" + seriesID([]label{l})
}

// unit is the start of the names of one series' keys (id typeWide for the
// type-wide ones), which the functions below complete.
func (k keys) unit(typ, id string) string {
	if id == typeWide {
		return k.tag(typ)
	}
	return k.tag(typ) + "s:" + seriesHash(id) + ":"
}

func unitMeta(unit string) string { return unit + "m" }

// bucketPrefix is the name of a unit's buckets of r up to the start, which
// the ingest script appends when it deletes a chunk's buckets.
func bucketPrefix(unit string, r resolution) string {
	return unit + "b:" + r.String() + ":"
}

func bucketKey(unit string, r resolution, start int64) string {
	if r == resAll {
		return unit + "b:all"
	}
	return bucketPrefix(unit, r) + strconv.FormatInt(start, 10)
}

func indexKey(unit string, r resolution) string {
	return unit + "i:" + r.String()
}

func (k keys) cacheEntry(typ, query string) string {
	return k.prefix + "{cache}:e:" + typ + "|" + query
}

// reclaimTypes names the set of types with deleted keys left to reclaim.
func (k keys) reclaimTypes() string { return k.prefix + "reclaim" }

// garbage names the set of a type's deleted series whose keys remain.
func (k keys) garbage(typ string) string { return k.tag(typ) + "gc" }

// once names an Idempotency-Key's record, by the key's digest.
func (k keys) once(id string) string { return k.prefix + "once:" + id }

// oncePart names an Idempotency-Key's record on a type's slot, on a Redis
// Cluster: the type's part of the ingest is applied.
func (k keys) oncePart(typ, id string) string { return k.tag(typ) + "o:" + id }

// hold names a type's hold by a batch of several types, on a Redis
// Cluster (clusterstore.go): the batch's token, from its check to its
// write.
func (k keys) hold(typ string) string { return k.tag(typ) + "lock" }

func (k keys) streamChannel() string { return k.prefix + "stream" }

func (k keys) cacheIndex() string { return k.prefix + "{cache}:idx" }

func (k keys) limiter(client string, window int64) string {
	return k.prefix + "rl:{" + client + "}:" + strconv.FormatInt(window, 10)
}

// bucket and index name a type's type-wide keys.
func (k keys) bucket(typ string, r resolution, start int64) string {
	return bucketKey(k.tag(typ), r, start)
}

func (k keys) index(typ string, r resolution) string { return indexKey(k.tag(typ), r) }

package main

import "strconv"

// keys names every Redis key and channel the service uses, all under the
// configured prefix (REDIS_PREFIX), so several deployments can share one
// Redis. Keys of one metric type share its hash tag ({cpu}), so an ingest
// of a type and a read of it stay on one Redis Cluster slot.
//
//	types                  set: the type names, for MAX_TYPES
//	{T}:m                  hash: the type's version (v, bumped by every
//	                       ingest of it), first (f) and newest (n) sample
//	                       in Unix microseconds
//	{T}:b:<res>:<start>    hash: one bucket (res 1s, 1m, 1h or 1d; start
//	                       in Unix seconds). Field a is "count sum min max
//	                       zero plo ptop nlo ntop" (the lowest and highest
//	                       bin index of each sign, x for none); every other
//	                       field is a bin code and its count. One key per
//	                       bucket keeps each hash small enough for Redis's
//	                       compact listpack encoding, and lets a bucket
//	                       expire whole.
//	{T}:b:all              hash: the running total of every sample, in the
//	                       same form, when days are kept forever
//	{T}:i:<res>            sorted set: the chunks (a minute of seconds, an
//	                       hour of minutes, ...) that hold buckets of res,
//	                       by start, so retention finds what to delete
//	{cache}:e:<T>|<query>  string: one cached answer, "version body", with a
//	                       TTL; one tag for the whole cache, so the bound
//	                       on its size is one script on one slot
//	{cache}:idx            sorted set: the cached answers by expiry
//	rl:{client}:<window>   string: a rate-limit counter, expiring with its
//	                       window
type keys struct{ prefix string }

func (k keys) types() string { return k.prefix + "types" }

func (k keys) tag(typ string) string { return k.prefix + "{" + typ + "}:" }

func (k keys) meta(typ string) string { return k.tag(typ) + "m" }

// bucketPrefix is the name of typ's buckets of r up to the start, which
// the ingest script appends when it deletes a chunk's buckets.
func (k keys) bucketPrefix(typ string, r resolution) string {
	return k.tag(typ) + "b:" + r.String() + ":"
}

func (k keys) bucket(typ string, r resolution, start int64) string {
	if r == resAll {
		return k.tag(typ) + "b:all"
	}
	return k.bucketPrefix(typ, r) + strconv.FormatInt(start, 10)
}

func (k keys) index(typ string, r resolution) string {
	return k.tag(typ) + "i:" + r.String()
}

func (k keys) cacheEntry(typ, query string) string {
	return k.prefix + "{cache}:e:" + typ + "|" + query
}

func (k keys) cacheIndex() string { return k.prefix + "{cache}:idx" }

func (k keys) limiter(client string, window int64) string {
	return k.prefix + "rl:{" + client + "}:" + strconv.FormatInt(window, 10)
}

-- Deletes series of one type, or all of them and so the type, in one
-- atomic step that touches only the registry: the series leave the
-- registry, the until set and their label sets, which frees their
-- MAX_SERIES room, and go to the type's garbage set, whose keys
-- lua/reclaim.lua then deletes a few at a time, adding up again the
-- type-wide buckets they were part of. Until that is done the meta says
-- so (w), and a read of the whole type adds up its series instead of the
-- type-wide buckets. With its last series the type goes: out of the set
-- of type names (its MAX_TYPES room), its meta keeping its version and
-- marked deleted (x), with garbage to reclaim (g) until it is reclaimed.
-- Everything is read before the first write, so a key of the wrong type
-- fails the step before it changes anything.
--
-- KEYS: the set of type names, the set of types with garbage to reclaim,
-- the set of types with buckets to compact, the type's meta hash, its
-- registry, its until set, its garbage set, its set of buckets to
-- compact; then the sets of the deleted series' labels.
-- ARGV: the type's name, the prefix of its keys ('{T}:'), the number of
-- series to delete and each one's hash and id; per label set in KEYS, the
-- number of the deleted ids it holds and the ids; the live stream's
-- channel and the message that tells every instance's streams to read
-- the type again; 1 on a Redis Cluster, where the first three KEYS are the
-- type's meta again, standing in for the sets the service writes itself
-- around the step (clusterstore.go). Returns the number of series deleted
-- and 1 when that was the whole type.
local name, tag = ARGV[1], ARGV[2]
local cluster = ARGV[#ARGV] == '1'
-- On a cluster a batch may hold the type from its check to its write
-- (clusterstore.go): the delete waits, as any write does.
if cluster and redis.call('EXISTS', tag .. 'lock') == 1 then
  return redis.error_reply('LOCKED the type is held by a batch')
end
local a = 3
local asked = {}
for i = 1, tonumber(ARGV[a]) do
  asked[i] = {hash = ARGV[a + 2 * i - 1], id = ARGV[a + 2 * i]}
end
a = a + 1 + 2 * #asked

local m = redis.call('HMGET', KEYS[4], 'v', 'f', 'x', 'd')
if not m[2] or m[3] then return {0, 0} end -- no data: never written, or deleted
-- A series the registry no longer holds (retention dropped it) is not
-- deleted again.
local deleted = {}
for _, s in ipairs(asked) do
  if redis.call('HGET', KEYS[5], s.hash) == s.id then deleted[#deleted + 1] = s end
end
if #deleted == 0 then return {0, 0} end
local whole = redis.call('HLEN', KEYS[5]) == #deleted
local sets = cluster and {KEYS[7], KEYS[8]} or {KEYS[1], KEYS[2], KEYS[3], KEYS[7], KEYS[8]}
for _, k in ipairs(sets) do redis.call('SCARD', k) end
redis.call('ZCARD', KEYS[6])
-- A deleted type's label sets go whole (UNLINK, which no key's type
-- fails); a series' ids leave theirs (SREM), which are checked here.
if not whole then
  for k = 9, #KEYS do redis.call('SCARD', KEYS[k]) end
end
-- The samples deleted, for the type's count: each series' running total
-- (a deleted type's count is 0, whatever it held).
local count = 0
for _, s in ipairs(whole and {} or deleted) do
  local v = redis.call('GET', tag .. 's:' .. s.hash .. ':b:all')
  if v then
    if #v < 8 then return redis.error_reply('MALFORMED bucket') end
    count = count + select(2, merged(v))
  end
end

-- Write phase.
local hashes = {}
for i, s in ipairs(deleted) do hashes[i] = s.hash end
for j = 1, #hashes, 1000 do
  local part = {unpack(hashes, j, math.min(j + 999, #hashes))}
  redis.call('HDEL', KEYS[5], unpack(part))
  redis.call('ZREM', KEYS[6], unpack(part))
  redis.call('SADD', KEYS[7], unpack(part))
end
for k = 9, #KEYS do
  local n = tonumber(ARGV[a])
  if not whole then
    for j = 1, n, 1000 do redis.call('SREM', KEYS[k], unpack(ARGV, a + j, a + math.min(j + 999, n))) end
  end
  a = a + 1 + n
end
if whole then
  for j = 9, #KEYS, 1000 do redis.call('UNLINK', unpack(KEYS, j, math.min(j + 999, #KEYS))) end
end
if not cluster then redis.call('SADD', KEYS[2], name) end
local version = tonumber(m[1]) + 1
if whole then
  redis.call('SADD', KEYS[7], '*') -- the type-wide buckets
  if not cluster then
    redis.call('SREM', KEYS[1], name)
    redis.call('SREM', KEYS[3], name)
  end
  redis.call('UNLINK', KEYS[5], KEYS[6], KEYS[8])
  redis.call('HDEL', KEYS[4], 's', 'w')
  redis.call('HSET', KEYS[4], 'v', int(version), 'd', int(version), 'x', '1', 'g', '1')
else
  redis.call('HSET', KEYS[4], 'v', int(version), 'd', int((tonumber(m[4]) or 0) + count + 1), 'w', '1')
end
redis.call('PUBLISH', ARGV[a], ARGV[a + 1])
return {#deleted, whole and 1 or 0}

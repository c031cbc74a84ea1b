-- Deletes series of one type, or all of them and so the type, in one
-- atomic step: everything is read and checked before the first write.
--
-- KEYS: the set of type names, the set of types with buckets to compact,
-- the type's meta hash, its series registry, its until set, its set of
-- buckets to compact; then the sets of the deleted series' labels.
-- ARGV: the type's name, the prefix of its keys ('{T}:'), the lifetime of
-- a deleted type's meta in ms, the budget (how many keys the step may
-- read), the number of resolutions; per resolution its name, width and
-- chunk span in seconds, and 1 when it has a retention index; the number
-- of deleted series and each one's hash and id; the number of remaining
-- series and each one's hash, in the order of their ids; per label set in
-- KEYS, the number of deleted ids it holds and the ids.
--
-- The series are the service's reading of the registry, which is checked
-- here: CHANGED when a series came or went since, and the service asks
-- again. A unit's buckets are found by its retention indexes, and for a
-- resolution kept forever, which has none, at every start from the type's
-- first sample to its newest. The type-wide buckets that deleted series
-- held are written again from the remaining series' buckets: each
-- series' records merged into one, in the order of the series' ids, as the
-- memory store adds up series (store.go, rebuild). TOOBIG when that would
-- read more keys than the budget. A deleted type keeps its meta for a
-- while with only its version, bumped, so a cached answer of it is never
-- served again, even when the type comes back.
local name, tag = ARGV[1], ARGV[2]
local ttl, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local a = 6
local res = {}
for i = 1, tonumber(ARGV[5]) do
  res[i] = {name = ARGV[a], w = tonumber(ARGV[a + 1]), span = tonumber(ARGV[a + 2]), indexed = ARGV[a + 3] == '1'}
  a = a + 4
end
local deleted, remaining = {}, {}
for i = 1, tonumber(ARGV[a]) do
  deleted[i] = {hash = ARGV[a + 2 * i - 1], id = ARGV[a + 2 * i]}
end
a = a + 1 + 2 * #deleted
for i = 1, tonumber(ARGV[a]) do remaining[i] = ARGV[a + i] end
a = a + 1 + #remaining

local m = redis.call('HMGET', KEYS[3], 'v', 'f', 'n', 'd')
if not m[2] then return 0 end -- no data: never written, or deleted
local function changed() return redis.error_reply('CHANGED the series changed meanwhile') end
if redis.call('HLEN', KEYS[4]) ~= #deleted + #remaining then return changed() end
for _, s in ipairs(deleted) do
  if redis.call('HGET', KEYS[4], s.hash) ~= s.id then return changed() end
end
for j = 1, #remaining, 1000 do
  for _, id in ipairs(redis.call('HMGET', KEYS[4], unpack(remaining, j, math.min(j + 999, #remaining)))) do
    if not id then return changed() end
  end
end

local function int(x) return string.format('%d', x) end
local first, newest = math.floor(tonumber(m[2]) / 1000000), math.floor(tonumber(m[3]) / 1000000)
local function floorTo(t, w) return t - t % w end

-- Reads cost: each key read counts against the budget.
local reads = 0
local function spend(n)
  reads = reads + n
  return reads <= budget
end
local function tooBig() return redis.error_reply('TOOBIG ' .. int(reads)) end

-- The units to delete: each deleted series', and with the last series
-- the type-wide one too.
local whole = #remaining == 0
local units = {}
for i, s in ipairs(deleted) do units[i] = tag .. 's:' .. s.hash .. ':' end
if whole then units[#units + 1] = tag end

-- Each unit's buckets that exist, by the names of their keys, and the
-- positions (resolution and start) they are at.
local gone, at, seen = {}, {}, {}
for _, u in ipairs(units) do
  for _, r in ipairs(res) do
    local starts = {}
    if r.indexed then
      for _, cs in ipairs(redis.call('ZRANGE', u .. 'i:' .. r.name, 0, -1)) do
        for s = tonumber(cs), tonumber(cs) + r.span - r.w, r.w do starts[#starts + 1] = s end
      end
      gone[#gone + 1] = u .. 'i:' .. r.name
    else
      for s = floorTo(first, r.w), floorTo(newest, r.w), r.w do
        starts[#starts + 1] = s
        if #starts > budget then reads = #starts; return tooBig() end
      end
    end
    if not spend(#starts) then return tooBig() end
    for j = 1, #starts, 1000 do
      local names = {}
      for k = j, math.min(j + 999, #starts) do names[#names + 1] = u .. 'b:' .. r.name .. ':' .. int(starts[k]) end
      for k, v in ipairs(redis.call('MGET', unpack(names))) do
        if v then
          gone[#gone + 1] = names[k]
          local pos = r.name .. ':' .. int(starts[j + k - 1])
          if not seen[pos] then seen[pos] = true; at[#at + 1] = pos end
        end
      end
    end
  end
  gone[#gone + 1] = u .. 'm'
  gone[#gone + 1] = u .. 'b:all'
end

-- merged is a bucket's records (after its 8-byte header) as one record,
-- and its count: the count, sum, min and max added up in the records'
-- order, as the service reads them (store.go, readRecords), the zeros, and
-- every record's bins, codes delta-encoded anew from 0 in one list.
local function merged(v)
  local pos = 9
  local function uvarint()
    local x, mul = 0, 1
    while true do
      local b = string.byte(v, pos)
      if not b then error('MALFORMED bucket') end
      pos = pos + 1
      x = x + (b % 128) * mul
      if b < 128 then return x end
      mul = mul * 128
    end
  end
  local function putUvarint(out, x)
    while x >= 128 do
      out[#out + 1] = string.char(x % 128 + 128)
      x = math.floor(x / 128)
    end
    out[#out + 1] = string.char(x)
  end
  local count, sum, lo, hi, zero, codes, ns = 0, 0, 0, 0, 0, {}, {}
  while pos <= #v do
    local c = uvarint()
    local s, l, h, next = struct.unpack('<ddd', v, pos)
    pos = next
    if count == 0 then
      sum, lo, hi = s, l, h
    else
      sum = sum + s
      -- As Go's math.Min and math.Max, which put -0 below 0.
      if l < lo or l == 0 and lo == 0 and 1 / l < 0 then lo = l end
      if h > hi or h == 0 and hi == 0 and 1 / hi < 0 then hi = h end
    end
    count = count + c
    zero = zero + uvarint()
    local code = 0
    for _ = 1, uvarint() do
      local z = uvarint()
      if z % 2 == 1 then code = code - (z + 1) / 2 else code = code + z / 2 end
      codes[#codes + 1], ns[#ns + 1] = code, uvarint()
    end
  end
  local out = {}
  putUvarint(out, count)
  out[#out + 1] = struct.pack('<ddd', sum, lo, hi)
  putUvarint(out, zero)
  putUvarint(out, #codes)
  local prev = 0
  for i, code in ipairs(codes) do
    local d = code - prev
    prev = code
    if d < 0 then putUvarint(out, -2 * d - 1) else putUvarint(out, 2 * d) end
    putUvarint(out, ns[i])
  end
  return table.concat(out), count
end

-- The type-wide buckets written again, when series remain: each from the
-- remaining series' buckets at its position, read here.
local rebuilt = {}
if not whole then
  at[#at + 1] = 'all'
  for _, pos in ipairs(at) do
    if not spend(#remaining) then return tooBig() end
    local recs = {}
    for j = 1, #remaining, 1000 do
      local names = {}
      for k = j, math.min(j + 999, #remaining) do names[#names + 1] = tag .. 's:' .. remaining[k] .. ':b:' .. pos end
      for _, v in ipairs(redis.call('MGET', unpack(names))) do
        if v then
          if #v < 8 then return redis.error_reply('MALFORMED bucket') end
          recs[#recs + 1] = (merged(v))
        end
      end
    end
    local key = tag .. 'b:' .. pos
    local head = redis.call('GETRANGE', key, 0, 7)
    local gen = 0
    if #head == 8 then _, gen = struct.unpack('<I4I4', head) end
    rebuilt[#rebuilt + 1] = {key = key, recs = table.concat(recs), gen = gen}
  end
end
-- The samples deleted, for the type's count when days are kept forever:
-- each series' running total.
local count = 0
for i = 1, #deleted do
  local v = redis.call('GET', units[i] .. 'b:all')
  if v then count = count + select(2, merged(v)) end
end

-- Write phase.
for j = 1, #gone, 1000 do redis.call('UNLINK', unpack(gone, j, math.min(j + 999, #gone))) end
-- A rebuilt bucket's compaction count moves on, so that a compaction
-- read before this step changes nothing (lua/compact.lua).
for _, b in ipairs(rebuilt) do
  if b.recs == '' then
    redis.call('UNLINK', b.key)
  else
    redis.call('SET', b.key, struct.pack('<I4I4', #b.recs, b.gen + 1) .. b.recs, 'KEEPTTL')
  end
end
local hashes = {}
for i, s in ipairs(deleted) do hashes[i] = s.hash end
for j = 1, #hashes, 1000 do
  local part = {unpack(hashes, j, math.min(j + 999, #hashes))}
  redis.call('HDEL', KEYS[4], unpack(part))
  redis.call('ZREM', KEYS[5], unpack(part))
end
for k = 7, #KEYS do
  local n = tonumber(ARGV[a])
  for j = 1, n, 1000 do redis.call('SREM', KEYS[k], unpack(ARGV, a + j, a + math.min(j + 999, n))) end
  a = a + 1 + n
end
local version = tonumber(m[1]) + 1
if whole then
  redis.call('UNLINK', KEYS[3], KEYS[4], KEYS[5], KEYS[6])
  redis.call('SREM', KEYS[1], name)
  redis.call('SREM', KEYS[2], name)
  redis.call('HSET', KEYS[3], 'v', int(version), 'd', int(version))
  redis.call('PEXPIRE', KEYS[3], ttl)
else
  redis.call('HSET', KEYS[3], 'v', int(version), 'd', int((tonumber(m[4]) or 0) + count + 1))
end
return #deleted

-- Reclaims, in one step of bounded work, part of what lua/delete.lua left
-- to a type: the keys of its deleted series (its garbage set, '*' for the
-- type-wide buckets of a deleted type), found by their indexes. Where a deleted series of a type that remains held a bucket, the
-- type-wide bucket there is added up again from the remaining series'
-- buckets: each series' records merged into one, in the order of the
-- series' ids, as the memory store adds them up (delete.go). Each position
-- is rebuilt and its deleted buckets removed in the same step, so a read
-- of the position is right before and after it. When nothing is left the
-- meta loses its marks (w, or g of a deleted type, whose meta then expires
-- after the given lifetime) and the type leaves the set of types to
-- reclaim. Returns 1 when the type is done, 0 when there is more to do.
--
-- KEYS: the set of types with garbage to reclaim, the type's meta, its
-- registry, its garbage set.
-- ARGV: the type's name, the prefix of its keys ('{T}:'), the lifetime of
-- a deleted type's meta in ms, the budget (keys to read), the number of
-- resolutions and per resolution its name, width and chunk span in
-- seconds and 1 when it is kept forever; the number of remaining
-- series and their hashes, in the order of their ids; 1 on a Redis
-- Cluster, where KEYS[1] is the type's meta again, standing in for the set
-- the service takes the type out of itself (clusterstore.go). CHANGED
-- when the registry holds other series: the service reads them again.
local name, tag = ARGV[1], ARGV[2]
local ttl, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local a = 6
local res = {}
for i = 1, tonumber(ARGV[5]) do
  res[i] = {name = ARGV[a], w = tonumber(ARGV[a + 1]), span = tonumber(ARGV[a + 2]), forever = ARGV[a + 3] == '1'}
  a = a + 4
end
local remaining = {}
for i = 1, tonumber(ARGV[a]) do remaining[i] = ARGV[a + i] end
local cluster = ARGV[a + #remaining + 1] == '1'
local function finished()
  if not cluster then redis.call('SREM', KEYS[1], name) end
  return 1
end

local m = redis.call('HMGET', KEYS[2], 'f', 'n', 'x', 'g', 'w')
local whole = m[3] ~= false
if not (m[4] or m[5]) or not m[1] then return finished() end
if whole then
  remaining = {}
else
  if redis.call('HLEN', KEYS[3]) ~= #remaining then return redis.error_reply('CHANGED the series changed meanwhile') end
  for j = 1, #remaining, 1000 do
    for _, id in ipairs(redis.call('HMGET', KEYS[3], unpack(remaining, j, math.min(j + 999, #remaining)))) do
      if not id then return redis.error_reply('CHANGED the series changed meanwhile') end
    end
  end
end
local first, newest = math.floor(tonumber(m[1]) / 1000000), math.floor(tonumber(m[2]) / 1000000)
local function floorTo(t, w) return t - t % w end
-- The work done, and whether any bucket went: a step stops once the
-- budget is spent, but not before one bucket has gone.
local reads, progress = 0, false

-- rebuild writes the type-wide bucket at pos ('<res>:<start>' or 'all')
-- again from the remaining series', when it is still there. A rebuilt
-- bucket's merge count moves
-- on, so a background merge that read it before changes nothing. Each
-- bucket read costs one, and one more per 64 bytes merged.
local function rebuild(pos)
  -- A type-wide bucket retention has already removed stays removed.
  local key = tag .. 'b:' .. pos
  local head = redis.call('GETRANGE', key, 0, 7)
  reads = reads + 1
  if #head ~= 8 then return end
  local gen = select(2, struct.unpack('<I4I4', head))
  local recs = {}
  for j = 1, #remaining, 1000 do
    local names = {}
    for k = j, math.min(j + 999, #remaining) do names[#names + 1] = tag .. 's:' .. remaining[k] .. ':b:' .. pos end
    for _, v in ipairs(redis.call('MGET', unpack(names))) do
      reads = reads + 1
      if v then
        recs[#recs + 1] = (merged(v))
        reads = reads + math.floor(#v / 64)
      end
    end
  end
  local all = table.concat(recs)
  if all == '' then
    redis.call('UNLINK', key)
  else
    redis.call('SET', key, struct.pack('<I4I4', #all, gen + 1) .. all, 'KEEPTTL')
  end
end

-- drop removes the unit's buckets of resolution r at starts, rebuilding
-- the type-wide bucket at each that exists when the type remains, until
-- the budget is spent. It returns how many starts it went through: a
-- later step starts again at the first it did not reach.
local function drop(u, r, starts)
  local names = {}
  for k, s in ipairs(starts) do names[k] = u .. 'b:' .. r.name .. ':' .. int(s) end
  reads = reads + #names
  local gone, done = {}, #starts
  for k, v in ipairs(redis.call('MGET', unpack(names))) do
    if v then
      if reads >= budget and progress then done = k - 1; break end
      progress = true
      gone[#gone + 1] = names[k]
      if not whole then rebuild(r.name .. ':' .. int(starts[k])) end
    end
  end
  if #gone > 0 then redis.call('UNLINK', unpack(gone)) end
  return done
end

local h = redis.call('SRANDMEMBER', KEYS[4])
if not h then
  if whole then
    redis.call('HDEL', KEYS[2], 'g', 'f', 'n')
    redis.call('PEXPIRE', KEYS[2], ttl)
  else
    rebuild('all')
    redis.call('HDEL', KEYS[2], 'w')
  end
  redis.call('UNLINK', KEYS[4])
  return finished()
end
local u = tag .. 's:' .. h .. ':'
local um = u .. 'm' -- where the cursors are kept
if h == '*' then u, um = tag, KEYS[2] end
for _, r in ipairs(res) do
  -- Every bucket is in its resolution's index, except those of a
  -- resolution kept forever that an earlier version wrote, without one:
  -- for a unit that has no such index, every start from the type's first
  -- sample to its newest is looked at, from a cursor (c:<res>, 'i' once
  -- the index is taken).
  local field = 'c:' .. r.name
  local mode = 'i'
  if r.forever then
    mode = redis.call('HGET', um, field)
    if not mode then
      if redis.call('EXISTS', u .. 'i:' .. r.name) == 1 then mode = 'i' else mode = int(floorTo(first, r.w)) end
      redis.call('HSET', um, field, mode)
    end
  end
  if mode == 'i' then
    local ix = u .. 'i:' .. r.name
    while true do
      if reads >= budget then return 0 end
      local c = redis.call('ZRANGE', ix, 0, 0)
      if #c == 0 then break end
      local starts = {}
      for s = tonumber(c[1]), tonumber(c[1]) + r.span - r.w, r.w do starts[#starts + 1] = s end
      -- A chunk left halfway is read again: what is gone of it costs
      -- only its name.
      if drop(u, r, starts) < #starts then return 0 end
      redis.call('ZREM', ix, c[1])
    end
  else
    local cur = tonumber(mode)
    local last = floorTo(newest, r.w)
    while cur <= last do
      if reads >= budget then
        redis.call('HSET', um, field, int(cur))
        return 0
      end
      local starts = {}
      for s = cur, math.min(last, cur + r.w * 999), r.w do
        starts[#starts + 1] = s
        if #starts + reads >= budget then break end
      end
      local done = drop(u, r, starts)
      if done < #starts then
        redis.call('HSET', um, field, int(starts[done + 1]))
        return 0
      end
      cur = starts[#starts] + r.w
    end
    redis.call('HSET', um, field, int(cur))
  end
end
-- The unit's buckets are gone: its other keys go too.
local rest = {u .. 'b:all'}
for _, r in ipairs(res) do
  rest[#rest + 1] = u .. 'i:' .. r.name
  if r.forever then redis.call('HDEL', um, 'c:' .. r.name) end
end
if h ~= '*' then rest[#rest + 1] = um end
redis.call('UNLINK', unpack(rest))
redis.call('SREM', KEYS[4], h)
return 0

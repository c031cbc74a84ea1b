-- Applies one ingest, every type of it, in one atomic step, or nothing:
-- everything that can fail (the fence, a limit, a key of the wrong type or
-- form) is checked before the first write, and Redis refuses a script for
-- want of memory only at its first write.
--
-- KEYS: the set of type names, the set of types with buckets to compact;
-- then per type its meta hash, its series registry, its set of buckets to
-- compact, its sorted set of the anchors its series hold data until, and
-- per unit (the type-wide buckets first, then each series of
-- the ingest) the unit's meta hash (the type's own for the type-wide
-- unit), the set of series of each of its labels, one string per bucket it
-- adds to (in ARGV's order) and one index per resolution.
-- ARGV: fence (Unix us, Redis's clock), now (Unix us, the service's
-- clock), MAX_TYPES, MAX_SERIES, the number of types, the number of
-- indexes nidx; nidx quadruples (horizon, 0 for kept forever, bucket width, chunk span, in
-- seconds, and the resolution's name); then per type: name, the prefix of
-- its keys ('{T}:'), samples, first and newest (Unix us), keepUntil (the
-- anchor at which some sample would no longer be kept), the number of
-- units; per unit: series id ('*' for type-wide), its hash ('' for
-- type-wide), the anchor it holds data until (series only), its number of
-- labels, bucket count nb, nidx bucket-name prefixes; then per
-- bucket: index number (0: none), start, expiry (the anchor at which it
-- goes; a huge number for never), and what the ingest adds to it as one
-- record. Then the live stream's channel and the message to publish on it
-- once everything is written.
--
-- ARGV[7] is a sum of flags: 1 for an ingest with an Idempotency-Key, 2 on
-- a Redis Cluster (below), 4 when the service has taken the MAX_TYPES room
-- of the run's new types, 8 to check the run without writing it.
--
-- On a Redis Cluster the run is of one type and every key it touches is on
-- the type's slot: the first two KEYS are the type's meta again, standing
-- in for the sets the service writes itself (the set of type names, on a
-- slot of their own, and the set of types to compact). A new type without
-- its room (flag 4) is answered NEWTYPE, with the refusal it would get
-- otherwise, if any; a run that noted buckets to compact returns 2.
-- Redis refuses a script whose keys are half migrated to another node,
-- and runs one whose keys are all there; but a key it did not declare
-- that is gone fails the script where it is touched. So the writes that
-- touch such keys, retention's deletes, come before every other write,
-- and a failure there leaves only what retention deletes anyway deleted:
-- the service tries again (cluster.go). ARGV[8] and ARGV[9] are then a
-- batch's token and the time it holds the type, below; the rest of ARGV
-- follows from ARGV[10].
--
-- An ingest with an Idempotency-Key has its record's key
-- last in KEYS, and the record (the request's 32-byte digest, then its
-- answer) and its lifetime in ms last in ARGV. When the key holds a record
-- already, the ingest writes nothing and returns the record, or refuses
-- (KEYREUSED) when the record is of another request; otherwise the record
-- is written with the samples.
--
-- A bucket is an 8-byte header (the size of its records at its last
-- compaction and a compaction count, little-endian), then records, each as
-- the service encoded it (store.go, bucketRecord): count, sum, min, max,
-- zeros and bins. An ingest appends its record without reading the bucket;
-- once the records have grown by a quarter (and 64 bytes) past their size
-- at the last compaction, it notes the bucket for the service to compact in the
-- background (lua/compact.lua), so a bucket's size follows its bins, not
-- its ingests, and no ingest pays for merging them.
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[1]) then
  return redis.error_reply('FENCED ingest reached Redis after its deadline')
end
local nowUs = tonumber(ARGV[2])
local maxTypes, maxSeries = tonumber(ARGV[3]), tonumber(ARGV[4])
local ntypes, nidx = tonumber(ARGV[5]), tonumber(ARGV[6])
local flags = tonumber(ARGV[7])
local once = bit.band(flags, 1) ~= 0
local cluster, registered, checkOnly = bit.band(flags, 2) ~= 0, bit.band(flags, 4) ~= 0, bit.band(flags, 8) ~= 0
if once then
  local rec = redis.call('GET', KEYS[#KEYS])
  if rec then
    if string.sub(rec, 1, 32) ~= string.sub(ARGV[#ARGV - 1], 1, 32) then
      return redis.error_reply('KEYREUSED the key came with another request')
    end
    return rec
  end
end
local a = 8
-- On a cluster, a batch of several types holds each of its types from its
-- check to its write (clusterstore.go): its token in the type's lock, for
-- lockMs. Another run finding the lock held answers LOCKED, and writes
-- nothing; the batch's write finding it gone answers LOCKLOST.
local lockKey, token, lockMs
if cluster then
  lockKey, token, lockMs = string.sub(KEYS[1], 1, -2) .. 'lock', ARGV[8], ARGV[9]
  a = 10
  local held = redis.call('GET', lockKey)
  if held and held ~= token then return redis.error_reply('LOCKED the type is held by a batch') end
  if not held and token ~= '' and not checkOnly then
    return redis.error_reply('LOCKLOST the batch held the type too long')
  end
end
local idx = {}
-- Every resolution has an index, so that a delete finds every bucket
-- (lua/reclaim.lua); retention sweeps those with a horizon (h > 0).
local finite = false
for i = 1, nidx do
  idx[i] = {h = tonumber(ARGV[a]), w = tonumber(ARGV[a + 1]), span = tonumber(ARGV[a + 2]), name = ARGV[a + 3]}
  finite = finite or idx[i].h > 0
  a = a + 4
end

local function int(x) return string.format('%d', x) end

local headerLen = 8

-- trimAtOnce is how many series without data one ingest drops at most.
local trimAtOnce = 4

-- labelKeysOf is the keys of the sets of a series' labels: each label's
-- text in its id (name="value", up to the value's unescaped closing quote)
-- after the type's tag and 'l:'.
local function labelKeysOf(tag, id)
  local out, pos = {}, 1
  while pos <= #id do
    local eq = string.find(id, '="', pos, true)
    if not eq then break end
    local j = eq + 2
    while j <= #id do
      local c = string.sub(id, j, j)
      if c == '\\' then j = j + 2 elseif c == '"' then break else j = j + 1 end
    end
    out[#out + 1] = tag .. 'l:' .. string.sub(id, pos, j)
    pos = j + 2
  end
  return out
end

-- Read phase.
local types, k = {}, 3
for i = 1, ntypes do
  local ty = {name = ARGV[a], tag = ARGV[a + 1], n = tonumber(ARGV[a + 2]), first = tonumber(ARGV[a + 3]),
    newest = tonumber(ARGV[a + 4]), keepUntil = tonumber(ARGV[a + 5]), meta = KEYS[k],
    registry = KEYS[k + 1], compactKey = KEYS[k + 2], untilKey = KEYS[k + 3], units = {}}
  local nunits = tonumber(ARGV[a + 6])
  a, k = a + 7, k + 4
  local m = redis.call('HMGET', ty.meta, 'v', 'f', 'n', 's', 'x', 'g')
  -- A deleted type's meta keeps its version (lua/delete.lua), which goes
  -- on when the type is written again, once its keys are reclaimed.
  if m[6] then return redis.error_reply('DELETING ' .. ty.name) end
  ty.version, ty.exists, ty.deleted = tonumber(m[1]) or 0, m[2] ~= false and not m[5], m[5] ~= false
  if ty.exists then
    ty.first = math.min(ty.first, tonumber(m[2]))
    ty.newest = math.max(ty.newest, tonumber(m[3]))
  end
  ty.anchor = math.floor(math.min(ty.newest, nowUs) / 1000000)
  for u = 1, nunits do
    local un = {id = ARGV[a], hash = ARGV[a + 1], untilScore = ARGV[a + 2], meta = KEYS[k], buckets = {},
      prefixes = {}, idxKeys = {}, created = {}, chunks = {}, labelKeys = {}}
    local nl, nb = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    a, k = a + 5, k + 1
    for j = 1, nl do un.labelKeys[j] = KEYS[k]; k = k + 1 end
    un.firstKey = k
    for j = 1, nidx do un.prefixes[j] = ARGV[a]; a = a + 1 end
    for j = 1, nb do
      un.buckets[j] = {key = KEYS[k], ix = tonumber(ARGV[a]), start = tonumber(ARGV[a + 1]),
        expiry = tonumber(ARGV[a + 2]), rec = ARGV[a + 3]}
      a, k = a + 4, k + 1
    end
    for j = 1, nidx do un.idxKeys[j] = KEYS[k]; k = k + 1 end
    un.lastKey = k - 1
    ty.units[u] = un
  end
  -- The series: known ones by their hash, new ones within MAX_SERIES, and
  -- a hash that names another series refused rather than merged.
  local hashes = {}
  for u = 2, nunits do hashes[#hashes + 1] = ty.units[u].hash end
  -- Asked a thousand at a time: Lua unpacks only so many values.
  local function each(cmd, key)
    local out = {}
    for j = 1, #hashes, 1000 do
      for _, v in ipairs(redis.call(cmd, key, unpack(hashes, j, math.min(j + 999, #hashes)))) do
        out[#out + 1] = v
      end
    end
    return out
  end
  local known, scores = each('HMGET', ty.registry), each('ZMSCORE', ty.untilKey)
  -- A new series that is a deleted one whose keys are not reclaimed yet
  -- waits until they are.
  local fresh = {}
  for u = 2, nunits do
    if not known[u - 1] then fresh[#fresh + 1] = ty.units[u].hash end
  end
  for j = 1, #fresh, 1000 do
    for _, in_gc in ipairs(redis.call('SMISMEMBER', ty.tag .. 'gc', unpack(fresh, j, math.min(j + 999, #fresh)))) do
      if in_gc == 1 then return redis.error_reply('DELETING ' .. ty.name) end
    end
  end
  -- A series that holds no data at the anchor takes no room, whether or
  -- not retention has dropped it yet; one the batch brings, new or back
  -- from having none, takes room and is refused past MAX_SERIES.
  -- The room left is counted only when a series takes some.
  local room, checked = nil, {}
  local function takeRoom(un)
    room = room or maxSeries - (redis.call('HLEN', ty.registry) - redis.call('ZCOUNT', ty.untilKey, '-inf', int(ty.anchor)))
    room = room - 1
    if room < 0 then ty.overSeries = ty.overSeries or un.hash end
  end
  for u = 2, nunits do
    local un, id = ty.units[u], known[u - 1]
    if id then
      if id ~= un.id then return redis.error_reply('COLLISION ' .. ty.name .. ' ' .. un.hash) end
      un.known = true
      if scores[u - 1] and tonumber(scores[u - 1]) <= ty.anchor then takeRoom(un) end
    else
      -- A label's set is shared by its series: checked once.
      for _, key in ipairs(un.labelKeys) do
        if not checked[key] then redis.call('SCARD', key); checked[key] = true end
      end
      takeRoom(un)
    end
  end
  ty.takesRoom = room ~= nil
  -- A known unit's keys are there to read. The others' (a new type, a new
  -- series) are usually all absent, which EXISTS over all of them shows at
  -- once; otherwise they are read as well. Reading each bucket also fails
  -- here on a key of the wrong type or form rather than halfway through
  -- the writes.
  local unknown = {}
  for u, un in ipairs(ty.units) do
    un.present = ty.exists and (u == 1 or un.known)
    if not un.present then
      for j = un.firstKey, un.lastKey do unknown[#unknown + 1] = KEYS[j] end
      unknown[#unknown + 1] = un.meta
    end
  end
  local strays = false
  for j = 1, #unknown, 1000 do
    strays = strays or redis.call('EXISTS', unpack(unknown, j, math.min(j + 999, #unknown))) > 0
  end
  -- Retention runs in a unit when the anchor has passed where it last
  -- finished there (field s), whether samples or the clock moved it.
  for u, un in ipairs(ty.units) do
    un.present = un.present or strays
    local s = false
    if u == 1 then s = m[4] elseif un.present then s = redis.call('HGET', un.meta, 's') end
    un.sweep = ty.exists and finite and ty.anchor > (tonumber(s) or -math.huge)
  end
  redis.call('SCARD', ty.compactKey)
  -- The series that hold no data are dropped (trim) when the anchor moves,
  -- a few at a time; what that reads, and so the type of every key it
  -- writes, is taken here.
  -- A series this ingest brings back is not dropped, though it is among
  -- them (its until is written after); more tells whether others remain.
  ty.gone = {}
  if ty.units[1].sweep then
    local mine = {}
    for u = 2, nunits do mine[ty.units[u].hash] = true end
    local found = redis.call('ZRANGEBYSCORE', ty.untilKey, '-inf', int(ty.anchor), 'LIMIT', 0, trimAtOnce)
    ty.moreGone = #found == trimAtOnce
    for _, h in ipairs(found) do
      if not mine[h] then
        local g = {hash = h, unit = ty.tag .. 's:' .. h .. ':', id = redis.call('HGET', ty.registry, h),
          chunks = {}, more = {}, labelKeys = {}}
        for j = 1, nidx do
          local ixKey = g.unit .. 'i:' .. idx[j].name
          g.chunks[j] = redis.call('ZRANGE', ixKey, 0, 31)
          g.more[j] = redis.call('ZCARD', ixKey) > #g.chunks[j]
        end
        if g.id then g.labelKeys = labelKeysOf(ty.tag, g.id) end
        for _, key in ipairs(g.labelKeys) do redis.call('SCARD', key) end
        ty.gone[#ty.gone + 1] = g
      end
    end
  end
  for _, un in ipairs(ty.units) do
    if un.present then
      local indexed = {}
      for _, b in ipairs(un.buckets) do
        local v = redis.call('GETRANGE', b.key, 0, headerLen - 1)
        if v ~= '' then
          if #v ~= headerLen then return redis.error_reply('MALFORMED bucket ' .. b.key) end
          b.clen = struct.unpack('<I4', v)
        elseif b.ix > 0 then
          indexed[b.ix] = true
        end
      end
      if un.sweep then
        for j = 1, nidx do
          if idx[j].h > 0 then indexed[j] = true end
        end
      end
      for j in pairs(indexed) do redis.call('ZCARD', un.idxKeys[j]) end
    elseif ty.exists then
      -- A new series of a type that has retention indexes: its own are
      -- absent, and so of no wrong type.
      un.sweep = false
    end
  end
  types[i] = ty
end
local names = {}
for _, ty in ipairs(types) do
  -- A written type is in the registry (both are written together); only
  -- the others need asking.
  ty.member = ty.exists or registered
  if not ty.member and not cluster then names[#names + 1] = ty end
end
for j = 1, #names, 1000 do
  local ask = {}
  for i = j, math.min(j + 999, #names) do ask[#ask + 1] = names[i].name end
  local members = redis.call('SMISMEMBER', KEYS[1], unpack(ask))
  for i, m in ipairs(members) do names[j + i - 1].member = m == 1 end
end
-- The same order of refusals as the memory store: a new type too old,
-- then MAX_TYPES, then by type an existing type too old or MAX_SERIES;
-- each the first by name.
local function tooOld(ty) return ty.keepUntil <= ty.anchor end
local newTypes, firstNew = 0, nil
for _, ty in ipairs(types) do
  if not ty.exists and tooOld(ty) then
    return redis.error_reply('TOOOLD ' .. ty.name .. ' ' .. int(ty.anchor) .. ' new')
  end
  if not ty.member then
    newTypes = newTypes + 1
    firstNew = firstNew or ty.name
  end
end
if not cluster then
  redis.call('SCARD', KEYS[2])
  if newTypes > 0 and redis.call('SCARD', KEYS[1]) + newTypes > maxTypes then
    return redis.error_reply('TOOMANYTYPES ' .. firstNew)
  end
end
local refusal
for _, ty in ipairs(types) do
  if tooOld(ty) then
    refusal = 'TOOOLD ' .. ty.name .. ' ' .. int(ty.anchor)
  elseif ty.overSeries then
    refusal = 'TOOMANYSERIES ' .. ty.name .. ' ' .. ty.overSeries
  end
  if refusal then break end
end
-- A batch's check holds the type only where another write could change
-- its answer before the batch's write: where it brings a type or series
-- that takes room, or samples that a newer one (the anchor moves up to
-- the clock) would put out of retention. Returns 3 then.
local hold = false
if checkOnly and cluster and token ~= '' and not refusal then
  local nowS = math.floor(nowUs / 1000000)
  for _, ty in ipairs(types) do
    hold = hold or not ty.exists or ty.takesRoom or ty.keepUntil <= nowS + 60
  end
  if hold then redis.call('SET', lockKey, token, 'PX', lockMs) end
end
if newTypes > 0 and cluster then
  return redis.error_reply('NEWTYPE ' .. firstNew .. (refusal and ' ' .. refusal or ''))
end
if refusal then return redis.error_reply(refusal) end
if checkOnly then return hold and 3 or 0 end

-- Write phase.

-- New buckets, the chunks they start in each index and their expiries
-- are written together, a call for many (flush), since a call costs more
-- than the little each of these writes does.
local pending = {sets = {}, zadds = {}, expires = {}}

local function apply(ty, un, b)
  local expire = b.ix > 0 and b.expiry * 1000000 <= ty.newest
  if not b.clen then
    table.insert(pending.sets, b.key)
    table.insert(pending.sets, struct.pack('<I4I4', #b.rec, 0) .. b.rec)
    if b.ix > 0 then
      local span = idx[b.ix].span
      local cs = b.start - b.start % span
      local z = un.chunks[b.ix]
      if not z then
        z = {key = un.idxKeys[b.ix], seen = {}, args = {}}
        un.chunks[b.ix] = z
        table.insert(pending.zadds, z)
      end
      if not z.seen[cs] then
        z.seen[cs] = true
        table.insert(z.args, cs)
        table.insert(z.args, int(cs))
      end
    end
    if expire then table.insert(pending.expires, b) end
    return
  else
    local size = redis.call('APPEND', b.key, b.rec) - headerLen
    if size > b.clen + b.clen / 4 + 64 then
      ty.compact = ty.compact or {}
      table.insert(ty.compact, b.key)
    end
  end
  if expire then table.insert(pending.expires, b) end
end

local function flush()
  for j = 1, #pending.sets, 1000 do
    redis.call('MSET', unpack(pending.sets, j, math.min(j + 999, #pending.sets)))
  end
  for _, z in ipairs(pending.zadds) do
    for j = 1, #z.args, 1000 do
      redis.call('ZADD', z.key, unpack(z.args, j, math.min(j + 999, #z.args)))
    end
  end
  -- Kept until the anchor passes its expiry; when the newest sample is
  -- already past it, the clock alone decides, so Redis expires it.
  for _, b in ipairs(pending.expires) do
    redis.call('PEXPIRE', b.key, math.max(1, math.floor((b.expiry * 1000000 - nowUs) / 1000)))
  end
  pending = {sets = {}, zadds = {}, expires = {}}
end

-- sweepBudget is how many chunks of buckets one ingest deletes at most.
local sweepBudget = 32

-- sweep deletes the chunks of a unit's buckets that the anchor has
-- passed. Each index drops more chunks than this ingest created in it, so
-- a backlog only shrinks, and the whole script drops at most sweepBudget
-- chunks, so no one ingest pays for a long pause; a unit whose sweep did
-- not finish keeps its old s and carries on at its next ingest. It
-- reports whether it finished.
local function sweep(ty, un)
  local done = true
  for j = 1, un.sweep and nidx or 0 do
    local ix = idx[j]
    if ix.h > 0 then
      local limit = math.min((un.created[j] or 0) + 4, sweepBudget)
      local old = {}
      if limit > 0 then
        old = redis.call('ZRANGEBYSCORE', un.idxKeys[j], '-inf', int(ty.anchor - ix.h - ix.span), 'LIMIT', 0, limit)
      end
      if limit == 0 or #old == limit then done = false end
      sweepBudget = sweepBudget - #old
      for _, cs in ipairs(old) do
        local first, names = tonumber(cs), {}
        for s = first, first + ix.span - ix.w, ix.w do names[#names + 1] = un.prefixes[j] .. int(s) end
        redis.call('UNLINK', unpack(names))
        redis.call('ZREM', un.idxKeys[j], cs)
      end
    end
  end
  return done
end

-- trim drops the series of a type that hold no data at its anchor, as
-- the read phase found them: their remaining buckets chunk by chunk within
-- the sweep's budget, then their indexes, meta, registry entry and places
-- in the sets of their labels. It reports whether none is left to drop.
local function trim(ty)
  for _, g in ipairs(ty.gone) do
    for j = 1, nidx do
      local ix, ixKey = idx[j], g.unit .. 'i:' .. idx[j].name
      for _, cs in ipairs(g.chunks[j]) do
        if sweepBudget == 0 then return false end
        local first, names = tonumber(cs), {}
        for s = first, first + ix.span - ix.w, ix.w do names[#names + 1] = g.unit .. 'b:' .. ix.name .. ':' .. int(s) end
        redis.call('UNLINK', unpack(names))
        redis.call('ZREM', ixKey, cs)
        sweepBudget = sweepBudget - 1
      end
      if g.more[j] then return false end
    end
    if g.id then
      for _, key in ipairs(g.labelKeys) do redis.call('SREM', key, g.id) end
      redis.call('HDEL', ty.registry, g.hash)
    end
    redis.call('UNLINK', g.unit .. 'm', g.unit .. 'b:all')
    redis.call('ZREM', ty.untilKey, g.hash)
  end
  return not ty.moreGone
end

local noted = false

-- Retention's deletes come first (see the top), each type's within the
-- budget; a sweep drops more chunks of an index than the ingest creates
-- in it, counted here.
for _, ty in ipairs(types) do
  for _, un in ipairs(ty.units) do
    for _, b in ipairs(un.buckets) do
      if b.expiry > ty.anchor and not b.clen and b.ix > 0 then
        un.created[b.ix] = (un.created[b.ix] or 0) + 1
      end
    end
    un.done = sweep(ty, un)
  end
  -- Series run out of data as the anchor moves, when the type-wide
  -- buckets are swept too.
  ty.trimmed = not ty.units[1].sweep or trim(ty)
end

local fresh = {}
for _, ty in ipairs(types) do
  if not ty.member then fresh[#fresh + 1] = ty.name end
end
for j = 1, #fresh, 1000 do
  redis.call('SADD', KEYS[1], unpack(fresh, j, math.min(j + 999, #fresh)))
end
for _, ty in ipairs(types) do
  local added, members, labelKeys, untils = {}, {}, {}, {}
  for u, un in ipairs(ty.units) do
    if u > 1 then
      untils[#untils + 1], untils[#untils + 2] = un.untilScore, un.hash
    end
    if u > 1 and not un.known then
      added[#added + 1], added[#added + 2] = un.hash, un.id
      for _, key in ipairs(un.labelKeys) do
        if not members[key] then members[key] = {}; labelKeys[#labelKeys + 1] = key end
        table.insert(members[key], un.id)
      end
    end
    for _, b in ipairs(un.buckets) do
      if b.expiry > ty.anchor then apply(ty, un, b) end
    end
  end
  flush()
  for u, un in ipairs(ty.units) do
    -- A new series' s waits for its first sweep, at its next ingest.
    if u > 1 and un.sweep and un.done then
      redis.call('HSET', un.meta, 's', int(ty.anchor))
    end
  end
  for j = 1, #added, 1000 do
    redis.call('HSET', ty.registry, unpack(added, j, math.min(j + 999, #added)))
  end
  for _, key in ipairs(labelKeys) do
    local ms = members[key]
    for j = 1, #ms, 1000 do redis.call('SADD', key, unpack(ms, j, math.min(j + 999, #ms))) end
  end
  for j = 1, #untils, 1000 do
    redis.call('ZADD', ty.untilKey, 'GT', unpack(untils, j, math.min(j + 999, #untils)))
  end
  -- The buckets grown past their last compaction, noted in one call.
  if ty.compact then
    for j = 1, #ty.compact, 1000 do
      redis.call('SADD', ty.compactKey, unpack(ty.compact, j, math.min(j + 999, #ty.compact)))
    end
    if cluster then noted = true else redis.call('SADD', KEYS[2], ty.name) end
  end
  local meta = {'v', int(ty.version + ty.n), 'f', int(ty.first), 'n', int(ty.newest)}
  if ty.units[1].sweep and ty.units[1].done and ty.trimmed or not ty.exists then
    meta[#meta + 1], meta[#meta + 2] = 's', int(ty.anchor)
  end
  redis.call('HSET', ty.meta, unpack(meta))
  if ty.deleted then
    redis.call('HDEL', ty.meta, 'x')
    redis.call('PERSIST', ty.meta)
  end
end
if once then
  redis.call('SET', KEYS[#KEYS], ARGV[#ARGV - 1], 'PX', ARGV[#ARGV])
end
if cluster and token ~= '' then redis.call('DEL', lockKey) end
-- An ingest of no samples only records its key: nothing to publish.
if ntypes > 0 then redis.call('PUBLISH', ARGV[a], ARGV[a + 1]) end
return noted and 2 or 1

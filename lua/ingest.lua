-- Applies one ingest, every type of it, in one atomic step, or nothing:
-- everything that can fail (the fence, a limit, a key of the wrong type)
-- is checked before the first write, and Redis refuses a script for want
-- of memory only at its first write.
--
-- KEYS: the set of type names; then per type its meta hash, one hash per
-- bucket it adds to (in ARGV's order), and one retention index per
-- resolution that is not kept forever.
-- ARGV: fence (Unix us, Redis's clock), now (Unix us, the service's
-- clock), MAX_TYPES, bins kept per sign, the number of types, the number
-- of indexes nidx; nidx triples (horizon, bucket width, chunk span, in
-- seconds); then per type: name, samples, first and newest (Unix us),
-- keepUntil (0: kept forever), bucket count nb, nidx bucket-name prefixes;
-- then per bucket: index number (0: none), start, expiry (the anchor at
-- which it goes; 0: never), its stats as field a holds them ("count sum
-- min max zeros plo ptop nlo ntop", x for none), nbins, and nbins pairs
-- of bin code and count.
-- Bin codes are computed by the service; the script only adds counts.
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[1]) then
  return redis.error_reply('FENCED ingest reached Redis after its deadline')
end
local nowUs = tonumber(ARGV[2])
local maxTypes, maxBins = tonumber(ARGV[3]), tonumber(ARGV[4])
local ntypes, nidx = tonumber(ARGV[5]), tonumber(ARGV[6])
local a = 7
local idx = {}
for i = 1, nidx do
  idx[i] = {h = tonumber(ARGV[a]), w = tonumber(ARGV[a + 1]), span = tonumber(ARGV[a + 2])}
  a = a + 3
end

local function opt(s) if s == 'x' then return nil end return tonumber(s) end
local function int(x) return string.format('%d', x) end
local function num(x) return string.format('%.17g', x) end

-- stats reads field a: count sum min max zeros plo ptop nlo ntop.
local function stats(s)
  local c, sum, mn, mx, z, pl, pt, nl, nt =
    string.match(s, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$')
  return tonumber(c), tonumber(sum), tonumber(mn), tonumber(mx), tonumber(z), {opt(pl), opt(nl)}, {opt(pt), opt(nt)}
end

-- Read phase.
local types, k, names = {}, 2, {}
for i = 1, ntypes do
  local ty = {name = ARGV[a], n = tonumber(ARGV[a + 1]), first = tonumber(ARGV[a + 2]),
    newest = tonumber(ARGV[a + 3]), keepUntil = tonumber(ARGV[a + 4]), meta = KEYS[k],
    buckets = {}, prefixes = {}, idxKeys = {}}
  local nb = tonumber(ARGV[a + 5])
  a = a + 6
  for j = 1, nidx do ty.prefixes[j] = ARGV[a]; a = a + 1 end
  local m = redis.call('HMGET', ty.meta, 'v', 'f', 'n')
  ty.version = tonumber(m[1]) or 0
  ty.oldAnchor = nil
  if ty.version > 0 then
    ty.oldAnchor = math.floor(math.min(tonumber(m[3]), nowUs) / 1000000)
    ty.first = math.min(ty.first, tonumber(m[2]))
    ty.newest = math.max(ty.newest, tonumber(m[3]))
  end
  ty.anchor = math.floor(math.min(ty.newest, nowUs) / 1000000)
  local firstKey = k + 1
  k = k + 1
  for j = 1, nb do
    -- A bucket's arguments are read where they are used; here only where
    -- they start.
    local nbins = tonumber(ARGV[a + 4])
    ty.buckets[j] = {key = KEYS[k], at = a, expiry = tonumber(ARGV[a + 2])}
    a = a + 5 + 2 * nbins
    k = k + 1
  end
  for j = 1, nidx do ty.idxKeys[j] = KEYS[k]; k = k + 1 end
  -- A new type's keys are usually all absent, which one EXISTS shows;
  -- otherwise each is read, which also fails here on a key of the wrong
  -- type rather than halfway through the writes.
  local present = ty.version > 0
  for j = firstKey, k - 1, 1000 do
    present = present or redis.call('EXISTS', unpack(KEYS, j, math.min(j + 999, k - 1))) > 0
  end
  if present then
    for _, b in ipairs(ty.buckets) do b.cur = redis.call('HGET', b.key, 'a') end
    for _, key in ipairs(ty.idxKeys) do redis.call('ZCARD', key) end
  end
  types[i] = ty
  names[i] = ty.name
end
for j = 1, #names, 1000 do
  local members = redis.call('SMISMEMBER', KEYS[1], unpack(names, j, math.min(j + 999, #names)))
  for i, m in ipairs(members) do types[j + i - 1].member = m == 1 end
end
-- The same order of refusals as the memory store: a new type too old,
-- then MAX_TYPES, then an existing type too old; each the first by name.
local function tooOld(ty) return ty.keepUntil ~= 0 and ty.keepUntil <= ty.anchor end
local newTypes, firstNew = 0, nil
for _, ty in ipairs(types) do
  if ty.version == 0 and tooOld(ty) then
    return redis.error_reply('TOOOLD ' .. ty.name .. ' ' .. int(ty.anchor))
  end
  if not ty.member then
    newTypes = newTypes + 1
    firstNew = firstNew or ty.name
  end
end
if newTypes > 0 and redis.call('SCARD', KEYS[1]) + newTypes > maxTypes then
  return redis.error_reply('TOOMANYTYPES ' .. firstNew)
end
for _, ty in ipairs(types) do
  if tooOld(ty) then
    return redis.error_reply('TOOOLD ' .. ty.name .. ' ' .. int(ty.anchor))
  end
end

-- Write phase.
-- fold moves the bins of sign s below floor into the floor bin: the
-- sketch's bound, applied as the service applies it (sketch.go).
local function fold(key, s, lo, hi, floor)
  local moved = 0
  if hi - lo + 1 <= redis.call('HLEN', key) then
    for i = lo, hi do
      local f = int(2 * i + s)
      local v = redis.call('HGET', key, f)
      if v then
        moved = moved + tonumber(v)
        redis.call('HDEL', key, f)
      end
    end
  else
    local all = redis.call('HGETALL', key)
    for j = 1, #all, 2 do
      local code = tonumber(all[j])
      if code and code % 2 == s and (code - s) / 2 < floor then
        moved = moved + tonumber(all[j + 1])
        redis.call('HDEL', key, all[j])
      end
    end
  end
  return moved
end

local function field(v) if v == nil then return 'x' end return int(v) end

local function apply(ty, b)
  local at = b.at
  b.ix, b.start = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  local nbins = tonumber(ARGV[at + 4])
  local first, last = at + 5, at + 4 + 2 * nbins
  if not b.cur then
    -- A new bucket is written as the service sent it, in one HSET when
    -- its bins allow.
    redis.call('HSET', b.key, 'a', ARGV[at + 3], unpack(ARGV, first, math.min(last, first + 1997)))
    for j = first + 1998, last, 2000 do
      redis.call('HSET', b.key, unpack(ARGV, j, math.min(j + 1999, last)))
    end
  else
    local c, sum, mn, mx, zero, lo, top = stats(ARGV[at + 3])
    local c0, sum0, mn0, mx0, zero0, oldLo, oldTop = stats(b.cur)
    c, sum, mn, mx, zero = c + c0, sum0 + sum, math.min(mn0, mn), math.max(mx0, mx), zero + zero0
    local floor = {}
    for i = 1, 2 do
      local s = i - 1
      if top[i] == nil then
        lo[i], top[i] = oldLo[i], oldTop[i]
        if oldTop[i] ~= nil then floor[i] = oldTop[i] - maxBins + 1 end
      else
        local dLo = lo[i]
        top[i] = math.max(oldTop[i] or top[i], top[i])
        floor[i] = top[i] - maxBins + 1
        if oldLo[i] ~= nil and oldLo[i] < floor[i] then
          local moved = fold(b.key, s, oldLo[i], math.min(floor[i] - 1, oldTop[i]), floor[i])
          if moved > 0 then redis.call('HINCRBY', b.key, int(2 * floor[i] + s), moved) end
        end
        lo[i] = math.max(math.min(oldLo[i] or dLo, dLo), floor[i])
      end
    end
    -- The delta's bins, those below the floor folded into it, are added
    -- with one HMGET and one HSET rather than a command per bin. Only a
    -- fold can make two of them name the same bin.
    local names, adds = {}, {}
    local folds = false
    for j = first, last, 2 do
      local code = tonumber(ARGV[j])
      local s = code % 2
      if (code - s) / 2 < floor[s + 1] then
        folds = true
        names[#names + 1], adds[#adds + 1] = int(2 * floor[s + 1] + s), tonumber(ARGV[j + 1])
      else
        names[#names + 1], adds[#adds + 1] = ARGV[j], tonumber(ARGV[j + 1])
      end
    end
    if folds then
      local pos, n2, a2 = {}, {}, {}
      for i, name in ipairs(names) do
        local p = pos[name]
        if p then a2[p] = a2[p] + adds[i] else n2[#n2 + 1], a2[#a2 + 1] = name, adds[i]; pos[name] = #n2 end
      end
      names, adds = n2, a2
    end
    local set = {'a', table.concat({int(c), num(sum), num(mn), num(mx), int(zero),
      field(lo[1]), field(top[1]), field(lo[2]), field(top[2])}, ' ')}
    for j = 1, #names, 1000 do
      local old = redis.call('HMGET', b.key, unpack(names, j, math.min(j + 999, #names)))
      for i = 1, #old do
        set[#set + 1] = names[j + i - 1]
        -- A count is passed as a Lua number: Redis writes it with 14
        -- significant digits, exact for any count below 10^14.
        set[#set + 1] = (tonumber(old[i]) or 0) + adds[j + i - 1]
      end
    end
    for j = 1, #set, 2000 do
      redis.call('HSET', b.key, unpack(set, j, math.min(j + 1999, #set)))
    end
  end
  if b.ix > 0 then
    if not b.cur then
      local span = idx[b.ix].span
      local cs = b.start - b.start % span
      redis.call('ZADD', ty.idxKeys[b.ix], cs, int(cs))
    end
    -- Kept until the anchor passes its expiry; when the newest sample is
    -- already past it, the clock alone decides, so Redis expires it.
    if b.expiry > 0 and b.expiry * 1000000 <= ty.newest then
      redis.call('PEXPIRE', b.key, math.max(1, math.floor((b.expiry * 1000000 - nowUs) / 1000)))
    end
  end
end

local fresh = {}
for _, ty in ipairs(types) do
  if not ty.member then fresh[#fresh + 1] = ty.name end
end
for j = 1, #fresh, 1000 do
  redis.call('SADD', KEYS[1], unpack(fresh, j, math.min(j + 999, #fresh)))
end
for _, ty in ipairs(types) do
  for _, b in ipairs(ty.buckets) do
    if b.expiry == 0 or b.expiry > ty.anchor then apply(ty, b) end
  end
  redis.call('HSET', ty.meta, 'v', int(ty.version + ty.n), 'f', int(ty.first), 'n', int(ty.newest))
  -- Retention: delete the chunks of buckets that the anchor has passed, a
  -- few per index and ingest, so no one ingest pays for a long pause; only
  -- when the anchor moved, since nothing else makes more of them due.
  for j = 1, (ty.oldAnchor and ty.anchor > ty.oldAnchor) and nidx or 0 do
    local ix = idx[j]
    local old = redis.call('ZRANGEBYSCORE', ty.idxKeys[j], '-inf', int(ty.anchor - ix.h - ix.span), 'LIMIT', 0, 4)
    for _, cs in ipairs(old) do
      local first, names = tonumber(cs), {}
      for s = first, first + ix.span - ix.w, ix.w do names[#names + 1] = ty.prefixes[j] .. int(s) end
      redis.call('DEL', unpack(names))
      redis.call('ZREM', ty.idxKeys[j], cs)
    end
  end
end
return 1

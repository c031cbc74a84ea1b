-- Takes MAX_TYPES room for new types on a Redis Cluster, where the set of
-- type names is on a slot of its own (clusterstore.go): the names not in
-- the set join it, all of them or, when that would take it past MAX_TYPES,
-- none (TOOMANYTYPES, naming the first by name). With take 0 it only
-- checks.
--
-- KEYS: the set of type names.
-- ARGV: the fence (Unix us, Redis's clock: past it the run does nothing),
-- MAX_TYPES, take (1 or 0), then the names, sorted.
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[1]) then
  return redis.error_reply('FENCED register reached Redis after its deadline')
end
local max, take = tonumber(ARGV[2]), ARGV[3] == '1'
local fresh = {}
for j = 4, #ARGV, 1000 do
  local last = math.min(j + 999, #ARGV)
  for i, m in ipairs(redis.call('SMISMEMBER', KEYS[1], unpack(ARGV, j, last))) do
    if m == 0 then fresh[#fresh + 1] = ARGV[j + i - 1] end
  end
end
if #fresh == 0 then return 0 end
if redis.call('SCARD', KEYS[1]) + #fresh > max then
  return redis.error_reply('TOOMANYTYPES ' .. fresh[1])
end
if take then
  for j = 1, #fresh, 1000 do
    redis.call('SADD', KEYS[1], unpack(fresh, j, math.min(j + 999, #fresh)))
  end
end
return #fresh

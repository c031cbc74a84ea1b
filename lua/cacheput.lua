-- Caches one answer, keeping the cache at most max entries.
-- KEYS: the entry, the index of entries by expiry.
-- ARGV: the answer's version, the value ("version body"), TTL in ms, max.
-- An entry of a later version is kept: a slow reader's late put must not
-- push out a fresher answer.
local cur = redis.call('GET', KEYS[1])
if cur then
  local v = tonumber(string.match(cur, '^(%d+) '))
  if v and v > tonumber(ARGV[1]) then return 0 end
end
redis.call('ZCARD', KEYS[2]) -- fails here, before any write, if it is not a sorted set
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), KEYS[1])
-- Entries that expired have left by themselves; drop them from the index.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  local victims = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #victims, 2 do redis.call('DEL', victims[i]) end
end
return 1

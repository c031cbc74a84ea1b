-- Counts one request in a rate-limit window.
-- KEYS[1]: the window's counter. ARGV[1]: its TTL in milliseconds.
-- The PTTL check repairs a counter that somehow lost its expiry, so no
-- counter outlives its window for long, whatever failed between calls.
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n

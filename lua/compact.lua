-- Replaces a bucket's records with the one record the service merged them
-- into, keeping the records appended since it read them.
-- KEYS[1]: the bucket. ARGV: the compaction count the service read, the
-- size of the records it merged, the merged record, and the SHA-1 of the
-- records it merged.
-- A compaction in between (another instance's), or a bucket written anew
-- since (deleted and made again, or added up again after a delete), makes
-- this one stale: it changes nothing then. The count alone would not tell
-- a bucket made again, which starts at count 0 again.
local head = redis.call('GETRANGE', KEYS[1], 0, 7)
if #head < 8 then return 0 end
local _, gen = struct.unpack('<I4I4', head)
if gen ~= tonumber(ARGV[1]) then return 0 end
local size = tonumber(ARGV[2])
if redis.sha1hex(redis.call('GETRANGE', KEYS[1], 8, 8 + size - 1)) ~= ARGV[4] then return 0 end
local tail = redis.call('GETRANGE', KEYS[1], 8 + size, -1)
local rec = ARGV[3]
redis.call('SET', KEYS[1], struct.pack('<I4I4', #rec, gen + 1) .. rec .. tail, 'KEEPTTL')
return 1

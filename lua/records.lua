-- Shared by lua/delete.lua and lua/reclaim.lua, which the service runs
-- with this prepended (delete.go).

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

local function int(x) return string.format('%d', x) end

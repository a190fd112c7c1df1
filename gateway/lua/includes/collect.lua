-- Shared by read.lua and read_range.lua: a slice of a data stream as one body.

-- Collect the entries of the data stream `key` after entry ID `after` up to
-- `upper` (inclusive; '+' for no bound) as one response body, so that Python
-- does no per-entry work: JSON payloads joined with ',' (the caller adds the
-- brackets), other payloads concatenated. Whole appends only: it stops after
-- the append that brings the body to `max_bytes` (or to `max_entries`
-- entries); the entry at `upper` ends an append as far as the reader sees.
-- Entries are fetched in batches sized from the bytes still wanted, so a read
-- of large messages never pulls more than it returns (plus one batch of
-- small ones) out of the stream; past a limit inside an append, the batch is
-- exactly the rest of that append (its entries say how many follow).
-- Returns body, last entry ID ('' when none), entry count.
local function collect(key, after, upper, max_bytes, max_entries, sep)
  local parts, size, count, last = {}, 0, 0, nil
  local follow = nil -- how many entries of the last entry's append follow it
  local start = '(' .. after
  local batch = 1
  while true do
    local entries = redis.call('XRANGE', key, start, upper, 'COUNT', batch)
    local n = #entries
    for i = 1, n do
      local id, fields = entries[i][1], entries[i][2]
      local payload = fields[2]
      count = count + 1
      parts[count] = payload
      size = size + #payload
      last = id
      -- fields: json|data, payload [, 'more', how many of the append follow]
      follow = fields[4]
      if (follow == nil or id == upper) and (size >= max_bytes or count >= max_entries) then
        return table.concat(parts, sep), last, count
      end
    end
    if n < batch then
      break
    end
    start = '(' .. last
    local wanted
    if size >= max_bytes or count >= max_entries then
      wanted = tonumber(follow) -- the rest of the append the limit fell in
    else
      -- Enough entries of the average size seen so far to reach max_bytes.
      wanted = math.min(math.ceil((max_bytes - size) / math.max(1, size / count)) + 1,
        max_entries - count + 1)
    end
    batch = math.max(1, math.min(wanted, 1024))
  end
  return table.concat(parts, sep), last or '', count
end

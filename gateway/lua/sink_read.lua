-- sink_read: hand a Postgres sink consumer its next feed entries, as many as
-- fit a byte budget. XREADGROUP and XAUTOCLAIM only bound a read by entry
-- count, and a feed entry is a whole append (up to the body limit), so a sink
-- asking for 2000 entries could receive gigabytes. Here the entries are
-- measured inside Redis first; only those that fit are delivered (added to
-- the consumer's pending list) and returned. A batch ends with the entry that
-- reaches the budget, so it holds at most the budget plus one entry.
--
-- Input:
--   KEYS[1] the shard's sync feed (STREAM, consumer group ARGV[1])
--   ARGV[1] consumer group
--   ARGV[2] consumer
--   ARGV[3] most entries to return (>= 1)
--   ARGV[4] byte budget (>= 1)
--   ARGV[5] '' to read entries never delivered; else a time in ms: take over
--           entries pending (unacknowledged) for at least that long instead
--   ARGV[6] optional, 'strict': the budget is a hard ceiling (the sink's
--           global in-flight bound): the entry that would pass it is left
--           for the next read, and when the first entry alone passes it
--           nothing is delivered and the reply is the error 'TOOBIG <bytes>'
--
-- Output: the entries, oldest first, each {id, {field, value, ...}}; {} when
-- none. A pending entry that was trimmed away is acknowledged and skipped.
-- Error 'NOGROUP ...' when the feed or its group does not exist.
-- Error 'TOOBIG <bytes>' (strict only): the next entry alone is that big.

local feed, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local max_entries, budget, idle = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local strict = ARGV[6] == 'strict'

local function size_of(entry)
  local n = #entry[1]
  for _, part in ipairs(entry[2]) do
    n = n + #part
  end
  return n
end

if redis.call('EXISTS', feed) == 0 then
  return redis.error_reply('NOGROUP no sync feed ' .. feed)
end

if idle ~= '' then
  -- Take over stale entries: measure each one (one XRANGE per entry, so Lua
  -- never holds more than one extra entry), then XCLAIM those that fit.
  local stale = redis.call('XPENDING', feed, group, 'IDLE', idle, '-', '+', max_entries)
  local ids, gone, bytes, toobig = {}, {}, 0, nil
  for _, p in ipairs(stale) do
    local found = redis.call('XRANGE', feed, p[1], p[1])
    if #found == 0 then
      table.insert(gone, p[1])
    else
      local size = size_of(found[1])
      if strict and bytes + size > budget then
        if #ids == 0 then
          toobig = size
        end
        break
      end
      table.insert(ids, p[1])
      bytes = bytes + size
      if bytes >= budget then
        break
      end
    end
  end
  if #gone > 0 then
    redis.call('XACK', feed, group, unpack(gone))
  end
  if toobig then
    return redis.error_reply('TOOBIG ' .. toobig)
  end
  if #ids == 0 then
    return {}
  end
  return redis.call('XCLAIM', feed, group, consumer, idle, unpack(ids))
end

-- New entries: those after the group's last delivered ID.
local last = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', feed)) do
  local fields = {}
  for i = 1, #g, 2 do
    fields[g[i]] = g[i + 1]
  end
  if fields['name'] == group then
    last = fields['last-delivered-id']
  end
end
if not last then
  return redis.error_reply('NOGROUP no consumer group ' .. group .. ' on ' .. feed)
end

-- Measure in small steps (the step shrinks as entries grow), so that the
-- copies Lua holds stay near the budget too.
local count, bytes, cursor, biggest = 0, 0, '(' .. last, 0
while count < max_entries and bytes < budget do
  local step = 1
  if biggest > 0 then
    step = math.max(1, math.min(64, max_entries - count, math.floor((budget - bytes) / biggest)))
  end
  local chunk = redis.call('XRANGE', feed, cursor, '+', 'COUNT', step)
  if #chunk == 0 then
    break
  end
  local full = false
  for _, entry in ipairs(chunk) do
    local size = size_of(entry)
    if strict and bytes + size > budget then
      if count == 0 then
        return redis.error_reply('TOOBIG ' .. size)
      end
      full = true
      break
    end
    count = count + 1
    bytes = bytes + size
    biggest = math.max(biggest, size)
    cursor = '(' .. entry[1]
    if bytes >= budget then
      break
    end
  end
  if full then
    break
  end
end
if count == 0 then
  return {}
end
local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', feed, '>')
if not reply then
  return {}
end
return reply[1][2]

-- trim: record what the Postgres sink committed of a tiered stream, and drop
-- from Redis the entries retention no longer keeps there (they are in
-- stream_history). Called by the sink right after each commit (ARGV[1] = the
-- newest entry it committed) and by its sweep when a stream's oldest entry
-- ages out of the retention window (ARGV[1] = '').
--
-- The cut is the newest entry both retention limits let go (the newer of the
-- two limits' cuts: keep at most N messages AND at most S seconds), lowered
-- to `synced` (never an entry not yet in Postgres), then raised to the end of
-- its append (an append is never cut in two; the append's end is <= synced,
-- since synced always ends an append). Entries <= cut are removed, and meta
-- `trim` = cut (only ever raised). See common.lua for meta synced/trim/base.
--
-- Input:
--   KEYS[1] meta (HASH)   KEYS[2] data (STREAM)
--   KEYS[3] the shard's trim schedule (ZSET: stream name -> when due, ms)
--   ARGV[1] entry ID of the newest entry committed to Postgres, or ''
--   ARGV[2] most messages kept in Redis, or '' (no count limit)
--   ARGV[3] most seconds kept in Redis, or '' (no age limit)
--   ARGV[4] the stream's name (its member in KEYS[3])
--
-- A count cut reads at most 10,000 entries per call (see MAX_COUNT_CUT).
--
-- Output: {trim, removed}: the stream's trim point after the call ('' when
-- nothing was ever trimmed) and the number of entries removed now.

-- @include common

local meta, data, schedule, name = KEYS[1], KEYS[2], KEYS[3], ARGV[4]
local m = load_meta(meta)
if not m then
  -- Removed meanwhile: nothing to record (never recreate its meta).
  redis.call('ZREM', schedule, name)
  return {'', 0}
end

local synced = m.synced
-- A late commit of a removed stream of the same name (at or below base) says
-- nothing about this one.
local committed = ARGV[1]
if committed ~= '' and m.base and bytes_le(id_key(committed), id_key(m.base)) then
  committed = ''
end
if committed ~= '' and (not synced or not bytes_le(id_key(committed), id_key(synced))) then
  synced = committed
  redis.call('HSET', meta, 'synced', synced)
end
if not synced then
  return {m.trim or '', 0}
end

local now = now_ms()
local cut = nil
-- Count limit: the newest of the `excess` oldest entries. Read from the old
-- end (excess is what arrived since the last trim, whatever N is), at most
-- MAX_COUNT_CUT per call: after a long sink outage the rest goes in later
-- calls (the stream is then due again at once), never one huge read.
local MAX_COUNT_CUT = 10000
local backlog = false
if ARGV[2] ~= '' then
  local excess = redis.call('XLEN', data) - tonumber(ARGV[2])
  if excess > 0 then
    local oldest = redis.call('XRANGE', data, '-', '+', 'COUNT', math.min(excess, MAX_COUNT_CUT))
    cut = oldest[#oldest][1]
    backlog = excess > MAX_COUNT_CUT
  end
end
local max_age_ms = nil
if ARGV[3] ~= '' then
  max_age_ms = tonumber(ARGV[3]) * 1000
  local before = now - max_age_ms
  if before >= 0 then
    local aged = redis.call('XREVRANGE', data, int_str(before) .. '-18446744073709551615', '-', 'COUNT', 1)
    if #aged > 0 and (not cut or not bytes_le(id_key(aged[1][1]), id_key(cut))) then
      cut = aged[1][1]
    end
  end
end

local removed = 0
if cut and not bytes_le(id_key(synced), id_key(cut)) then
  -- Not committed beyond synced: cut there (an append's end). Else below
  -- synced: the cut entry's own append must go whole.
  local fields = redis.call('XRANGE', data, cut, cut)[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'more' then
      local rest = redis.call('XRANGE', data, '(' .. cut, '+', 'COUNT', tonumber(fields[i + 1]))
      if #rest > 0 then
        cut = rest[#rest][1]
      end
    end
  end
elseif cut then
  cut = synced
end
if cut and not (m.trim and bytes_le(id_key(cut), id_key(m.trim))) then
  local ms, seq = string.match(cut, '^(%d+)-(%d+)$')
  removed = redis.call('XTRIM', data, 'MINID', ms .. '-' .. int_str(tonumber(seq) + 1))
  redis.call('HSET', meta, 'trim', cut)
  m.trim = cut
end

if backlog and m.trim ~= synced then
  -- Capped by MAX_COUNT_CUT, not by synced: more to trim at the next sweep.
  redis.call('ZADD', schedule, int_str(now), name)
elseif max_age_ms then
  -- Idle streams age out too: due when the oldest entry left is older than
  -- the window. Only once committed; until then the sink's commit calls again.
  local oldest = redis.call('XRANGE', data, '-', '+', 'COUNT', 1)
  if #oldest > 0 and bytes_le(id_key(oldest[1][1]), id_key(synced)) then
    local ms = string.match(oldest[1][1], '^(%d+)-')
    redis.call('ZADD', schedule, int_str(tonumber(ms) + max_age_ms), name)
  else
    redis.call('ZREM', schedule, name)
  end
else
  redis.call('ZREM', schedule, name)
end
return {m.trim or '', removed}

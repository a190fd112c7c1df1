-- create: create a stream (PUT), or confirm that an identical one exists.
-- Forks are created here too, after fork_acquire.lua has taken a reference on
-- the source; the fork's own entries start above the fork offset.
--
-- Input:
--   KEYS[1..7] meta, data, producers, forks, shard feed, tombstone of the new stream,
--              fork deadlines of its shard
--   KEYS[8..9] subscription links of the stream (SET), the shard's wake queue (ZSET);
--              a queued wake is also published on 'ds:' .. KEYS[9] (keys.wake_channel)
--              with the stream's name: SPUBLISH on Redis 7+, else PUBLISH, as the
--              gateway chooses (gateway/redis_client.py; no ARGV carries it here)
--   ARGV[1]  content type as sent (stored and echoed byte-exact)
--   ARGV[2]  media type (lowercased, no parameters), compared on re-create
--   ARGV[3]  '1' for JSON mode, else ''
--   ARGV[4]  TTL seconds, or ''
--   ARGV[5]  Expires-At as sent, or ''
--   ARGV[6]  Expires-At in ms since the epoch, or ''
--   ARGV[7]  '1' to create the stream closed, else ''
--   ARGV[8]  fork source name, or ''
--   ARGV[9]  fork offset as an entry ID ('ms-seq'), or ''
--   ARGV[10] '1' when the fork offset was given explicitly (compared on re-create)
--   ARGV[11] fork sub-offset as sent, or ''
--   ARGV[12] random generation token for a new stream (part of its ETags)
--   ARGV[13] 'check' to only compare with an existing stream, never create
--   ARGV[14] the stream's name
--   ARGV[15] '1' to record its appends in the sync feed (Postgres sink), else ''
--   ARGV[16] '1' for a tiered stream (every append to the sync feed, for
--            Postgres stream_history; Redis trimmed by retention), else ''
--   ARGV[17] ids of the pattern subscriptions matching the name, '\n'-separated, or ''
--            (linked before the first append; gateway/subscriptions/patterns.py)
--   ARGV[18..] message groups (see add_groups): sub-offset prefix, initial body
--
-- Output:
--   {'created', tail, closed, released_src}  new stream; released_src names the
--                                            source of an expired stream it replaced
--   {'exists', tail, closed, ct}             identical stream already there
--   {'conflict', src}                        different stream there (src: its source)
--   {'gone'}                                 path is soft-deleted (forks read through it)
--   {'absent'}                               only with 'check'

-- @include common

local now = now_ms()
local state, m = stream_state(now)
local released = ''
if state == 'gone' then
  return {'gone'}
elseif state == 'expired' then
  released = m.src or ''
elseif state == 'live' then
  local function same(a, b)
    return (a or '') == (b or '')
  end
  local sub_a = (m.fsub == '0') and '' or (m.fsub or '')
  local sub_b = (ARGV[11] == '0') and '' or ARGV[11]
  local matches = m.mt == ARGV[2]
    and same(m.ttl, ARGV[4])
    and same(m.exp_raw, ARGV[5])
    and same(m.closed, ARGV[7])
    and same(m.src, ARGV[8])
    and (ARGV[10] ~= '1' or same(m.fofs, ARGV[9]))
    and sub_a == sub_b
  if matches then
    return {'exists', m.tail, m.closed or '', m.ct}
  end
  return {'conflict', m.src or ''}
end
if ARGV[13] == 'check' then
  return {'absent'}
end

local tail = '0-0'
local fields = {
  'name', ARGV[14], 'ct', ARGV[1], 'mt', ARGV[2], 'gen', ARGV[12],
  'atime', int_str(now), 'created', int_str(now),
}
local function put(k, v)
  if v ~= '' then
    table.insert(fields, k)
    table.insert(fields, v)
  end
end
put('json', ARGV[3])
put('sink', ARGV[15])
put('tier', ARGV[16])
put('ttl', ARGV[4])
put('exp_raw', ARGV[5])
put('exp', ARGV[6])
put('src', ARGV[8])
put('fofs', ARGV[9])
put('fsub', ARGV[11])
-- The stream's own entries start above the fork offset, and above the last
-- entry of a removed stream of the same name (the tombstone).
local floor = '0-0'
if ARGV[9] ~= '' then
  floor = ARGV[9]
  tail = ARGV[9]
end
local tombstone = redis.call('GET', KEYS[6])
if tombstone and not bytes_le(id_key(tombstone), id_key(floor)) then
  floor = tombstone
end
-- base (see common.lua): no entry of this incarnation is at or below it, and
-- every entry a removed stream of this name ever had is. The floor covers a
-- removal of the last 10 minutes (tombstone); one second ago covers older ones
-- and key expiry (a stream is only garbage-collected a minute after its last
-- write), with room for XADD's clock lagging TIME inside a script.
local base = floor
local before_now = int_str(now - 1000) .. '-18446744073709551615'
if bytes_le(id_key(base), id_key(before_now)) then
  base = before_now
end
put('base', base)
if floor ~= '0-0' then
  -- An empty stream whose last ID is the floor: XADD '*' then hands out IDs
  -- above it. MAXLEN 0 drops the placeholder entry at once.
  redis.call('XADD', KEYS[2], 'MAXLEN', '0', floor, 'floor', '')
end

local nm = {json = (ARGV[3] ~= '') or nil, sink = (ARGV[15] ~= '') or nil,
  tier = (ARGV[16] ~= '') or nil, name = ARGV[14]}
local last, added = add_groups(nm, 18)
tail = last or tail
-- Subscriptions: link before the first append; a body counts as an append.
for id in string.gmatch(ARGV[17], '[^\n]+') do
  redis.call('SADD', KEYS[8], id)
end
if added > 0 and redis.call('EXISTS', KEYS[8]) == 1 then
  redis.call('ZADD', KEYS[9], now, ARGV[14])
  -- redis.REDIS_VERSION_NUM exists from Redis 7.0, when the gateway subscribes with SSUBSCRIBE.
  redis.call(redis.REDIS_VERSION_NUM and 'SPUBLISH' or 'PUBLISH', 'ds:' .. KEYS[9], ARGV[14])
end
put('tail', tail)
if added > 0 then
  put('bytes', int_str(added))
end
put('closed', ARGV[7])
redis.call('HSET', KEYS[1], unpack(fields))
local created = load_meta(KEYS[1])
set_key_expiry(created)
return {'created', tail, ARGV[7], released}

-- read: the stream's metadata and its data after an offset as one response
-- body (see collect), checked for expiry in the same step; optionally restarts
-- a sliding TTL.
--
-- Input:
--   KEYS[1..7] meta, data, producers, forks, shard feed, tombstone of the stream,
--              fork deadlines of its shard
--   ARGV[1] read entries with IDs above this one ('ms-seq'), or '' for metadata only
--   ARGV[2] stop after the append that brings the body to this many bytes
--   ARGV[3] '1' to count this as an access (restarts a sliding TTL), else ''
--   ARGV[4] ... or after this many entries (never inside an append)
--
-- Output:
--   {'live', meta_flat, body, last_id, count}   last_id '' and count 0: no new data
--   {'fork', meta_flat}            ARGV[1] lies below the fork offset: the caller
--                                  reads the inherited data first (read_range.lua)
--   {'cold', trim, base, meta_flat} ARGV[1] lies below meta `trim`: those entries
--                                  left Redis; the caller reads (ARGV[1], trim] of
--                                  this incarnation (above `base`) from Postgres
--   {'gone', meta_flat}            soft-deleted
--   {'absent'} | {'expired', src}

-- @include common
-- @include collect

local now = now_ms()
local state, m = stream_state(now)
if state == 'absent' then
  return {'absent'}
elseif state == 'expired' then
  return {'expired', m.src or ''}
end
local flat = redis.call('HGETALL', KEYS[1])
if state == 'gone' then
  return {'gone', flat}
end
if ARGV[3] == '1' then
  touch(m, now)
end
local after = ARGV[1]
if after == '' or bytes_le(id_key(m.tail), id_key(after)) then
  return {'live', flat, '', '', 0}
end
if m.fofs and not bytes_le(id_key(m.fofs), id_key(after)) then
  return {'fork', flat}
end
if m.trim and not bytes_le(id_key(m.trim), id_key(after)) then
  return {'cold', m.trim, m.base or '0-0', flat}
end
local body, last, count = collect(KEYS[2], after, '+', tonumber(ARGV[2]), tonumber(ARGV[4]), m.json and ',' or '')
return {'live', flat, body, last, count}

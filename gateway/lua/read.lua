-- read: the stream's metadata and the entries after an offset, checked for
-- expiry in the same step; optionally restarts a sliding TTL.
--
-- Input:
--   KEYS[1..6] meta, data, producers, forks, shard feed, tombstone of the stream
--   ARGV[1] read entries with IDs above this one ('ms-seq'), or '' for metadata only
--   ARGV[2] at most this many entries
--   ARGV[3] '1' to count this as an access (restarts a sliding TTL), else ''
--
-- Output:
--   {'live', meta_flat, entries}   entries as XRANGE returns them
--   {'gone', meta_flat}            soft-deleted
--   {'absent'} | {'expired', src}

-- @include common

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
local entries = {}
if ARGV[1] ~= '' and not bytes_le(id_key(m.tail), id_key(ARGV[1])) then
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
end
return {'live', flat, entries}

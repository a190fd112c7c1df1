-- delete: delete a stream. While forks still read through it, it is only
-- soft-deleted (data kept, direct access answers 410) and goes with its
-- last fork (fork_release.lua).
--
-- Input:
--   KEYS[1..7] meta, data, producers, forks, shard feed, tombstone of the stream,
--              fork deadlines of its shard
--   ARGV[1] publish command: 'PUBLISH' or 'SPUBLISH'
--   ARGV[2] notification channel
--
-- Output:
--   {'deleted', src}   removed; src names its fork source to release, or ''
--   {'soft'}           soft-deleted, forks remain
--   {'absent'} | {'expired', src} | {'gone'}

-- @include common

local now = now_ms()
local state, m = stream_state(now)
if state ~= 'live' then
  return {state, m and m.src or ''}
end
if redis.call('SCARD', KEYS[4]) > 0 then
  redis.call('HSET', KEYS[1], 'deleted', '1')
  redis.call(ARGV[1], ARGV[2], 'deleted')
  return {'soft'}
end
drop_stream(m)
redis.call(ARGV[1], ARGV[2], 'deleted')
return {'deleted', m.src or ''}

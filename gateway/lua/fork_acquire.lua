-- fork_acquire: register a fork on its source before the fork is created, so
-- the source's data outlives a delete for as long as the fork reads it.
-- Runs on the source's slot; create.lua then runs on the fork's.
--
-- Input:
--   KEYS[1..7] meta, data, producers, forks, shard feed, tombstone of the SOURCE stream,
--              fork deadlines of its shard
--   ARGV[1] name of the fork
--   ARGV[2] media type the fork asks for, or '' to inherit
--   ARGV[3] fork offset as an entry ID, or '' for the source's tail
--
-- Output:
--   {'ok', fork_offset_id, meta_flat}
--   {'absent'} | {'expired', src} | {'gone'}
--   {'ct_mismatch'} | {'bad_offset'}

-- @include common

local now = now_ms()
local state, m = stream_state(now)
if state ~= 'live' then
  return {state, m and m.src or ''}
end
if ARGV[2] ~= '' and ARGV[2] ~= m.mt then
  return {'ct_mismatch'}
end
local offset = ARGV[3]
if offset == '' then
  offset = m.tail
elseif not bytes_le(id_key(offset), id_key(m.tail)) then
  return {'bad_offset'}
end
redis.call('SADD', KEYS[4], ARGV[1])
-- The source's keys must not be garbage-collected under the fork.
for i = 1, 3 do
  redis.call('PERSIST', KEYS[i])
end
return {'ok', offset, redis.call('HGETALL', KEYS[1])}

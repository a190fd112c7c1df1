-- fork_release: drop a fork's reference on its source (the fork was deleted,
-- expired, or its creation failed). A soft-deleted or expired source whose
-- last fork goes is removed, and the caller continues up the chain.
--
-- Input:
--   KEYS[1..7] meta, data, producers, forks, shard feed, tombstone of the SOURCE stream,
--              fork deadlines of its shard
--   ARGV[1] name of the fork
--
-- Output:
--   {'kept'}            source stays (live, or other forks remain)
--   {'deleted', src}    source removed; src names its own source to release, or ''
--   {'absent'}

-- @include common

local m = load_meta(KEYS[1])
redis.call('SREM', KEYS[4], ARGV[1])
if not m then
  return {'absent'}
end
if redis.call('SCARD', KEYS[4]) > 0 then
  return {'kept'}
end
if m.deleted or is_expired(m, now_ms()) then
  drop_stream(m)
  return {'deleted', m.src or ''}
end
set_key_expiry(m)
return {'kept'}

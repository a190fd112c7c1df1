-- sub_unlink: remove one link type of a stream from a subscription; the
-- stream stays linked while another type remains (a glob link survives the
-- removal of the explicit one).
--
-- Input:
--   KEYS[1..6] def, links, acked, tails, state, pending of the subscription
--   ARGV[1] stream path   ARGV[2] link type to remove: 'e' or 'g'
--
-- Output: {'ok', remaining types ('' = unlinked)} | {'missing'}

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing'}
end
local types = redis.call('HGET', KEYS[2], ARGV[1])
if not types then
  return {'ok', ''}
end
local left = string.gsub(types, ARGV[2], '')
if left == '' then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('SREM', KEYS[6], ARGV[1])
else
  redis.call('HSET', KEYS[2], ARGV[1], left)
end
return {'ok', left}

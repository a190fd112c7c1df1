-- sub_link: link streams to a subscription. A new link starts at the given
-- offset (the stream's tail: no replay); an existing one keeps its cursor and
-- only gains the link type.
--
-- Input:
--   KEYS[1..6] def, links, acked, tails, state, pending of the subscription
--   ARGV[1] link type: 'e' (explicit) or 'g' (glob)
--   ARGV[2..] triples: stream path, starting offset, the stream's tail now
--
-- Output: 'ok' | 'missing' (no such subscription)

-- @include common
-- @include sub_common

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'missing'
end
local kind = ARGV[1]
for i = 2, #ARGV - 2, 3 do
  local path, start, tail = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local types = redis.call('HGET', KEYS[2], path)
  if not types then
    redis.call('HSET', KEYS[2], path, kind)
    redis.call('HSET', KEYS[3], path, start)
  elseif not string.find(types, kind, 1, true) then
    local both = (types .. kind == 'ge') and 'eg' or (types .. kind)
    redis.call('HSET', KEYS[2], path, both)
  end
  local known = redis.call('HGET', KEYS[4], path)
  if not known or bytes_lt(known, tail) then
    redis.call('HSET', KEYS[4], path, tail)
  end
  mark(path)
end
return 'ok'

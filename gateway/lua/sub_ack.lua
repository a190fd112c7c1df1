-- sub_ack: a webhook callback or a pull-wake ack, fenced: the token's and the
-- request's generation and wake id must all be the current wake's. Applies the
-- acks (all or none), extends the lease; with done, ends the wake and issues
-- the next one if work is still pending.
--
-- Input:
--   KEYS[1..6] def, links, acked, tails, state, pending of the subscription
--   ARGV[1] required type ('pull-wake' for ack) or '' (callback: any)
--   ARGV[2] token generation   ARGV[3] token wake id
--   ARGV[4] request generation ARGV[5] request wake id
--   ARGV[6] '1' when done
--   ARGV[7] a fresh wake id (for the next wake)   ARGV[8] delivery takeover ms
--   ARGV[9..] triples: stream path, acked offset, the stream's tail now
--
-- Output:
--   {'ok', next_wake ('1'|''), next due}                   applied
--   {'woke', generation, wake id, type, stream, next due}  applied, done, and a next wake to deliver
--   {'missing'} | {'wrong_type'} | {'fenced'}
--   {'invalid_offset', message}

-- @include common
-- @include sub_common

local def, refused = load_def(ARGV[1])
if not def then
  return refused
end
local now = now_ms()
if fenced(now, def, ARGV[2], ARGV[3], ARGV[4], ARGV[5]) then
  return {'fenced'}
end
for i = 9, #ARGV - 2, 3 do
  local path, offset, tail = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local acked = redis.call('HGET', KEYS[3], path)
  if not acked then
    return {'invalid_offset', 'ack names a stream this subscription does not link: ' .. path}
  end
  if offset == '-1' then
    return {'invalid_offset', 'ack offset must not be -1'}
  end
  if bytes_lt(offset, acked) then
    return {'invalid_offset', 'ack offset is below the acked cursor of ' .. path}
  end
  local known = redis.call('HGET', KEYS[4], path) or ''
  if bytes_lt(known, tail) then
    known = tail
  end
  if bytes_lt(known, offset) then
    return {'invalid_offset', 'ack offset is beyond the tail of ' .. path}
  end
end
for i = 9, #ARGV - 2, 3 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  local known = redis.call('HGET', KEYS[4], ARGV[i])
  if not known or bytes_lt(known, ARGV[i + 2]) then
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 2])
  end
  mark(ARGV[i])
end
if ARGV[6] ~= '1' then
  -- A heartbeat: the lease runs again from now.
  redis.call('HSET', KEYS[5], 'lease', int_str(now + tonumber(def.ttl)))
  return {'ok', '', next_due(hash(KEYS[5]))}
end
return end_wake(now, def, ARGV[7], tonumber(ARGV[8])) or {'ok', '', next_due(hash(KEYS[5]))}

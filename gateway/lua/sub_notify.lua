-- sub_notify: a linked stream has new data (the dispatcher saw it in its
-- shard's wake queue). Records the tail and issues a wake when the
-- subscription is idle and has pending work. Idempotent: a repeat with the
-- same tail changes nothing.
--
-- Input:
--   KEYS[1..6] def, links, acked, tails, state, pending of the subscription
--   ARGV[1] a fresh wake id (used only if a wake is issued)
--   ARGV[2] ms another replica waits before taking over the delivery
--   ARGV[3], ARGV[4] stream path, its tail offset
--
-- Output:
--   {'woke', generation, wake id, type, stream that woke it, next due}   deliver it now
--   {'ok', next due}              recorded, nothing to deliver (a wake is in flight, or no work)
--   {'unlinked', pattern, wake stream}   the stream is not linked (the caller links a pattern match)
--   {'gone'}                      no such subscription

-- @include common
-- @include sub_common

local def = hash(KEYS[1])
if not def.type then
  return {'gone'}
end
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
  return {'unlinked', def.pattern or '', def.wake_stream or ''}
end
local now = now_ms()
raise_tails(3)
expire_lease(now, hash(KEYS[5]))
local trig = try_wake(now, ARGV[1], tonumber(ARGV[2]))
local st = hash(KEYS[5])
if trig then
  return {'woke', st.gen, st.wake, def.type, trig, next_due(st)}
end
return {'ok', next_due(st)}

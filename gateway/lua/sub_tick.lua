-- sub_tick: what a replica does when a subscription's timer falls due (or
-- the recovery sweep passes): expire a lease that ran out (and wake again if
-- work is pending), and take over a delivery that is due (a retry, or one
-- whose first sender died).
--
-- Input:
--   KEYS[1..6] def, links, acked, tails, state, pending of the subscription
--   ARGV[1] a fresh wake id (used only if a wake is issued)
--   ARGV[2] ms another replica waits before taking over this delivery in turn
--
-- Output:
--   {'deliver', generation, wake id, type, stream that woke it, next due, expired ('1'|'')}
--   {'idle', next due, expired ('1'|'')}
--   {'gone'}

-- @include common
-- @include sub_common

local def = hash(KEYS[1])
if not def.type then
  return {'gone'}
end
local now = now_ms()
local claim_ms = tonumber(ARGV[2])
local expired = expire_lease(now, hash(KEYS[5])) and '1' or ''
if try_wake(now, ARGV[1], claim_ms) then
  local st = hash(KEYS[5])
  return {'deliver', st.gen, st.wake, def.type, st.trig, next_due(st), expired}
end
local st = hash(KEYS[5])
if (st.wake or '') ~= '' and (st.due or '') ~= '' and now >= tonumber(st.due) then
  redis.call('HSET', KEYS[5], 'due', int_str(now + claim_ms))
  st.due = int_str(now + claim_ms)
  return {'deliver', st.gen, st.wake, def.type, st.trig, next_due(st), expired}
end
return {'idle', next_due(st), expired}

-- sub_claim: a pull-wake worker claims the subscription's current wake (one
-- is issued if work is pending and none is in flight) and takes the lease.
--
-- Input:
--   KEYS[1..6] def, links, acked, tails, state, pending of the subscription
--   ARGV[1] worker name   ARGV[2] a fresh wake id (used only if a wake is issued)
--   ARGV[3..] pairs: linked stream path, its tail now (refreshes the known tails)
--
-- Output:
--   {'ok', generation, wake id, lease ttl ms, lease end}   claimed
--   {'claimed', current holder, generation}                another worker holds the lease
--   {'no_work'} | {'missing'} | {'wrong_type'}

-- @include common
-- @include sub_common

local def, refused = load_def('pull-wake')
if not def then
  return refused
end
local now = now_ms()
raise_tails(3)
local st = hash(KEYS[5])
expire_lease(now, st)
st = hash(KEYS[5])
if (st.holder or '') ~= '' then
  return {'claimed', st.holder, st.gen}
end
local lease = int_str(now + tonumber(def.ttl))
if (st.wake or '') == '' then
  -- No takeover delay: the wake is claimed in this same step, nothing to deliver
  -- (and its snapshot, just taken, is what is pending now).
  if not try_wake(now, ARGV[2], 0) then
    return {'no_work'}
  end
  st = hash(KEYS[5])
else
  -- A wake issued earlier: it names what is pending now (the claim answer lists
  -- it), not only what was then, so a worker sees every stream it may ack with
  -- done (at most WAKE_STREAMS_MAX; the next wake names the rest).
  local _, snap, more = pending()
  redis.call('HSET', KEYS[5], 'snap', cjson.encode(snap), 'more', more and '1' or '')
end
redis.call('HSET', KEYS[5], 'holder', ARGV[1], 'lease', lease, 'due', '')
return {'ok', st.gen, st.wake, def.ttl, lease}

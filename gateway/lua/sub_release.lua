-- sub_release: a pull-wake worker gives its claim back without acking
-- (fenced like sub_ack); if work is pending a new wake is issued at once.
--
-- Input:
--   KEYS[1..6] def, links, acked, tails, state, pending of the subscription
--   ARGV[1] token generation   ARGV[2] token wake id
--   ARGV[3] request generation ARGV[4] request wake id
--   ARGV[5] a fresh wake id    ARGV[6] delivery takeover ms
--
-- Output:
--   {'ok', next due} | {'woke', generation, wake id, type, stream, next due}
--   {'missing'} | {'wrong_type'} | {'fenced'}

-- @include common
-- @include sub_common

local def, refused = load_def('pull-wake')
if not def then
  return refused
end
local now = now_ms()
if fenced(now, def, ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then
  return {'fenced'}
end
return end_wake(now, def, ARGV[5], tonumber(ARGV[6])) or {'ok', next_due(hash(KEYS[5]))}

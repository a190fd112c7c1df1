-- sub_delivered: the outcome of one delivery attempt of a wake (webhook POST
-- or wake event append). Ignored when the wake is no longer current.
--
-- Input:
--   KEYS[1..6] def, links, acked, tails, state, pending of the subscription
--   ARGV[1] wake id delivered
--   ARGV[2] 'sent' (delivered; the receiver calls back later), 'done' (the
--           webhook answered {"done": true}: ack the wake's snapshot, release),
--           or 'failed' (retry later)
--   ARGV[3] jitter factor for a retry, in [-0.2, 0.2]
--   ARGV[4] a fresh wake id (after 'done', if work is still pending)
--   ARGV[5] ms another replica waits before taking over that next delivery
--   ARGV[6] '1' when 'done' acks only the streams ARGV[7..] (those the webhook
--           body listed: a body lists at most what fits, see wakebody.py), ''
--           for the whole snapshot
--   ARGV[7..] stream paths
--
-- Output:
--   {'stale'}                          the wake is over (fenced, expired, deleted)
--   {'ok', next due, retry delay ms}   recorded
--   {'woke', generation, wake id, type, stream that woke it, next due}   after 'done': deliver this now

-- @include common
-- @include sub_common

local def = hash(KEYS[1])
local st = hash(KEYS[5])
if not def.type or (st.wake or '') ~= ARGV[1] then
  return {'stale'}
end
local now = now_ms()
local outcome = ARGV[2]
if outcome == 'failed' then
  local retries = (tonumber(st.retries) or 0) + 1
  local base = math.min(1000 * 2 ^ (retries - 1), 60000)
  local delay = math.floor(base * (1 + tonumber(ARGV[3])))
  redis.call('HSET', KEYS[5], 'retries', retries, 'status', 'failed', 'due', int_str(now + delay))
  st.due = int_str(now + delay)
  return {'ok', next_due(st), int_str(delay)}
end
redis.call('HSET', KEYS[5], 'retries', '0', 'status', 'active', 'due', '')
st.due = ''
if def.type == 'webhook' and outcome == 'sent' then
  -- The receiver has the whole lease from now to call back.
  st.lease = int_str(now + tonumber(def.ttl))
  redis.call('HSET', KEYS[5], 'lease', st.lease)
end
if outcome ~= 'done' then
  return {'ok', next_due(st), '0'}
end
local snap = cjson.decode(st.snap or '{}')
if ARGV[6] == '1' then
  local listed = {}
  for i = 7, #ARGV do
    listed[ARGV[i]] = snap[ARGV[i]]
  end
  snap = listed
end
for path, tail in pairs(snap) do
  local acked = redis.call('HGET', KEYS[3], path)
  if acked and bytes_lt(acked, tail) then
    redis.call('HSET', KEYS[3], path, tail)
    mark(path)
  end
end
return end_wake(now, def, ARGV[4], tonumber(ARGV[5])) or {'ok', next_due(hash(KEYS[5])), '0'}

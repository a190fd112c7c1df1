-- ratelimit: the per-credential limits of gateway/ratelimit.py, shared by every
-- gateway replica. Appends: a counter per one-second window (fixed window,
-- started by the first append). Live connections: a sorted set of connection
-- ids scored by the end of their lease, so a replica that dies without
-- releasing its connections leaks them only until their leases end.
--
-- Input:
--   KEYS[1]  the counter (op 'append') or the connection set ('acquire', 'release')
--   ARGV[1]  op: 'append' | 'acquire' | 'release'
--   ARGV[2]  the limit (appends per second, or concurrent connections)
--   ARGV[3]  'acquire'/'release': connection id
--   ARGV[4]  'acquire': lease length in ms (longer than the connection can live)
--
-- Output:
--   0          allowed (or released)
--   n > 0      refused: retry in n ms

redis.replicate_commands()

local op = ARGV[1]
local limit = tonumber(ARGV[2])

if op == 'append' then
  local count = redis.call('INCR', KEYS[1])
  if count == 1 then
    redis.call('PEXPIRE', KEYS[1], 1000)
  end
  if count <= limit then
    return 0
  end
  local left = redis.call('PTTL', KEYS[1])
  if left < 0 then
    -- A counter without expiry (it should not happen): give it one.
    redis.call('PEXPIRE', KEYS[1], 1000)
    left = 1000
  end
  return math.max(left, 1)
end

if op == 'release' then
  redis.call('ZREM', KEYS[1], ARGV[3])
  return 0
end

-- acquire
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if redis.call('ZCARD', KEYS[1]) >= limit then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  -- Retry once the earliest lease ends, at most a second from now: a
  -- connection usually closes long before its lease runs out.
  return math.max(1, math.min(1000, tonumber(first[2]) - now))
end
local lease_end = now + tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], string.format('%.0f', lease_end), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return 0

-- sub_timers_done: drop a subscription's timer entry after a tick found
-- nothing left to schedule, unless a transition re-armed it meanwhile (its
-- score is then no longer the one sub_timers_take gave it).
--
-- Input:
--   KEYS[1] dssubs:timers (ZSET id -> due ms)
--   ARGV[1] subscription id   ARGV[2] the score sub_timers_take gave it
--
-- Output: 1 if removed, else 0

if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0

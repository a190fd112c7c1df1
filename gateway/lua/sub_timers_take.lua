-- sub_timers_take: claim the subscriptions whose timer is due. Claiming
-- re-scores (never removes): if the claiming replica dies, the entry falls
-- due again after `visibility` and another replica takes it.
--
-- Input:
--   KEYS[1] dssubs:timers (ZSET id -> due ms)
--   ARGV[1] now (ms)   ARGV[2] visibility (ms)   ARGV[3] most ids to take
--
-- Output: the ids taken

local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], string.format('%.0f', until_ms), id)
end
return ids

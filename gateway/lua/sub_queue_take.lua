-- sub_queue_take: claim the streams of one shard's wake queue that have new
-- data for their subscriptions. Claiming re-scores to now + visibility: an
-- append in the meantime re-scores to its own time (ZADD in append.lua), so
-- sub_queue_done will not remove it, and a dispatcher that dies leaves its
-- streams to fall due again.
--
-- Input:
--   KEYS[1] dswake:{shard} (ZSET stream name -> ms)
--   ARGV[1] now (ms)   ARGV[2] visibility (ms)   ARGV[3] most streams to take
--
-- Output: flat {name, claimed score, ...}

local names = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local score = string.format('%.0f', tonumber(ARGV[1]) + tonumber(ARGV[2]))
local out = {}
for _, name in ipairs(names) do
  redis.call('ZADD', KEYS[1], score, name)
  table.insert(out, name)
  table.insert(out, score)
end
return out

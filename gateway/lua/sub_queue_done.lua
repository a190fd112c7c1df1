-- sub_queue_done: the dispatcher told every subscription of these streams;
-- remove each from the wake queue unless an append re-scored it since.
--
-- Input:
--   KEYS[1] dswake:{shard}
--   ARGV pairs: stream name, the score sub_queue_take gave it
--
-- Output: how many were removed

local n = 0
for i = 1, #ARGV - 1, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n

-- sub_create: create a subscription, or confirm an identical one (same
-- configuration hash).
--
-- Input:
--   KEYS[1..6] def, links, acked, tails, state, pending of the subscription (see sub_common)
--   ARGV[1] configuration hash   ARGV[2] type ('webhook' | 'pull-wake')
--   ARGV[3] pattern or ''        ARGV[4] webhook url or ''   ARGV[5] wake stream or ''
--   ARGV[6] lease ttl ms         ARGV[7] description or '' ARGV[8] '1' when a description was given
--   ARGV[9] the configuration as JSON (what GET shows)
--
-- Output:
--   {'created', created_ms}   new subscription (no links yet: the caller links its streams)
--   {'exists', created_ms}    identical subscription already there
--   {'conflict'}              same id, different configuration

-- @include common
-- @include sub_common

local have = redis.call('HMGET', KEYS[1], 'hash', 'created')
if have[1] then
  if have[1] == ARGV[1] then
    return {'exists', have[2]}
  end
  return {'conflict'}
end
local now = now_ms()
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'type', ARGV[2], 'pattern', ARGV[3], 'url', ARGV[4],
  'wake_stream', ARGV[5], 'ttl', ARGV[6], 'desc', ARGV[7], 'has_desc', ARGV[8], 'config', ARGV[9],
  'created', int_str(now))
redis.call('HSET', KEYS[5], 'gen', '0', 'wake', '', 'holder', '', 'lease', '', 'due', '', 'snap', '{}',
  'trig', '', 'retries', '0', 'status', 'active', 'expiries', '0', 'pidx', PENDING_INDEX)
return {'created', int_str(now)}

-- sub_delete: remove a subscription and all its state. In-flight callbacks,
-- acks and releases find nothing and fail; no cursor moves after this.
--
-- Input:  KEYS[1..6] def, links, acked, tails, state, pending of the subscription
-- Output: the link paths it had (the caller unlinks them from their streams)

local paths = redis.call('HKEYS', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
return paths

-- Shared helpers of the subscription scripts (sub_*.lua), pasted in front by
-- gateway/scripts.py after common.lua. Every one of them takes the keys of one subscription
-- (one slot: they share its hash tag, see gateway/keys.py):
--   KEYS[1] def (HASH)    type, pattern, url, wake_stream, ttl (lease ms), desc, hash, created (ms)
--   KEYS[2] links (HASH)  stream path -> 'e', 'g' or 'eg' (explicit, glob)
--   KEYS[3] acked (HASH)  stream path -> acked offset (inclusive; '-1' before the first entry)
--   KEYS[4] tails (HASH)  stream path -> newest tail offset the gateways saw
--   KEYS[5] state (HASH)  gen (generation), wake (current wake id, '' none), holder (pull-wake
--                         worker), lease (lease end, ms), due (delivery due at, ms: the webhook
--                         POST or the wake event still to send), trig (stream that woke it),
--                         snap (JSON path -> tail: the pending streams the wake names, at most
--                         WAKE_STREAMS_MAX), more ('1': more were pending than it names),
--                         retries, status, expiries, pidx (version of KEYS[6]'s index)
--   KEYS[6] pending (SET) the linked streams whose tail is past their acked cursor
-- Offsets are fixed-width strings: byte order is offset order.
--
-- Why KEYS[6]: a pattern subscription may link millions of streams, and every
-- notify, ack and wake used to walk all of them. Each script that moves a
-- cursor, a tail or a link updates that stream's membership (mark), so a wake
-- costs O(the streams it names), whatever the number of links.

-- Needs common.lua pasted first (int_str, now_ms, bytes_le, load_meta).

local function bytes_lt(a, b)
  return not bytes_le(b, a)
end

local function hash(key)
  return load_meta(key) or {}
end

-- A wake names at most this many pending streams; the others stay pending
-- and the next wake (at once, when this one ends) names them.
local WAKE_STREAMS_MAX = 1000
-- The version of KEYS[6]'s index: a subscription created before it existed
-- (or by another version) has it built from its links once, on first use.
local PENDING_INDEX = '1'

-- Keep KEYS[6] in step with one stream: pending while linked (a linked stream
-- always has a cursor) with a known tail past that cursor.
local function mark(path)
  local acked = redis.call('HGET', KEYS[3], path)
  local tail = redis.call('HGET', KEYS[4], path)
  if acked and tail and bytes_lt(acked, tail) then
    redis.call('SADD', KEYS[6], path)
  else
    redis.call('SREM', KEYS[6], path)
  end
end

local function ensure_pending_index()
  if redis.call('HGET', KEYS[5], 'pidx') == PENDING_INDEX then
    return
  end
  redis.call('DEL', KEYS[6])
  for _, path in ipairs(redis.call('HKEYS', KEYS[2])) do
    mark(path)
  end
  redis.call('HSET', KEYS[5], 'pidx', PENDING_INDEX)
end

-- Record tails the caller saw (ARGV pairs path, tail from `first`), only forward.
local function raise_tails(first)
  for i = first, #ARGV - 1, 2 do
    local path, tail = ARGV[i], ARGV[i + 1]
    if redis.call('HEXISTS', KEYS[2], path) == 1 then
      local known = redis.call('HGET', KEYS[4], path)
      if not known or bytes_lt(known, tail) then
        redis.call('HSET', KEYS[4], path, tail)
        mark(path)
      end
    end
  end
end

-- Up to WAKE_STREAMS_MAX pending streams: the first of them, their tails
-- (path -> tail), and whether more are pending. Members found not pending
-- after all are dropped from the index on the way.
local function pending()
  ensure_pending_index()
  local first = nil
  local snap = {}
  local named = 0
  -- A sample of only stale members (left by another version) is dropped and
  -- another taken, so stale ones cannot hide pending ones from a wake.
  repeat
    local sample = redis.call('SRANDMEMBER', KEYS[6], WAKE_STREAMS_MAX)
    if #sample == 0 then
      break
    end
    table.sort(sample)
    local acked = redis.call('HMGET', KEYS[3], unpack(sample))
    local tails = redis.call('HMGET', KEYS[4], unpack(sample))
    for i, path in ipairs(sample) do
      if acked[i] and tails[i] and bytes_lt(acked[i], tails[i]) then
        snap[path] = tails[i]
        first = first or path
        named = named + 1
      else
        redis.call('SREM', KEYS[6], path)
      end
    end
  until first
  return first, snap, first ~= nil and redis.call('SCARD', KEYS[6]) > named
end

-- When a replica must look at this subscription next ('' = only the sweep).
local function next_due(st)
  local due = ''
  for _, v in ipairs({st.lease or '', st.due or ''}) do
    if v ~= '' and (due == '' or tonumber(v) < tonumber(due)) then
      due = v
    end
  end
  return due
end

local function clear_wake()
  redis.call('HSET', KEYS[5], 'wake', '', 'holder', '', 'lease', '', 'due', '', 'snap', '{}', 'more', '',
    'trig', '')
end

-- A new wake when work is pending and none is in flight: a new generation and
-- wake id. The caller delivers it at once (webhook POST or wake event); `due`
-- is when another replica takes the delivery over should the caller die.
-- Returns the stream that woke it, or nil.
local function try_wake(now, wake_id, claim_ms)
  local st = hash(KEYS[5])
  if (st.wake or '') ~= '' or (st.holder or '') ~= '' then
    return nil
  end
  local first, snap, more = pending()
  if not first then
    return nil
  end
  local def = hash(KEYS[1])
  local gen = (tonumber(st.gen) or 0) + 1
  local fields = {'gen', int_str(gen), 'wake', wake_id, 'trig', first, 'snap', cjson.encode(snap),
    'more', more and '1' or '', 'due', int_str(now + claim_ms), 'holder', '', 'lease', ''}
  if def.type == 'webhook' then
    fields[#fields] = int_str(now + tonumber(def.ttl))
  end
  redis.call('HSET', KEYS[5], unpack(fields))
  return first
end

-- Lease over: clear the holder and the wake (their tokens are fenced from now
-- on). A webhook wake whose delivery is still being retried keeps its lease
-- running only once delivered: the retry schedule decides when it is sent.
local function expire_lease(now, st)
  if (st.lease or '') == '' or now < tonumber(st.lease) then
    return false
  end
  if (st.due or '') ~= '' and (st.holder or '') == '' and hash(KEYS[1]).type == 'webhook' then
    return false
  end
  clear_wake()
  redis.call('HINCRBY', KEYS[5], 'expiries', 1)
  return true
end

-- The definition, or nil and the reply refusing the request: no such
-- subscription, or not of the required type ('' = any).
local function load_def(required_type)
  local def = hash(KEYS[1])
  if not def.type then
    return nil, {'missing'}
  end
  if required_type ~= '' and def.type ~= required_type then
    return nil, {'wrong_type'}
  end
  return def, nil
end

-- Fencing (PROTOCOL.md 7.3): the token's and the request's generation and
-- wake id must be the current wake's (a pull-wake wake must also be claimed).
-- An expired lease is expired first, so its holder is fenced.
local function fenced(now, def, token_gen, token_wake, req_gen, req_wake)
  local st = hash(KEYS[5])
  if expire_lease(now, st) then
    return true
  end
  local gen = st.gen or '0'
  if (st.wake or '') == '' or token_gen ~= gen or req_gen ~= gen or token_wake ~= st.wake
      or req_wake ~= st.wake then
    return true
  end
  return def.type == 'pull-wake' and (st.holder or '') == ''
end

-- After a wake ended: issue the next one if work is pending; the reply.
local function end_wake(now, def, wake_id, claim_ms)
  clear_wake()
  if try_wake(now, wake_id, claim_ms) then
    local st = hash(KEYS[5])
    return {'woke', st.gen, st.wake, def.type, st.trig, next_due(st)}
  end
  return nil
end

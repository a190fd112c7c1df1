-- Shared helpers, pasted in front of every script by gateway/scripts.py.
--
-- Every script takes the keys of one stream, in this order (one slot: they
-- share the shard's hash tag):
--   KEYS[1] meta (HASH)   KEYS[2] data (STREAM)   KEYS[3] producers (HASH)
--   KEYS[4] forks (SET)   KEYS[5] the shard's sync feed (STREAM)
--   KEYS[6] tombstone (STRING): last entry ID of a removed stream of this name
--   KEYS[7] the shard's fork deadlines (ZSET): fork name -> when it expires (ms)
--   KEYS[8] subscription ids linked to the stream (SET)   KEYS[9] the shard's wake queue (ZSET)
--
-- Meta fields: name (the stream's name), sink ('1': appends go to the sync
-- feed), ct (content type as sent), mt (media type: lowercased, no
-- parameters), json ('1' for JSON mode), tail (last entry ID, '0-0' when
-- empty), closed ('1'), cby (closing producer "id\nepoch\nseq"), sseq (last
-- Stream-Seq), srcseq (last source sequence of the Postgres
-- source worker), ttl (seconds), exp (Expires-At, ms), exp_raw (as sent), atime
-- (last access, ms), gen (random token, changes when the path is recreated),
-- deleted ('1' = soft-deleted, kept for forks), src/fofs/fsub (fork source,
-- fork offset as entry ID, sub-offset as sent), bytes (payload bytes appended).
-- Tiered history (workers/tiering.py, gateway/lua/trim.lua; issue 11):
--   tier   '1': every append goes to the sync feed with the messages' lengths
--          ('lens'), and the sink copies each entry to Postgres stream_history;
--          set at creation when DSGW_RETAIN_MESSAGES or DSGW_RETAIN_SECONDS is on
--   synced entry ID of the newest entry committed to Postgres (set by the sink
--          right after its commit, only ever raised)
--   trim   entry ID of the newest entry removed from the data stream; absent =
--          nothing trimmed. Every entry <= trim is gone from Redis and is in
--          stream_history; trim <= synced, and trim always ends an append
--   base   entry ID below which this incarnation of the stream has no entries
--          (above the tombstone, the fork offset and its creation time): rows of
--          a removed stream of the same name in stream_history are all <= base

-- Redis 6.2 needs effect replication before a script may write after TIME;
-- on 7.x this is always on and the call is a no-op.
redis.replicate_commands()

-- Lua's tostring() switches to exponent form above 1e14 and our integers
-- (producer epochs and seqs, timestamps) reach 2^53.
local function int_str(n)
  return string.format('%.0f', n)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function load_meta(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then
    return nil
  end
  local m = {}
  for i = 1, #flat, 2 do
    m[flat[i]] = flat[i + 1]
  end
  return m
end

-- Byte-wise a <= b. Lua's own comparison follows the server's collation
-- locale, which would put 'B' after 'a'.
local function bytes_le(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a <= #b
end

-- An entry ID as a fixed-width string, so IDs compare exactly beyond 2^53.
local function id_key(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return string.rep('0', 20 - #ms) .. ms .. string.rep('0', 20 - #seq) .. seq
end

local function is_expired(m, now)
  if m.ttl and now >= tonumber(m.atime) + tonumber(m.ttl) * 1000 then
    return true
  end
  if m.exp and now >= tonumber(m.exp) then
    return true
  end
  return false
end

-- Redis-level expiry is only garbage collection for streams nobody touches
-- again (expiry itself is checked lazily on every access). A stream that
-- forks read through is kept until its last fork goes.
local GC_GRACE_MS = 60000
local function set_key_expiry(m)
  if not (m.ttl or m.exp) then
    return
  end
  local deadline
  if m.ttl then
    deadline = tonumber(m.atime) + tonumber(m.ttl) * 1000
  end
  if m.exp and (not deadline or tonumber(m.exp) < deadline) then
    deadline = tonumber(m.exp)
  end
  if m.src then
    -- Forks are never left to Redis expiry: their removal must release their
    -- source's reference, which only an access does. The gateways' fork
    -- sweeper (gateway/sweeper.py) makes that access once the deadline passes.
    redis.call('ZADD', KEYS[7], int_str(deadline), m.name)
    return
  end
  if redis.call('SCARD', KEYS[4]) > 0 then
    return
  end
  for i = 1, 3 do
    redis.call('PEXPIREAT', KEYS[i], int_str(deadline + GC_GRACE_MS))
  end
end

-- Remove a stream, leaving its last entry ID behind for a while: a stream
-- created again under the same name starts above it, so a name's offsets
-- (and the sink's (stream_name, ds_offset) rows) never repeat, even when the
-- new stream's first append lands in the same millisecond as the old last one.
local TOMBSTONE_MS = 600000
local function drop_stream(m)
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  if m.src then
    redis.call('ZREM', KEYS[7], m.name)
  end
  if m.tail and m.tail ~= '0-0' then
    redis.call('SET', KEYS[6], m.tail, 'PX', TOMBSTONE_MS)
  end
end

-- A sliding TTL restarts on every read and write (never on HEAD).
local function touch(m, now)
  if m.ttl then
    m.atime = int_str(now)
    redis.call('HSET', KEYS[1], 'atime', m.atime)
  end
  set_key_expiry(m)
end

-- The stream's state: 'absent', 'expired' (just removed; m tells the caller
-- which fork source to release), 'gone' (soft-deleted) or 'live', plus meta.
local function stream_state(now)
  local m = load_meta(KEYS[1])
  if not m then
    return 'absent', nil
  end
  if m.deleted then
    return 'gone', m
  end
  if is_expired(m, now) then
    if redis.call('SCARD', KEYS[4]) > 0 then
      -- Forks still read through it: keep the data, refuse direct access.
      redis.call('HSET', KEYS[1], 'deleted', '1')
      return 'gone', m
    end
    drop_stream(m)
    return 'expired', m
  end
  return 'live', m
end

-- Append message groups from ARGV starting at pos: a group count, then per
-- group its message count and the messages. One group is one append: every
-- message but the group's last carries 'more' = how many follow, so readers
-- never cut an append in two. A stream synced to Postgres also gets one sync
-- feed entry per append: its name, the entry IDs, and the messages as one JSON
-- array (messages are JSON texts, so joining them with commas is valid JSON).
-- A tiered stream (meta 'tier') sends every append to the feed: see below.
-- Returns the last entry ID (or nil) and the payload bytes added (the caller
-- adds them to meta 'bytes' in its own HSET: one write command less).
local function add_groups(m, pos)
  local field = m.json and 'json' or 'data'
  local groups = tonumber(ARGV[pos])
  pos = pos + 1
  local last = nil
  local bytes = 0
  for _ = 1, groups do
    local count = tonumber(ARGV[pos])
    pos = pos + 1
    local ids = {}
    for i = 1, count do
      if i < count then
        last = redis.call('XADD', KEYS[2], '*', field, ARGV[pos + i - 1], 'more', tostring(count - i))
      else
        last = redis.call('XADD', KEYS[2], '*', field, ARGV[pos + i - 1])
      end
      ids[i] = last
      bytes = bytes + #ARGV[pos + i - 1]
    end
    if m.tier and count > 0 then
      -- Tiered: the lengths split the messages again, byte-exact; 'json'
      -- (session_events too) only for a sink stream, else their concatenation.
      local lens = {}
      for i = 1, count do
        lens[i] = #ARGV[pos + i - 1]
      end
      local payload_field, payload = 'data', table.concat(ARGV, '', pos, pos + count - 1)
      if m.sink then
        payload_field, payload = 'json', '[' .. table.concat(ARGV, ',', pos, pos + count - 1) .. ']'
      end
      redis.call('XADD', KEYS[5], '*', 'stream', m.name, 'ids', table.concat(ids, ' '),
        payload_field, payload, 'lens', table.concat(lens, ' '))
    elseif m.sink and count > 0 then
      redis.call('XADD', KEYS[5], '*', 'stream', m.name, 'ids', table.concat(ids, ' '),
        'json', '[' .. table.concat(ARGV, ',', pos, pos + count - 1) .. ']')
    end
    pos = pos + count
  end
  return last, bytes
end

-- Idempotent producer check (Kafka-style). Never writes.
-- Returns 'accept' | 'dup', last_seq | 'stale', epoch | 'epoch_seq' | 'gap', expected.
local function check_producer(pid, epoch_s, seq_s)
  local epoch, seq = tonumber(epoch_s), tonumber(seq_s)
  local state = redis.call('HGET', KEYS[3], pid)
  if not state then
    if seq ~= 0 then
      return 'gap', '0'
    end
    return 'accept'
  end
  local e, s = string.match(state, '^(%d+) (%d+)')
  local cur_epoch, cur_seq = tonumber(e), tonumber(s)
  if epoch < cur_epoch then
    return 'stale', e
  end
  if epoch > cur_epoch then
    if seq ~= 0 then
      return 'epoch_seq'
    end
    return 'accept'
  end
  if seq <= cur_seq then
    return 'dup', s
  end
  if seq == cur_seq + 1 then
    return 'accept'
  end
  return 'gap', int_str(cur_seq + 1)
end

-- Producer state is bounded per stream: when a new producer makes more than
-- `max_producers`, the others idle for more than `idle_ms` go, and the least
-- recently active ones until 90% of the cap is left (O(n), once per 10% of
-- the cap). A forgotten producer starts over: its next append must be seq 0.
local function save_producer(pid, epoch_s, seq_s, now, max_producers, idle_ms)
  local added = redis.call('HSET', KEYS[3], pid, epoch_s .. ' ' .. seq_s .. ' ' .. int_str(now))
  if added == 0 or max_producers <= 0 or redis.call('HLEN', KEYS[3]) <= max_producers then
    return
  end
  local flat = redis.call('HGETALL', KEYS[3])
  local others = {}
  for i = 1, #flat, 2 do
    if flat[i] ~= pid then
      others[#others + 1] = {flat[i], tonumber(string.match(flat[i + 1], ' (%d+)$')) or 0}
    end
  end
  table.sort(others, function(a, b) return a[2] < b[2] end)
  local excess = #others + 1 - math.floor(max_producers * 0.9)
  local victims = {}
  for i = 1, #others do
    if i <= excess or now - others[i][2] > idle_ms then
      victims[#victims + 1] = others[i][1]
    end
  end
  for i = 1, #victims, 1000 do
    redis.call('HDEL', KEYS[3], unpack(victims, i, math.min(i + 999, #victims)))
  end
end


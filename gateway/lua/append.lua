-- append: add one append (one or more messages) to a stream, optionally
-- closing it, with closure, content-type, producer and Stream-Seq checks, all
-- in one atomic step. A refused append changes nothing.
--
-- Input:
--   KEYS[1..7] meta, data, producers, forks, shard feed, tombstone of the stream,
--              fork deadlines of its shard
--   KEYS[8..9] subscription links of the stream (SET), the shard's wake queue (ZSET);
--              a queued wake is also published (ARGV[7]) on 'ds:' .. KEYS[9]
--              (keys.wake_channel) with the stream's name
--   ARGV[1] media type of the request (lowercased, no parameters)
--   ARGV[2] '1' to close the stream with this append, else ''
--   ARGV[3] Stream-Seq, or ''
--   ARGV[4] Producer-Id, or '' (then ARGV[5], ARGV[6] are ignored)
--   ARGV[5] Producer-Epoch (decimal, <= 2^53-1)
--   ARGV[6] Producer-Seq (decimal, <= 2^53-1)
--   ARGV[7] publish command: 'PUBLISH' or 'SPUBLISH'
--   ARGV[8] notification channel: gets the new tail, and for a small append
--           that does not close the stream also what a reader at the old tail
--           would read (see notification below)
--   ARGV[9] source sequence of the Postgres source worker, or '': compared
--           byte-wise with the stream's last one (meta 'srcseq'); never set
--           from HTTP, so no client can make the worker skip its changes
--   ARGV[10] most producers kept per stream (see save_producer), 0 for no cap
--   ARGV[11] producers idle this many ms may be forgotten once the cap is reached
--   ARGV[12..] message groups (see add_groups): '1', count, messages...
--
-- Output: an array whose first element says what happened
--   {'ok', tail, closed}                   appended (closed = '1' or '')
--   {'dup', tail, last_seq, closed}        producer duplicate, nothing written
--   {'closed_dup', tail, seq}              retry of the append that closed the stream
--   {'closed', tail}                       stream is closed
--   {'absent'} | {'expired', src} | {'gone'}
--   {'ct_mismatch', stream content type} | {'stale', epoch} | {'epoch_seq'} | {'gap', expected}
--   {'seq_conflict'}                       Stream-Seq not above the last one
--   {'source_dup', srcseq}                 source sequence not above the stream's last one

-- @include common

-- Appends up to this many payload bytes travel with their notification.
local PUSH_MAX_BYTES = 4096

-- The notification of an append: "tail", or for a small append that leaves the
-- stream open "tail\nprevious tail\ngen\ncount\nbody", where body is what a
-- read after the previous tail returns (JSON messages joined with ',', other
-- payloads concatenated). Readers waiting at the previous tail answer from it
-- without reading the stream again (gateway/live.py, gateway/reads.py).
local function notification(m, tail, added, closing)
  if closing or added > PUSH_MAX_BYTES then
    return tail
  end
  local pos = 12
  local parts, count = {}, 0
  for _ = 1, tonumber(ARGV[pos]) do
    local n = tonumber(ARGV[pos + 1])
    for i = 1, n do
      count = count + 1
      parts[count] = ARGV[pos + 1 + i]
    end
    pos = pos + 1 + n
  end
  return table.concat({tail, m.tail, m.gen or '', tostring(count), table.concat(parts, m.json and ',' or '')}, '\n')
end

local now = now_ms()
local state, m = stream_state(now)
if state ~= 'live' then
  return {state, m and m.src or ''}
end

local pid, epoch, seq = ARGV[4], ARGV[5], ARGV[6]
if m.closed then
  if pid ~= '' and m.cby == pid .. '\n' .. epoch .. '\n' .. seq then
    return {'closed_dup', m.tail, seq}
  end
  return {'closed', m.tail}
end

if m.mt ~= ARGV[1] then
  return {'ct_mismatch', m.ct}
end

if pid ~= '' then
  local verdict, detail = check_producer(pid, epoch, seq)
  if verdict == 'dup' then
    return {'dup', m.tail, detail, ''}
  elseif verdict ~= 'accept' then
    return {verdict, detail or ''}
  end
end

local stream_seq = ARGV[3]
if stream_seq ~= '' and m.sseq and bytes_le(stream_seq, m.sseq) then
  return {'seq_conflict'}
end

local source_seq = ARGV[9]
if source_seq ~= '' and m.srcseq and bytes_le(source_seq, m.srcseq) then
  return {'source_dup', m.srcseq}
end

local last, added = add_groups(m, 12)
local tail = last or m.tail
local fields = {'tail', tail, 'bytes', int_str((tonumber(m.bytes) or 0) + added)}
if stream_seq ~= '' then
  table.insert(fields, 'sseq')
  table.insert(fields, stream_seq)
end
if source_seq ~= '' then
  table.insert(fields, 'srcseq')
  table.insert(fields, source_seq)
end
local closed = ''
if ARGV[2] == '1' then
  closed = '1'
  table.insert(fields, 'closed')
  table.insert(fields, '1')
  if pid ~= '' then
    table.insert(fields, 'cby')
    table.insert(fields, pid .. '\n' .. epoch .. '\n' .. seq)
  end
end
redis.call('HSET', KEYS[1], unpack(fields))
if pid ~= '' then
  save_producer(pid, epoch, seq, now, tonumber(ARGV[10]), tonumber(ARGV[11]))
end
touch(m, now)
-- Subscriptions: a linked stream queues its wake atomically with the append
-- (one EXISTS for the others); gateway/subscriptions/dispatch.py drains the queue,
-- at once when it hears the shard's wake channel (only linked streams publish there).
if last and redis.call('EXISTS', KEYS[8]) == 1 then
  redis.call('ZADD', KEYS[9], now, m.name)
  redis.call(ARGV[7], 'ds:' .. KEYS[9], m.name)
end
redis.call(ARGV[7], ARGV[8], notification(m, tail, added, closed == '1'))
return {'ok', tail, closed}

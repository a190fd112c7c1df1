-- close: close a stream without appending (POST with an empty body and
-- Stream-Closed: true). Repeats answer as success; with producer headers the
-- close is sequenced like an append, so a retry is recognised.
--
-- Input:
--   KEYS[1..7] meta, data, producers, forks, shard feed, tombstone of the stream,
--              fork deadlines of its shard
--   ARGV[1] Producer-Id, or '' (then ARGV[2], ARGV[3] are ignored)
--   ARGV[2] Producer-Epoch
--   ARGV[3] Producer-Seq
--   ARGV[4] publish command: 'PUBLISH' or 'SPUBLISH'
--   ARGV[5] notification channel
--   ARGV[6] most producers kept per stream (see save_producer), 0 for no cap
--   ARGV[7] producers idle this many ms may be forgotten once the cap is reached
--
-- Output:
--   {'ok', tail}                    closed now, or was already closed (no producer)
--   {'closed_dup', tail, seq}       retry of the producer close that closed it
--   {'dup', tail, last_seq, closed} producer duplicate, nothing written
--   {'closed', tail}                closed earlier by another producer tuple
--   {'absent'} | {'expired', src} | {'gone'}
--   {'stale', epoch} | {'epoch_seq'} | {'gap', expected}

-- @include common

local now = now_ms()
local state, m = stream_state(now)
if state ~= 'live' then
  return {state, m and m.src or ''}
end

local pid, epoch, seq = ARGV[1], ARGV[2], ARGV[3]
if m.closed then
  if pid == '' then
    touch(m, now)
    return {'ok', m.tail}
  end
  if m.cby == pid .. '\n' .. epoch .. '\n' .. seq then
    touch(m, now)
    return {'closed_dup', m.tail, seq}
  end
  return {'closed', m.tail}
end

if pid ~= '' then
  local verdict, detail = check_producer(pid, epoch, seq)
  if verdict == 'dup' then
    return {'dup', m.tail, detail, ''}
  elseif verdict ~= 'accept' then
    return {verdict, detail or ''}
  end
  save_producer(pid, epoch, seq, now, tonumber(ARGV[6]), tonumber(ARGV[7]))
  redis.call('HSET', KEYS[1], 'closed', '1', 'cby', pid .. '\n' .. epoch .. '\n' .. seq)
else
  redis.call('HSET', KEYS[1], 'closed', '1')
end
touch(m, now)
redis.call(ARGV[4], ARGV[5], m.tail)
return {'ok', m.tail}

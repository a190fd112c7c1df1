-- read_range: a slice of one data stream as one response body (see collect),
-- with no state checks: a fork reading the data it inherited from a source
-- (the caller checked the fork itself with read.lua).
--
-- Input:
--   KEYS[1] the data stream (of a source along a fork's chain)
--   KEYS[2] that stream's meta (same stream, same slot): its `trim` and `base`
--   ARGV[1] read entries with IDs above this one ('ms-seq')
--   ARGV[2] up to and including this entry ID, or '+'
--   ARGV[3] stop after the append that brings the body to this many bytes
--   ARGV[4] ... or after this many entries
--   ARGV[5] '1' for JSON (payloads joined with ','), '' to concatenate
--
-- Output:
--   {'hot', body, last_id, count}   last_id '' and count 0 when the slice is empty
--   {'cold', trim, base}            ARGV[1] lies below meta `trim`: the caller reads
--                                   from Postgres up to trim (and ARGV[2])

-- @include common
-- @include collect

local trim, base = unpack(redis.call('HMGET', KEYS[2], 'trim', 'base'))
if trim and not bytes_le(id_key(trim), id_key(ARGV[1])) then
  return {'cold', trim, base or '0-0'}
end
local body, last, count = collect(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
  ARGV[5] == '1' and ',' or '')
return {'hot', body, last, count}

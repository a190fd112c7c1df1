-- read_range: a slice of one data stream as one response body (see collect),
-- with no state checks: a fork reading the data it inherited from a source
-- (the caller checked the fork itself with read.lua).
--
-- Input:
--   KEYS[1] the data stream (of a source along a fork's chain)
--   ARGV[1] read entries with IDs above this one ('ms-seq')
--   ARGV[2] up to and including this entry ID, or '+'
--   ARGV[3] stop after the append that brings the body to this many bytes
--   ARGV[4] ... or after this many entries
--   ARGV[5] '1' for JSON (payloads joined with ','), '' to concatenate
--
-- Output:
--   {body, last_id, count}   last_id '' and count 0 when the slice is empty

-- @include collect

local body, last, count = collect(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
  ARGV[5] == '1' and ',' or '')
return {body, last, count}

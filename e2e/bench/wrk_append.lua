-- wrk script for the load generator cross-check of `make bench` (scenario a):
-- POST ~100-byte JSON objects round-robin over N existing streams.
--   wrk -t1 -c64 -d10s -s wrk_append.lua http://HOST:PORT -- PREFIX N BODY_BYTES
-- Streams PREFIX-0 .. PREFIX-(N-1) must exist (application/json).

local prefix, streams, body_bytes
local counter = 0
local headers = { ["content-type"] = "application/json" }

function init(args)
  prefix = args[1]
  streams = tonumber(args[2])
  body_bytes = tonumber(args[3])
end

function request()
  local w = counter % streams
  local body = string.format('{"type":"bench","w":%d,"s":%d,"pad":""}', w, counter)
  local pad = string.rep("x", math.max(0, body_bytes - #body))
  body = string.format('{"type":"bench","w":%d,"s":%d,"pad":"%s"}', w, counter, pad)
  counter = counter + 1
  return wrk.format("POST", "/v1/stream/" .. prefix .. "-" .. w, headers, body)
end

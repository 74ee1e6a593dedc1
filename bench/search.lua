-- wrk script: POST /search with raw float32 vectors read from BODIES (one DIM*4-byte body after another), the
-- thread's requests cycling through them; at the end one JSON line of the latency percentiles (ms).
local path = os.getenv("BODIES")
local size = tonumber(os.getenv("BODY_BYTES"))
local bodies = {}
local f = assert(io.open(path, "rb"))
local data = f:read("*a")
f:close()
for start = 1, #data, size do
  bodies[#bodies + 1] = data:sub(start, start + size - 1)
end
local headers = {["Content-Type"] = "application/octet-stream"}
local next_body = 0

request = function()
  next_body = next_body % #bodies + 1
  return wrk.format("POST", "/search", headers, bodies[next_body])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, ' ..
    '"errors": %d, "non_2xx": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, e.connect + e.read + e.write + e.timeout, e.status))
end

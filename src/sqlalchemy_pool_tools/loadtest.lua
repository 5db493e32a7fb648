-- wrk script for `sqlalchemy-pool loadtest`.
--
-- Parameters come from the environment because wrk decides whether a script paces requests
-- (has a `delay` function) before `init(args)` runs:
--   SQLAPOOL_PATHS     request paths separated by newlines, used round-robin (default: URL path)
--   SQLAPOOL_DELAY_MS  pause per connection between requests, for an approximate --rate
--
-- `done` prints one machine-readable line starting with SQLAPOOL_RESULT; latencies are in
-- microseconds. Non-2xx responses are counted here because wrk itself only counts >= 400.

local paths = {}
for p in string.gmatch(os.getenv("SQLAPOOL_PATHS") or "", "[^\n]+") do
  paths[#paths + 1] = p
end

local delay_ms = tonumber(os.getenv("SQLAPOOL_DELAY_MS") or "0") or 0
if delay_ms > 0 then
  -- Jitter (0.5x .. 1.5x) so connections do not fire in synchronised bursts.
  function delay()
    return math.floor(delay_ms * (0.5 + math.random()))
  end
end

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
  thread:set("thread_no", #threads)
end

function init(args)
  math.randomseed(os.time() + (thread_no or 0))
  if #paths == 0 then
    paths[1] = wrk.path
  end
  -- Start each thread on a different path so a short run still mixes them.
  counter = thread_no or 0
  non2xx = 0
end

function request()
  counter = counter + 1
  return wrk.format(nil, paths[(counter % #paths) + 1])
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local non2xx_total = 0
  for _, thread in ipairs(threads) do
    non2xx_total = non2xx_total + (tonumber(thread:get("non2xx")) or 0)
  end
  local e = summary.errors
  io.write(string.format(
    "SQLAPOOL_RESULT requests=%d duration_us=%d connect=%d read=%d write=%d status=%d"
      .. " timeout=%d non2xx=%d p50=%d p95=%d p99=%d max=%d mean=%.1f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    non2xx_total, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean
  ))
end

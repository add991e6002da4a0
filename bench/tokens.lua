-- wrk script of bench/run.py: GET a random seeded user's token, then one JSON line of figures.
-- BENCH_PATH (e.g. /v1/tokens/dev/user-), BENCH_USERS and BENCH_API_KEY come from the environment.
local prefix = os.getenv("BENCH_PATH")
local users = tonumber(os.getenv("BENCH_USERS"))
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_API_KEY")

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("seed", os.time() * 100 + threads)
end

function init(args)
  math.randomseed(seed)
end

function request()
  return wrk.format("GET", prefix .. math.random(0, users - 1))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end

-- wrk script of the fairgate load harness (benches/load/run.sh): every request carries an
-- `x-api-key` header, rotating over KEYS distinct client keys (default 100000), so a policy
-- keyed by API key sees a realistic key space. All contenders get the same script, so the load
-- generator does the same work whatever is measured.
--
-- Arguments (after `--`): REJECT_PERCENT KEYS
--   REJECT_PERCENT: this share of requests (in tens of percent, i.e. 0 or 30) comes from 1,000
--   abusive clients with keys named `throttled-NNNNNN`, which the harness's full policy puts on
--   a plan of 1 request per day with a burst of 20: once a key has spent its burst (the
--   harness's warm-up sees to that), every further request of it is answered 429.
--
-- The requests are formatted once in `init`; `request` only indexes a table, which keeps the
-- per-request cost of the Lua hook small.

local reqs = {}
local n = 0
local i = 0

function init(args)
  local reject_percent = tonumber(args[1] or "0") or 0
  local keys = tonumber(args[2] or "100000") or 100000
  local reject_tenths = math.floor(reject_percent / 10)
  for j = 1, keys do
    local key
    if (j % 10) < reject_tenths then
      key = string.format("throttled-%06d", j % 1000)
    else
      key = string.format("k-%06d", j)
    end
    reqs[j] = wrk.format("GET", "/", { ["x-api-key"] = key })
  end
  n = keys
  -- Each wrk thread starts at its own offset so that threads do not send the same key at once.
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8), 16) or 0))
  i = math.random(n) - 1
end

function request()
  i = i + 1
  if i > n then
    i = 1
  end
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d connect_err=%d read_err=%d write_err=%d timeout_err=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end

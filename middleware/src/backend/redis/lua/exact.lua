
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local n = tonumber(ARGV[1])
local limit = tonumber(ARGV[2 + 3 * n])
local leases = KEYS[n + 1]
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
  if redis.call('ZCARD', leases) >= limit then return {2} end
end
local tats = {}
for i = 1, n do
  local T = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i + 1])
  if T < 0 then
    -- A calendar period's count: C is the quota, -T the ms to the period's end.
    local quota = tonumber(ARGV[3 * i])
    local count = tonumber(redis.call('GET', KEYS[i]) or 0)
    if not count then return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' does not hold a number') end
    if count + cost > quota then
      return {0, i, -T * 1000, count}
    end
    tats[i] = count + cost
  else
    T = T / 1000
    local C = tonumber(ARGV[3 * i]) / 1000
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    if not tat then return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' does not hold a number') end
    if tat < now then tat = now end
    local new = tat + cost * T
    if new - now > C then
      return {0, i, math.ceil(new - C - now), math.floor(tat - now)}
    end
    tats[i] = new
  end
end
for i = 1, n do
  local T = tonumber(ARGV[3 * i - 1])
  if T < 0 then
    redis.call('SET', KEYS[i], tostring(tats[i]), 'PX', -T + 1000)
  else
    redis.call('SET', KEYS[i], tostring(tats[i]), 'PX', math.ceil((tats[i] - now) / 1000) + 1000)
  end
end
if limit > 0 then
  local ttl = tonumber(ARGV[4 + 3 * n])
  redis.call('ZADD', leases, now_ms + ttl, ARGV[3 + 3 * n])
  redis.call('PEXPIRE', leases, ttl * 2)
end
return {1}

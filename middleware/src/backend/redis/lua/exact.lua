
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
  local T = tonumber(ARGV[3 * i - 1]) / 1000
  local C = tonumber(ARGV[3 * i]) / 1000
  local cost = tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if not tat then return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' does not hold a number') end
  if tat < now then tat = now end
  local new = tat + cost * T
  if new - now > C then
    return {0, i, math.ceil(new - C - now), math.floor(tat - now)}
  end
  tats[i] = new
end
for i = 1, n do
  redis.call('SET', KEYS[i], tostring(tats[i]), 'PX', math.ceil((tats[i] - now) / 1000) + 1000)
end
if limit > 0 then
  local ttl = tonumber(ARGV[4 + 3 * n])
  redis.call('ZADD', leases, now_ms + ttl, ARGV[3 + 3 * n])
  redis.call('PEXPIRE', leases, ttl * 2)
end
return {1}


local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local units = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local T = tonumber(ARGV[1 + i])
  if T < 0 then
    -- A calendar period's count; -T is the ms to the period's end. Answers the count.
    local count = tonumber(redis.call('GET', KEYS[i]) or 0)
    if not count then return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' does not hold a number') end
    if units > 0 then
      count = count + units
      redis.call('SET', KEYS[i], tostring(count), 'PX', -T + 1000)
    end
    out[i] = count
  else
    T = T / 1000
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    if not tat then return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' does not hold a number') end
    if tat < now then tat = now end
    if units > 0 then
      tat = tat + units * T
      redis.call('SET', KEYS[i], tostring(tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
    end
    out[i] = math.floor(tat - now)
  end
end
return out

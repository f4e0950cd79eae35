
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local a, k = 1, 1
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  local units = tonumber(ARGV[a + 1])
  local tats = {}
  local bad = false
  for i = 1, n do
    local ok, v = pcall(redis.call, 'GET', KEYS[k + i - 1])
    local tat = nil
    if ok then
      -- A calendar period's count (T < 0) starts from 0, a TAT from now.
      if tonumber(ARGV[a + 1 + i]) < 0 then tat = tonumber(v or 0) else tat = tonumber(v or now) end
    end
    if not tat then bad = true end
    tats[i] = tat
  end
  if bad then
    out[#out + 1] = 1
    for i = 1, n do out[#out + 1] = 0 end
  else
    out[#out + 1] = 0
    for i = 1, n do
      local T = tonumber(ARGV[a + 1 + i])
      local tat = tats[i]
      if T < 0 then
        -- A calendar period's count; -T is the ms to the period's end. Answers the count.
        if units > 0 then
          tat = tat + units
          redis.call('SET', KEYS[k + i - 1], tostring(tat), 'PX', -T + 1000)
        end
        out[#out + 1] = tat
      else
        T = T / 1000
        if tat < now then tat = now end
        if units > 0 then
          tat = tat + units * T
          redis.call('SET', KEYS[k + i - 1], tostring(tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
        end
        out[#out + 1] = math.floor(tat - now)
      end
    end
  end
  a = a + 2 + n
  k = k + n
end
return out

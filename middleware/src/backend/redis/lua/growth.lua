
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'steps', 'rises', 'win', 'count', 'shed')
local steps = tonumber(h[1]) or 0
if ARGV[1] == 'reset' then
  redis.call('DEL', KEYS[1])
  return {steps, -1}
end
local n = tonumber(ARGV[1])
local w = tonumber(ARGV[2])
local threshold = tonumber(ARGV[3])
local tmax = tonumber(ARGV[4])
local max_steps = tonumber(ARGV[5])
local rise_steps = tonumber(ARGV[6])
local within = tonumber(ARGV[7])
local shed = tonumber(ARGV[8])
local rises = {}
if h[2] and h[2] ~= '' then
  for r in string.gmatch(h[2], '[^,]+') do
    local v = tonumber(r)
    if v and v > now - within then
      table.insert(rises, v)
    end
  end
end
local win = math.floor(now / w)
local cwin = tonumber(h[3]) or -1
local count = tonumber(h[4]) or 0
local shedwin = tonumber(h[5]) or -1
local stepped = -1
if cwin ~= win then
  if cwin == win - 1 and shedwin ~= cwin then
    local usage = count * tmax / (w * 1000000)
    if usage + 1e-9 >= threshold and steps < max_steps and #rises < rise_steps then
      steps = steps + 1
      table.insert(rises, now)
      stepped = math.floor(usage * 1000000)
    end
  end
  cwin = win
  count = 0
end
count = count + n
if shed == 1 then
  shedwin = win
end
redis.call('HSET', KEYS[1], 'steps', steps, 'rises', table.concat(rises, ','), 'win', cwin,
  'count', count, 'shed', shedwin)
if steps > 0 then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], w * 2)
end
return {steps, stepped}

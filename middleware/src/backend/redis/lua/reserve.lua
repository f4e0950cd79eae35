local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1]) / 1000
local C = tonumber(ARGV[2]) / 1000
local limit = tonumber(ARGV[3]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if not tat then return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' does not hold a number') end
if tat < now then tat = now end
local new = tat + T
local wait = new - C - now
if wait < 0 then wait = 0 end
if wait > limit then return {0, math.ceil(wait)} end
redis.call('SET', KEYS[1], tostring(new), 'PX', math.ceil((new - now) / 1000) + 1000)
return {1, math.ceil(wait)}

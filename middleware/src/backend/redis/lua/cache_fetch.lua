local v = redis.call('GET', KEYS[1])
if v then return {1, v, redis.call('PTTL', KEYS[1])} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {2} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {3} end
return {0, redis.call('PTTL', KEYS[2])}

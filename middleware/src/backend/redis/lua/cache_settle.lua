if ARGV[2] == 'stored' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
elseif ARGV[2] == 'pass' then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return redis.call('PUBLISH', ARGV[5], ARGV[2])

-- Take a lock if it is free, or confirm we hold it already (this call, retried by redis-py
-- after its reply was lost). KEYS[1] lock; ARGV[1] owner token; ARGV[2] ttl ms.
-- Returns 1 when the lock is ours, else minus the milliseconds the holder's lock has left.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 1
end
return -math.max(redis.call('PTTL', KEYS[1]), 0)

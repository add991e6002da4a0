-- lock_acquire.lua, and the grant's record read in the same step once the lock is ours (the
-- read a holder must make after taking the lock, one round trip sooner).
-- KEYS[1] lock; KEYS[2] grant hash (one hash tag: one Redis Cluster slot); ARGV as lock_acquire.
-- Returns {1, v, blob} when the lock is ours (false where absent), else {minus the ms left}.
local ours = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  or redis.call('GET', KEYS[1]) == ARGV[1]
if ours then
  local record = redis.call('HMGET', KEYS[2], 'v', 'blob')
  return {1, record[1], record[2]}
end
return {-math.max(redis.call('PTTL', KEYS[1]), 0)}

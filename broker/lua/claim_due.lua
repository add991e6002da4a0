-- Claim up to ARGV[3] grants due by ARGV[1] from one provider's schedule, atomically pushing
-- each to ARGV[2] (a lease): if the claimer dies, the grant is due again when the lease ends.
-- KEYS[1] schedule sorted set. Returns the claimed members.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], member)
end
return due

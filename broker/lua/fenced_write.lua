-- Write a grant record only if it is still at the version the writer read (0 = absent).
-- KEYS[1] grant hash; ARGV[1] expected version; ARGV[2] new version; ARGV[3] encrypted record.
local current = redis.call('HGET', KEYS[1], 'v')
if (current or '0') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'blob', ARGV[3])
return 1

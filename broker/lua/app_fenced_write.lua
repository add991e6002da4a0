-- Write an app token record (broker/app_store.py) only if it is still at the version the writer
-- read (0 = absent): fenced_write.lua without grant events.
-- KEYS[1] record hash; ARGV[1] expected version; ARGV[2] new version; ARGV[3] encrypted record
-- (unique per write: a fresh nonce); ARGV[4] next refresh time ('' none); ARGV[5] state.
-- Returns 1 written, 2 already written by this very call (redis-py retried it after its reply
-- was lost), 0 the record is at another version.
local current = redis.call('HGET', KEYS[1], 'v')
if current == ARGV[2] and redis.call('HGET', KEYS[1], 'blob') == ARGV[3] then
  return 2
end
if (current or '0') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'blob', ARGV[3], 'due', ARGV[4], 'st', ARGV[5])
return 1

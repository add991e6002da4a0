-- Replace a record's ciphertext by its re-encryption only if the record is still, byte for
-- byte, the one that was read: a compare-and-set on the ciphertext itself. Any writer that
-- changed the record meanwhile wrote newer data (already under the primary key): it is kept.
-- The version and every other field stay as they are, so the fences of writers in flight
-- (a refresh holding the version it read) still hold.
-- KEYS[1] the record's key; ARGV[1] the hash field holding the ciphertext ('' : the key is a
-- string holding it, its expiry kept); ARGV[2] the ciphertext read; ARGV[3] the re-encrypted one.
-- Returns 1 replaced, 0 changed or deleted meanwhile.
local field = ARGV[1]
local current
if field == '' then
  current = redis.call('GET', KEYS[1])
else
  current = redis.call('HGET', KEYS[1], field)
end
if current ~= ARGV[2] then
  return 0
end
if field ~= '' then
  redis.call('HSET', KEYS[1], field, ARGV[3])
  return 1
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[3])
end
return 1

-- Publish a complete count of records per key id, unless a count that started later already
-- was (a long pass must not replace the figures of a newer one, or of a `broker rekey`).
-- KEYS[1] the census hash; ARGV[1] when the count started (unix seconds); ARGV[2..] pairs of
-- key id and count. Returns 1 published, 0 a newer count stands.
local stored = tonumber(redis.call('HGET', KEYS[1], '@started') or '0')
if stored > tonumber(ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '@started', ARGV[1], unpack(ARGV, 2))
return 1

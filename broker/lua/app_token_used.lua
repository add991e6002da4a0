-- Note when an app token was last handed out, on its record only: a record that expired or
-- was never written gets no field-only hash (which nothing would ever expire).
-- KEYS[1] app token record; ARGV[1] the time. Returns 1 if noted.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'used', ARGV[1])
  return 1
end
return 0

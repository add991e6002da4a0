-- Read and delete a key in one step (GETDEL, also on Redis before 6.2): a single-use value.
-- KEYS[1] the key. Returns its value, or false when absent.
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('DEL', KEYS[1])
end
return value

-- Delete a grant and record its grant.deleted event in the same step.
-- KEYS[1] grant hash; KEYS[2] the event stream (absent on a Redis Cluster: the caller appends).
-- ARGV[1] event timestamp; ARGV[2] event data without its state (see fenced_write.lua);
-- ARGV[3] provider; ARGV[4] the stream's approximate maximum length; ARGV[5] the
-- grant-changes channel (every replica's cache drops the grant: grant_cache.py).
-- Returns {1, body} deleted, {0} there was no grant.
local state = redis.call('HGET', KEYS[1], 'st')
if redis.call('DEL', KEYS[1]) == 0 then
  return {0}
end
redis.call('PUBLISH', ARGV[5], KEYS[1])
local body = '{"type":"grant.deleted","timestamp":"' .. ARGV[1] .. '","data":' .. ARGV[2]
  .. ',"state":"' .. (state or 'active') .. '"}}'
if KEYS[2] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
    'type', 'grant.deleted', 'provider', ARGV[3], 'body', body)
end
return {1, body}

-- Write a grant record only if it is still at the version the writer read (0 = absent).
-- KEYS[1] grant hash; KEYS[2] its lock; KEYS[3] the event stream; KEYS[4..7] the grant's index
-- entries: its provider's schedule (shard), refresh_failing and reauth_required sets, refresh-token
-- expiry index (KEYS[3..7] absent on a Redis Cluster: the caller appends the event and indexes).
-- ARGV[1] expected version; ARGV[2] new version; ARGV[3] encrypted record (unique per write: a
-- fresh nonce); ARGV[4] next refresh time ('' none); ARGV[5] state; ARGV[6] created time;
-- ARGV[7] event timestamp; ARGV[8] event data without its state ('{"provider":..,"user_id":..,
-- "last_error":..'); ARGV[9] provider; ARGV[10] the stream's approximate maximum length;
-- ARGV[11] the grant-changes channel (every replica's cache drops the grant: grant_cache.py);
-- ARGV[12] the refresh token's expiry ('' none), in clear for the reconciler like 'due';
-- ARGV[13] the writer's lock token ('' none): the lock, if still held with it, is released once
-- the record is written (in this step: never before the write, so never without it).
-- ARGV[14] the grant's member in the indexes; ARGV[15] its schedule score ('' = not scheduled);
-- ARGV[16] its refresh token's expiry in the expiry index ('' = not there). The indexes are
-- updated with every landed write, so never without it (ScheduleIndex.index_args).
-- Returns {1, event type, event body} written ('' type: the state did not change), {2} already
-- written by this very call (redis-py retried it after its reply was lost; its event was
-- appended then), {0} the record is at another version.
local current = redis.call('HGET', KEYS[1], 'v')
local function index()
  if not KEYS[4] then
    return
  end
  local m = ARGV[14]
  if ARGV[15] == '' then
    redis.call('ZREM', KEYS[4], m)
  else
    redis.call('ZADD', KEYS[4], ARGV[15], m)
  end
  redis.call(ARGV[5] == 'refresh_failing' and 'SADD' or 'SREM', KEYS[5], m)
  redis.call(ARGV[5] == 'reauth_required' and 'SADD' or 'SREM', KEYS[6], m)
  if ARGV[16] == '' then
    redis.call('ZREM', KEYS[7], m)
  else
    redis.call('ZADD', KEYS[7], ARGV[16], m)
  end
end
local function unlock()
  if ARGV[13] ~= '' and redis.call('GET', KEYS[2]) == ARGV[13] then
    redis.call('DEL', KEYS[2])
  end
end
if current == ARGV[2] and redis.call('HGET', KEYS[1], 'blob') == ARGV[3] then
  index()
  unlock()
  return {2}
end
if (current or '0') ~= ARGV[1] then
  return {0}
end
local old = redis.call('HMGET', KEYS[1], 'st', 'c')
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'blob', ARGV[3], 'due', ARGV[4], 'st', ARGV[5],
  'c', ARGV[6], 'rx', ARGV[12])
redis.call('PUBLISH', ARGV[11], KEYS[1])
index()
unlock()
-- The event is decided here, where both states are known, whichever code path wrote.
local new, event = ARGV[5], ''
if not current or (old[2] and old[2] ~= ARGV[6]) then
  event = 'grant.connected'  -- a new grant, or one replaced by a new authorization or import
elseif old[1] ~= new then
  if new == 'active' then
    event = old[1] == 'refresh_failing' and 'grant.recovered' or 'grant.connected'
  else
    event = 'grant.' .. new
  end
end
if event == '' then
  return {1, ''}
end
local body = '{"type":"' .. event .. '","timestamp":"' .. ARGV[7] .. '","data":' .. ARGV[8]
  .. ',"state":"' .. new .. '"}}'
if KEYS[3] then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], '*',
    'type', event, 'provider', ARGV[9], 'body', body)
end
return {1, event, body}

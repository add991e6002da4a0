-- Check a batch of grants against their indexes and repair what differs, in one step: what
-- the record says and what the indexes hold are read at one instant, so a repair can never
-- undo a newer write's own index update. One server only: on a Redis Cluster the keys of one
-- batch are in many slots, and the reconciler checks grant by grant there.
-- KEYS: five per grant: its hash, its schedule shard, the refresh_failing and the
-- reauth_required set and the refresh-token expiry index of its provider. ARGV: each grant's
-- schedule member.
-- Returns a flat list of pairs {grant number (1-based), what}: 'schedule', 'refresh_failing',
-- 'reauth_required' or 'refresh_token_expiry' for a repair made; 'legacy' for a record without
-- its index fields in clear (written by an old version: the caller decrypts it). A record
-- written before 'rx' was kept in clear has its expiry index left as it is.
local out = {}
for i = 1, #ARGV do
  local grant, schedule, expiry = KEYS[5 * i - 4], KEYS[5 * i - 3], KEYS[5 * i]
  local m = ARGV[i]
  local fields = redis.call('HMGET', grant, 'v', 'due', 'st', 'rx')
  if fields[1] and not fields[3] then
    out[#out + 1] = i
    out[#out + 1] = 'legacy'
  elseif fields[1] then
    local due, state = fields[2], fields[3]
    if state ~= 'reauth_required' and due and due ~= '' and not redis.call('ZSCORE', schedule, m) then
      redis.call('ZADD', schedule, 'NX', due, m)
      out[#out + 1] = i
      out[#out + 1] = 'schedule'
    end
    for j, set_state in ipairs({'refresh_failing', 'reauth_required'}) do
      local set = KEYS[5 * i - 3 + j]
      local member = redis.call('SISMEMBER', set, m) == 1
      if member ~= (state == set_state) then
        redis.call(state == set_state and 'SADD' or 'SREM', set, m)
        out[#out + 1] = i
        out[#out + 1] = set_state
      end
    end
    local rx = fields[4]
    if rx then
      local wanted = state ~= 'reauth_required' and rx ~= ''
      local held = redis.call('ZSCORE', expiry, m)
      if wanted and not held then
        redis.call('ZADD', expiry, 'NX', rx, m)
      elseif held and not wanted then
        redis.call('ZREM', expiry, m)
      end
      if wanted ~= (held ~= false) then
        out[#out + 1] = i
        out[#out + 1] = 'refresh_token_expiry'
      end
    end
  end
end
return out

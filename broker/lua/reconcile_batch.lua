-- Check a batch of grants against their indexes and repair what differs, in one step: what
-- the record says and what the indexes hold are read at one instant, so a repair can never
-- undo a newer write's own index update. One server only: on a Redis Cluster the keys of one
-- batch are in many slots, and the reconciler checks grant by grant there.
-- KEYS: four per grant: its hash, its schedule shard, the refresh_failing and the
-- reauth_required set of its provider. ARGV: each grant's schedule member.
-- Returns a flat list of pairs {grant number (1-based), what}: 'schedule', 'refresh_failing'
-- or 'reauth_required' for a repair made; 'legacy' for a record without its index fields in
-- clear (written by an old version: the caller decrypts it).
local out = {}
for i = 1, #ARGV do
  local grant, schedule = KEYS[4 * i - 3], KEYS[4 * i - 2]
  local m = ARGV[i]
  local fields = redis.call('HMGET', grant, 'v', 'due', 'st')
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
      local set = KEYS[4 * i - 2 + j]
      local member = redis.call('SISMEMBER', set, m) == 1
      if member ~= (state == set_state) then
        redis.call(state == set_state and 'SADD' or 'SREM', set, m)
        out[#out + 1] = i
        out[#out + 1] = set_state
      end
    end
  end
end
return out

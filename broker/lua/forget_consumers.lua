-- Delete the consumers of a group that hold no pending entry and have not been seen for a
-- while: each process is a consumer of its own, so every restart leaves one behind. Checked and
-- deleted in one step, so a consumer that comes back between the two cannot lose an entry.
-- KEYS[1] the stream; ARGV[1] the group; ARGV[2] the caller's own consumer (kept); ARGV[3]
-- milliseconds unseen. Returns how many were deleted.
local deleted = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do
    info[consumer[i]] = consumer[i + 1]
  end
  -- 'inactive' (Redis 7.2+) counts from the last successful read; 'idle' from any attempt
  local unseen = math.min(info['idle'], info['inactive'] or info['idle'])
  if info['name'] ~= ARGV[2] and info['pending'] == 0 and unseen >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    deleted = deleted + 1
  end
end
return deleted

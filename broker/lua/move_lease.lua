-- Move a claim (renew it, hand it back, or drop it) only if the schedule still holds our lease
-- (a write may have rescheduled it). KEYS[1] schedule; ARGV[1] member; ARGV[2] our lease
-- score; ARGV[3] new score, or '' to remove the member.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  if ARGV[3] == '' then
    redis.call('ZREM', KEYS[1], ARGV[1])
  else
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  end
  return 1
end
return 0

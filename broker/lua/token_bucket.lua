-- One client's token bucket, shared by every replica: refill, then take one token.
-- KEYS[1] bucket hash {tokens, ms}; ARGV[1] requests per second, ARGV[2] burst.
-- Redis's own clock, so replicas with skewed clocks share one bucket fairly.
-- Returns {1, "0"} when allowed, {0, "<seconds until a token>"} when not (strings: Lua
-- numbers become integers in replies).
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ms')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = burst
  last = now
end
tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ms', tostring(now))
-- a full bucket is the same as no bucket: let an idle one expire
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}

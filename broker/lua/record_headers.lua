-- The header of each record (format byte, key id length, key id): what the key census counts,
-- without sending whole ciphertexts back. One server only (the keys are in many slots).
-- KEYS: the records' keys; ARGV[1]: the hash field holding the ciphertext ('' for a string
-- key). A key deleted since the scan gives false (nil).
local out = {}
for i, key in ipairs(KEYS) do
  local blob
  if ARGV[1] == '' then
    blob = redis.call('GET', key)
  else
    blob = redis.call('HGET', key, ARGV[1])
  end
  if blob and #blob >= 2 then
    blob = string.sub(blob, 1, 2 + string.byte(blob, 2))
  end
  out[i] = blob
end
return out

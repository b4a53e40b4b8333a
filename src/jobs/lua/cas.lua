-- Write a job only if nobody changed it since it was read; a finished job then expires.
-- KEYS[1] the job's key, KEYS[2] its idempotency key ('' for none)
-- ARGV[1] the JSON read, ARGV[2] the JSON to write, ARGV[3] time to live in ms (0: none)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  if KEYS[2] ~= '' then
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end
return 1

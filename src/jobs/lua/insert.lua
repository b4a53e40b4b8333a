-- A new job, unless its idempotency key already names one (then that one is returned).
-- KEYS[1] the job's key, KEYS[2] its idempotency key ('' for none)
-- ARGV[1] the job's id, ARGV[2] its JSON, ARGV[3] the prefix of job keys
if KEYS[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then
    local job = redis.call('GET', ARGV[3] .. existing)
    if job then
      return {0, job}
    end
  end
  redis.call('SET', KEYS[2], ARGV[1])
end
redis.call('SET', KEYS[1], ARGV[2])
return {1, ARGV[2]}

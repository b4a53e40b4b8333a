-- A caller's places among its in-flight requests at a host, counted for the whole fleet:
-- take one (under the cap) or give one back.
-- KEYS: 1 = the caller's places (member = holder id, score = expiry in ms)
-- ARGV: 1 = "take" or "give", 2 = holder id, 3 = cap, 4 = ttl (ms)
-- Returns 1 when a place was taken (or given back), 0 when the cap is reached.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == 'give' then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return 1
end
local ttl = tonumber(ARGV[4])
-- Asked again for a place it holds (its first answer lost): it still holds it.
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  return 1
end
-- Places of holders that never gave them back (a node that died) end with their ttl.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1

-- A node says it is alive; returns how many nodes are.
-- KEYS: 1 = the fleet's node set (member = node id, score = expiry in ms)
-- ARGV: 1 = node id, 2 = ttl (ms), 3 = 1 to also drop the members that expired and keep the
--       set alive (a node does so every few beats: the set lives twice the ttl)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if ARGV[3] == '1' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
end
return redis.call('ZCOUNT', KEYS[1], now + 1, '+inf')

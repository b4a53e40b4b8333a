-- Record limits a node learned from a host's responses and tell every node.
-- KEYS: 1 = learned limits (hash), 2 = leases (hash, see share.lua: the limits are kept
--       there too, as field '~limits' = "interval max_concurrent expiry_us", '-' for none)
-- ARGV: 1 = interval (us, '' = unchanged), 2 = max_concurrent ('' = unchanged), 3 = ttl (ms),
--       4 = channel, 5 = host key
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'interval', ARGV[1]) end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'max_concurrent', ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local held = redis.call('HMGET', KEYS[1], 'interval', 'max_concurrent')
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[3]) * 1000
redis.call('HSET', KEYS[2], '~limits',
  (held[1] or '-') .. ' ' .. (held[2] or '-') .. ' ' .. string.format('%.0f', expiry))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local i = ARGV[1]
if i == '' then i = '-' end
local m = ARGV[2]
if m == '' then m = '-' end
redis.call('PUBLISH', ARGV[4], 'limit ' .. ARGV[5] .. ' ' .. i .. ' ' .. m)
return 1

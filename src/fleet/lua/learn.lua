-- Record limits a node learned from a host's responses and tell every node.
-- KEYS: 1 = learned limits (hash)
-- ARGV: 1 = interval (us, '' = unchanged), 2 = max_concurrent ('' = unchanged), 3 = ttl (ms),
--       4 = channel, 5 = host key
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'interval', ARGV[1]) end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'max_concurrent', ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local i = ARGV[1]
if i == '' then i = '-' end
local m = ARGV[2]
if m == '' then m = '-' end
redis.call('PUBLISH', ARGV[4], 'limit ' .. ARGV[5] .. ' ' .. i .. ' ' .. m)
return 1

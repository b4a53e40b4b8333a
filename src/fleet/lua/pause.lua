-- Pause one host for the fleet and tell every node.
-- KEYS: 1 = TAT (us), 2 = pause end (us), 3 = leases (hash, see share.lua: the pause end is
--       kept there too, as field '~pause', so a node renewing its lease learns of it)
-- ARGV: 1 = pause length (us), 2 = interval (us), 3 = burst, 4 = channel, 5 = host key
-- Never shortens a longer pause. After the pause the first token is due at its end and the
-- rest follow at the pace (no burst). Returns 1 if the pause was started or extended.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local len = tonumber(ARGV[1])
local untl = now + len
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current >= untl then return 0 end
local ttl = math.ceil(len / 1000) + 1000
redis.call('SET', KEYS[2], untl, 'PX', ttl)
redis.call('HSET', KEYS[3], '~pause', string.format('%.0f', untl))
redis.call('PEXPIRE', KEYS[3], math.max(ttl, 3600000))
local interval = tonumber(ARGV[2])
local tat = untl + interval * (tonumber(ARGV[3]) - 1)
redis.call('SET', KEYS[1], tat, 'PX', math.ceil((tat - now) / 1000) + 1000)
redis.call('PUBLISH', ARGV[4], 'pause ' .. ARGV[5] .. ' ' .. len)
return 1

-- Give back tokens a node leased and did not use.
-- KEYS: 1 = TAT (us); ARGV: 1 = tokens, 2 = interval (us)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat <= now then return 0 end
tat = tat - tonumber(ARGV[1]) * tonumber(ARGV[2])
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], tat, 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return 1

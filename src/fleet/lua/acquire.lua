-- Take up to ARGV[3] tokens of one host's shared GCRA bucket, atomically.
-- KEYS: 1 = TAT (theoretical arrival time, us), 2 = pause end (us), 3 = learned limits (hash)
-- ARGV: 1 = interval (us per request, from the node's config), 2 = burst, 3 = tokens wanted
-- Returns {granted, us until the next token is due, interval in force, learned max_concurrent
-- (-1: none), us of pause left}. Time is Redis's own clock, so nodes' clocks never matter.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local learned = redis.call('HMGET', KEYS[3], 'interval', 'max_concurrent')
if learned[1] then interval = tonumber(learned[1]) end
local mc = -1
if learned[2] then mc = tonumber(learned[2]) end
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now then
  return {0, paused - now, interval, mc, paused - now}
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local window = interval * burst
local free = math.floor((now + window - tat) / interval)
local n = math.min(want, free)
if n < 0 then n = 0 end
if n > 0 then
  tat = tat + n * interval
  redis.call('SET', KEYS[1], tat, 'PX', math.ceil((tat - now) / 1000) + 1000)
end
local due = tat + interval - window - now
if due < 0 then due = 0 end
return {n, due, interval, mc, 0}

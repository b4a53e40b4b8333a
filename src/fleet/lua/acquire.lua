-- Take up to ARGV[3] tokens of one host's shared GCRA bucket, atomically.
-- KEYS: 1 = TAT (theoretical arrival time, us), 2 = pause end (us), 3 = learned limits (hash),
--       4 = leases (hash, see share.lua)
-- ARGV: 1 = interval (us per request, from the node's config), 2 = burst, 3 = tokens wanted,
--       4 = node id
-- The bucket holds what the live leases of other nodes leave of the pace.
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
local pace_interval = interval
local leases = redis.call('HGETALL', KEYS[4])
local leased = 0
for i = 1, #leases, 2 do
  if leases[i] ~= ARGV[4] and string.sub(leases[i], 1, 1) ~= '~' then
    local r, e = string.match(leases[i + 1], '^(%S+) %S+ (%S+)$')
    r = tonumber(r)
    e = tonumber(e)
    if r and e and e > now then leased = leased + r end
  end
end
if leased > 0 then
  local unleased = 1000000 / interval - leased
  if unleased < 0.01 * 1000000 / interval then
    -- Every token is leased: ask again in a quarter of a second (or when a lease is given).
    return {0, 250000, pace_interval, mc, 0}
  end
  -- The bucket's burst shrinks with the pace it holds (each lease has its own).
  burst = math.max(1, math.floor(burst * unleased * interval / 1000000))
  interval = math.ceil(1000000 / unleased)
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
return {n, due, pace_interval, mc, 0}

-- A node's lease of a share of one host's pace, renewed ahead of need.
-- KEYS: 1 = leases (hash: node id -> "rate demand expiry"; rate and demand in requests/s,
--       expiry in us on Redis's clock; and '~pause' = pause end (us), '~limits' = "interval
--       max_concurrent expiry" learned by the fleet, written by pause.lua and learn.lua)
-- ARGV: 1 = node id, 2 = the host's pace (requests/s, as the node knows it), 3 = the node's
--       demand (requests/s; 0 gives its share back), 4 = lease length (us), 5 = channel,
--       6 = host key
-- Shares are max-min fair over the live leases' demands. A node never gets more than the
-- other live leases leave free, so the leases' total stays within the pace; a node left well
-- short of its fair share asks the others, on the channel, to renew theirs now.
-- The pace is the learned one when the fleet learned one (as acquire.lua does). Returns strings
-- (rates are fractional): {granted, fair, lease us, rank, live leases, us of pause left,
-- interval in force (us; 0: the node's own), learned max_concurrent (-1: none)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local me = ARGV[1]
local pace = tonumber(ARGV[2])
local demand = tonumber(ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
local held = 0
local demands = {}
local rank = 0
local dead = {}
local had = 0
local paused = 0
local learned_interval = 0
local mc = -1
for i = 1, #all, 2 do
  local node = all[i]
  if node == '~pause' then
    paused = math.max(0, (tonumber(all[i + 1]) or 0) - now)
  elseif node == '~limits' then
    local li, lm, le = string.match(all[i + 1], '^(%S+) (%S+) (%S+)$')
    if tonumber(le) and tonumber(le) > now then
      learned_interval = tonumber(li) or 0
      mc = tonumber(lm) or -1
    end
  elseif node == me then
    had = tonumber(string.match(all[i + 1], '^(%S+) ')) or 0
  else
    local r, d, e = string.match(all[i + 1], '^(%S+) (%S+) (%S+)$')
    r = tonumber(r)
    d = tonumber(d)
    e = tonumber(e)
    if not r or not d or not e or e <= now then
      dead[#dead + 1] = node
    else
      held = held + r
      demands[#demands + 1] = d
      if node < me then rank = rank + 1 end
    end
  end
end
if #dead > 0 then redis.call('HDEL', KEYS[1], unpack(dead)) end
if learned_interval > 0 then pace = 1000000 / learned_interval end
local function answer(granted, fair, lasts, n)
  return {string.format('%.6f', granted), string.format('%.6f', fair), tostring(lasts),
    tostring(rank), tostring(n), string.format('%.0f', paused),
    string.format('%.0f', learned_interval), tostring(mc)}
end
if demand <= 0 or pace <= 0 then
  redis.call('HDEL', KEYS[1], me)
  -- What it held is free: the others may take it now.
  if had > 0 and #demands > 0 then
    redis.call('PUBLISH', ARGV[5], 'share ' .. ARGV[6] .. ' ' .. me)
  end
  return answer(0, 0, 0, #demands)
end
demands[#demands + 1] = demand
table.sort(demands)
local left = pace
local level = math.huge
local n = #demands
for i = 1, n do
  local even = left / (n - i + 1)
  if demands[i] > even then
    level = even
    break
  end
  left = left - demands[i]
end
local fair = math.min(demand, level)
local granted = math.max(0, math.min(fair, pace - held))
local lasts = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], me, string.format('%.6f %.6f %.0f', granted, demand, now + lasts))
-- One node (the first in order) keeps the key alive; a fleet gone leaves nothing behind an
-- hour later (pause.lua and learn.lua keep it at least as long as what they wrote there).
if rank == 0 then redis.call('PEXPIRE', KEYS[1], 3600000) end
if granted < fair * 0.8 then
  redis.call('PUBLISH', ARGV[5], 'share ' .. ARGV[6] .. ' ' .. me)
end
return answer(granted, fair, lasts, n)

-- A host's token budgets, shared by the fleet: each a bucket that holds at most its limit
-- and refills at its limit per minute.
-- KEYS: 1 = the host's buckets (a hash: the level and time of each budget)
-- ARGV: 1 = "take", "adjust" or "lower"; 2..4 = the budgets' limits per minute (tokens,
--       input, output; 0: none); 5..7 = amounts. take: the tokens asked, taken only if every
--       budget holds them; adjust: tokens to take (negative: to give back); lower: what the
--       upstream says is left (-1: nothing said).
-- Returns 0 when done (taken), else (take) the milliseconds until every budget holds them.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local mode = ARGV[1]
local levels = {}
local wait = 0
for k = 1, 3 do
  local limit = tonumber(ARGV[1 + k])
  if limit > 0 then
    local level = tonumber(redis.call('HGET', KEYS[1], 'l' .. k) or limit)
    local at = tonumber(redis.call('HGET', KEYS[1], 't' .. k) or now)
    level = math.min(limit, level + math.max(0, now - at) * limit / 60000)
    levels[k] = level
    local amount = tonumber(ARGV[4 + k])
    if mode == 'take' and level < amount then
      wait = math.max(wait, math.ceil((amount - level) * 60000 / limit))
    end
  end
end
if wait > 0 then
  return wait
end
for k = 1, 3 do
  local level = levels[k]
  if level then
    local limit = tonumber(ARGV[1 + k])
    local amount = tonumber(ARGV[4 + k])
    if mode == 'lower' then
      if amount >= 0 then
        level = math.min(level, amount)
      end
    else
      level = math.min(limit, level - amount)
    end
    redis.call('HSET', KEYS[1], 'l' .. k, tostring(level), 't' .. k, tostring(now))
  end
end
-- Idle for two minutes, every bucket is full again: nothing to keep.
redis.call('PEXPIRE', KEYS[1], 120000)
return 0

-- A host's token budgets, shared by the fleet: each a bucket that holds at most its limit
-- and refills at its limit per minute (in debt by at most a minute's worth).
-- KEYS: 1 = the host's buckets (a hash: the level and time of each budget)
-- ARGV: 1 = "take", "reserve", "adjust" or "lower"; 2..4 = the budgets' limits per minute
--       (tokens, input, output; 0: none); 5..7 = amounts; 8 = for "reserve", the longest
--       wait (ms) a reservation may have.
--   take: the amounts, only if every budget holds them now.
--   reserve: the amounts, if every budget holds them within ARGV[8] ms: the budgets go into
--     debt, and whoever asks next waits behind this request.
--   adjust: take the amounts (negative: give them back).
--   lower: each budget to at most what the upstream says is left (-1: nothing said).
-- Returns 0 when done; for "reserve", the ms until the reserved tokens are there; when
-- "take" or "reserve" took nothing, minus the ms until the amounts would be there.
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
    if (mode == 'take' or mode == 'reserve') and amount > 0 and level < amount then
      wait = math.max(wait, math.ceil((amount - level) * 60000 / limit))
    end
  end
end
if wait > 0 and (mode == 'take' or wait > tonumber(ARGV[8])) then
  return -wait
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
      -- In debt by at most a minute's worth, whatever an answer claims it used.
      level = math.max(-limit, math.min(limit, level - amount))
    end
    redis.call('HSET', KEYS[1], 'l' .. k, tostring(level), 't' .. k, tostring(now))
  end
end
-- Idle for two minutes, every bucket is full again: nothing to keep.
redis.call('PEXPIRE', KEYS[1], 120000)
return wait

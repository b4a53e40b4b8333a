-- A host's token budgets, shared by the fleet: each a bucket that holds at most its limit
-- and refills at its limit per minute (in debt by at most a minute's worth). A request's
-- tokens are counted in every bucket that applies to it: the host's configured budgets and
-- its model's learned ones.
-- KEYS: the buckets (hashes: the level and time of each of three budgets)
-- ARGV: 1 = "take", "reserve", "adjust" or "lower"; 2 = for "reserve", the longest wait (ms)
--       a reservation may have; 3..5 = amounts (tokens, input, output); then for each key,
--       three limits per minute (0: none).
--   take: the amounts, only if every bucket holds them now.
--   reserve: the amounts, if every bucket holds them within ARGV[2] ms: the buckets go into
--     debt, and whoever asks next waits behind this request.
--   adjust: take the amounts (negative: give them back).
--   lower: each bucket to at most what the upstream says is left (-1: nothing said).
-- Returns 0 when done; for "reserve", the ms until the reserved tokens are there; when
-- "take" or "reserve" took nothing, minus the ms until the amounts would be there.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local mode = ARGV[1]
local asking = mode == 'take' or mode == 'reserve'
local levels = {}
local wait = 0
for i = 1, #KEYS do
  levels[i] = {}
  for k = 1, 3 do
    local limit = tonumber(ARGV[5 + (i - 1) * 3 + k])
    if limit > 0 then
      local level = tonumber(redis.call('HGET', KEYS[i], 'l' .. k) or limit)
      local at = tonumber(redis.call('HGET', KEYS[i], 't' .. k) or now)
      level = math.min(limit, level + math.max(0, now - at) * limit / 60000)
      levels[i][k] = level
      local amount = tonumber(ARGV[2 + k])
      if asking and amount > 0 and level < amount then
        wait = math.max(wait, math.ceil((amount - level) * 60000 / limit))
      end
    end
  end
end
if wait > 0 and (mode == 'take' or wait > tonumber(ARGV[2])) then
  return -wait
end
for i = 1, #KEYS do
  for k = 1, 3 do
    local level = levels[i][k]
    if level then
      local limit = tonumber(ARGV[5 + (i - 1) * 3 + k])
      local amount = tonumber(ARGV[2 + k])
      if mode == 'lower' then
        if amount >= 0 then
          level = math.min(level, amount)
        end
      else
        -- In debt by at most a minute's worth, whatever an answer claims it used.
        level = math.max(-limit, math.min(limit, level - amount))
      end
      redis.call('HSET', KEYS[i], 'l' .. k, tostring(level), 't' .. k, tostring(now))
    end
  end
  -- Idle for two minutes, every bucket is full again: nothing to keep.
  redis.call('PEXPIRE', KEYS[i], 120000)
end
return wait

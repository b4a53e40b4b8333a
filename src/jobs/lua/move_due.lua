-- Move the tasks due by now from the sorted set into the stream, and say what is left. When
-- nothing is due it costs two commands (the first of the set, XLEN), three with tasks due
-- later (ZCARD).
-- KEYS[1] the sorted set (score: due time in ms), KEYS[2] the stream
-- ARGV[1] now in ms, ARGV[2] most tasks to move
-- Returns {tasks moved, the due time of the next task (-1: none), tasks in the stream,
-- tasks due later}.
local now = tonumber(ARGV[1])
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local moved = 0
if #first == 2 and tonumber(first[2]) <= now then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
  for _, task in ipairs(due) do
    redis.call('ZREM', KEYS[1], task)
    redis.call('XADD', KEYS[2], '*', 'task', task)
  end
  moved = #due
  first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
end
local next_due = -1
local later = 0
if #first == 2 then
  next_due = math.floor(tonumber(first[2]))
  later = redis.call('ZCARD', KEYS[1])
end
return {moved, next_due, redis.call('XLEN', KEYS[2]), later}

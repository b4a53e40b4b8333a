-- Move the tasks due by now from the sorted set into the stream.
-- KEYS[1] the sorted set (score: due time in ms), KEYS[2] the stream
-- ARGV[1] now in ms, ARGV[2] most tasks to move
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, task in ipairs(due) do
  redis.call('ZREM', KEYS[1], task)
  redis.call('XADD', KEYS[2], '*', 'task', task)
end
return #due

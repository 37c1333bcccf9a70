-- Rebuild one subject's calendar counters (day, month) from the usage ledger, once.
-- Runs only if the subject's marker is still missing, so two gateways rebuilding at
-- the same time cannot overwrite reservations made after the first one finished.
--
-- KEYS[1]      the subject's marker S
-- KEYS[1 + i]  the bucket hash B of calendar limit i
-- ARGV[2i-1], ARGV[2i]  limit i: period start ms (its bucket), amount recorded so far
-- ARGV[#ARGV]  how long the buckets live (ms), at least to the end of their period
-- Returns  1 if it rebuilt, 0 if another gateway already had

if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local keep_ms = tonumber(ARGV[#ARGV])
for i = 2, #KEYS do
  local bucket, amount = ARGV[2 * (i - 1) - 1], tonumber(ARGV[2 * (i - 1)])
  redis.call('DEL', KEYS[i])
  if amount > 0 then
    redis.call('HSET', KEYS[i], bucket, amount)
    redis.call('PEXPIRE', KEYS[i], keep_ms)
  end
end
redis.call('SET', KEYS[1], '1')
return 1

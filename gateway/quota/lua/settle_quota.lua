-- Replace a reservation with the actual usage: add (actual - reserved) to the bucket
-- the reservation was charged to. A bucket that has already left its window is left
-- alone: that usage no longer counts anywhere.
--
-- KEYS[i]   the bucket hash of limit i (as given to reserve_quota.lua)
-- ARGV[1]   now in milliseconds, or "" to take Redis's clock
-- ARGV[2]   the reservation's time in milliseconds (reserve_quota.lua's now_ms)
-- ARGV[3+3(i-1) .. 5+3(i-1)]   window_ms, bucket_ms, delta of limit i
-- Returns   {applied_1, applied_2, ...}: 1 where the delta was applied, else 0.

local now_ms = tonumber(ARGV[1])
if not now_ms then
  local clock = redis.call('TIME')
  now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end
local reserved_at_ms = tonumber(ARGV[2])

local applied = {}
for i = 1, #KEYS do
  local base = 3 + 3 * (i - 1)
  local window_ms, bucket_ms = tonumber(ARGV[base]), tonumber(ARGV[base + 1])
  local delta = tonumber(ARGV[base + 2])
  local bucket = math.floor(reserved_at_ms / bucket_ms)
  local oldest = math.floor(now_ms / bucket_ms) - math.floor(window_ms / bucket_ms)
  applied[i] = 0
  if delta ~= 0 and bucket >= oldest then
    local amount = redis.call('HINCRBY', KEYS[i], bucket, delta)
    if amount <= 0 then
      redis.call('HDEL', KEYS[i], bucket)
    elseif redis.call('PTTL', KEYS[i]) < 0 then
      redis.call('PEXPIRE', KEYS[i], window_ms + 2 * bucket_ms)
    end
    applied[i] = 1
  end
end
return applied

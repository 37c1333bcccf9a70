-- Settle a reservation: replace what it charged with the actual usage, and forget it.
-- Settling with actual 0 everywhere releases it (upstream failed, or a cluster
-- rollback). If the reservation had already expired and been refunded, the actual
-- usage is charged whole; usage whose bucket has left its window counts nowhere.
--
-- KEYS[2i-1], KEYS[2i]  B and P of limit i (as given to reserve_quota.lua)
-- ARGV[1]  now in ms, or "" to take Redis's clock
-- ARGV[2]  reservation id
-- ARGV[3 + 7(i-1) ...]  limit i: kind, window, span_a, span_b (as at reservation),
--          bucket (as reserve_quota.lua returned it), reserved amount, actual amount
-- Returns  {applied_1, ...}: 1 where the limit's usage changed

local now_ms = tonumber(ARGV[1])
if not now_ms then
  local clock = redis.call('TIME')
  now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end
local reservation = ARGV[2]

local applied = {}
for i = 1, #KEYS / 2 do
  local buckets, pending = KEYS[2 * i - 1], KEYS[2 * i]
  local base = 3 + 7 * (i - 1)
  local kind, window = ARGV[base], ARGV[base + 1]
  local a, b = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local bucket, reserved, actual = ARGV[base + 4], tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6])
  applied[i] = 0
  if kind == 'concurrent' then
    applied[i] = redis.call('ZREM', pending, reservation)
  else
    -- The member as reserve_quota.lua wrote it: from the text given, not the number.
    local still_pending = redis.call('ZREM', pending, bucket .. ':' .. ARGV[base + 5] .. ':' .. reservation)
    local delta = actual - (still_pending == 1 and reserved or 0)
    local counts
    if window == 'rolling' then
      counts = tonumber(bucket) >= math.floor(now_ms / b) - math.floor(a / b)
    else
      counts = now_ms < b
    end
    if delta ~= 0 and counts then
      local amount = redis.call('HINCRBY', buckets, bucket, delta)
      if window == 'rolling' then
        -- The running total (field "0", see reserve_quota.lua) follows the bucket;
        -- a deleted bucket counts for nothing.
        redis.call('HINCRBY', buckets, '0', delta - math.min(amount, 0))
      end
      if amount <= 0 then
        redis.call('HDEL', buckets, bucket)
      elseif amount == delta and redis.call('PTTL', buckets) < 0 then
        -- A bucket this call made, maybe in a key it made (the hash was reset or
        -- evicted meanwhile): a bucket that was there already is in a key with an expiry.
        local keep_ms = window == 'rolling' and a + 2 * b or b - now_ms + 1000
        redis.call('PEXPIRE', buckets, keep_ms)
      end
      applied[i] = 1
    end
  end
end
return applied

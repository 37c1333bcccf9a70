-- Admit a request against every limit that applies to it, all or nothing.
--
-- Each limit is a rolling window kept as a hash of buckets: field = bucket index
-- (floor(ms / bucket_ms)), value = amount charged in that bucket. The bucket that the
-- window's start falls into is counted whole, so admitted amounts never exceed the
-- capacity in any rolling window (at worst one bucket of capacity is left unused).
--
-- KEYS[i]   the bucket hash of limit i
-- ARGV[1]   now in milliseconds, or "" to take Redis's clock (tests override it)
-- ARGV[2+4(i-1) .. 5+4(i-1)]   capacity, window_ms, bucket_ms, amount of limit i
-- Returns   {admitted (1|0), now_ms, rejecting limit index (0 if admitted),
--            retry_after_ms (-1: can never fit), used_1, reset_ms_1, used_2, ...}
--           used_i is after the reservation when admitted, before it when rejected;
--           reset_ms_i is how long until limit i is whole again.

local now_ms = tonumber(ARGV[1])
if not now_ms then
  local clock = redis.call('TIME')
  now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end

local limits = {}
for i = 1, #KEYS do
  local base = 2 + 4 * (i - 1)
  local limit = {
    key = KEYS[i],
    capacity = tonumber(ARGV[base]),
    window_ms = tonumber(ARGV[base + 1]),
    bucket_ms = tonumber(ARGV[base + 2]),
    amount = tonumber(ARGV[base + 3]),
  }
  limit.span = math.floor(limit.window_ms / limit.bucket_ms)
  limit.current = math.floor(now_ms / limit.bucket_ms)
  local oldest = limit.current - limit.span
  local flat = redis.call('HGETALL', limit.key)
  local buckets, expired, used = {}, {}, 0
  for j = 1, #flat, 2 do
    local index, amount = tonumber(flat[j]), tonumber(flat[j + 1])
    if index < oldest then
      expired[#expired + 1] = flat[j]
    else
      buckets[#buckets + 1] = {index, amount}
      used = used + amount
    end
  end
  if #expired > 0 then
    redis.call('HDEL', limit.key, unpack(expired))
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  limit.buckets, limit.used = buckets, used
  limits[i] = limit
end

-- Time until limit's oldest buckets have left the window far enough for `amount`.
local function wait_ms(limit)
  if limit.amount > limit.capacity then return -1 end
  local still_used = limit.used
  for _, bucket in ipairs(limit.buckets) do
    still_used = still_used - bucket[2]
    if still_used + limit.amount <= limit.capacity then
      return (bucket[1] + limit.span + 1) * limit.bucket_ms - now_ms
    end
  end
  return 0
end

local rejecting, retry_after = 0, 0
for i, limit in ipairs(limits) do
  if limit.used + limit.amount > limit.capacity then
    local wait = wait_ms(limit)
    if rejecting == 0 or retry_after ~= -1 and (wait == -1 or wait > retry_after) then
      rejecting, retry_after = i, wait
    end
  end
end

local result = {rejecting == 0 and 1 or 0, now_ms, rejecting, retry_after}
for _, limit in ipairs(limits) do
  local newest = limit.buckets[#limit.buckets]
  if rejecting == 0 and limit.amount > 0 then
    redis.call('HINCRBY', limit.key, limit.current, limit.amount)
    redis.call('PEXPIRE', limit.key, limit.window_ms + 2 * limit.bucket_ms)
    limit.used = limit.used + limit.amount
    newest = {limit.current, limit.amount}
  end
  local reset = 0
  if newest and limit.used > 0 then
    reset = (newest[1] + limit.span + 1) * limit.bucket_ms - now_ms
  end
  result[#result + 1] = limit.used
  result[#result + 1] = reset
end
return result

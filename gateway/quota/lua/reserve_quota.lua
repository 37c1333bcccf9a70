-- Admit a request against every limit that applies to it, all or nothing, and keep
-- the reservation so it can be settled later, or refunded if it is never settled.
--
-- Amount limits (requests, tokens, cost) keep usage in a hash B: bucket → amount.
-- Rolling windows index buckets by floor(ms / bucket_ms) and count the partly expired
-- oldest bucket whole, so admitted amounts never exceed the capacity over any rolling
-- window. Calendar windows (day, month) have one bucket, keyed by the period's start.
-- A rolling window's B also holds its running total: field "0" adds up every bucket
-- from the one named in field "1" on, and no bucket older than that is left. Admission
-- thus reads two fields and drops the buckets that just left the window, instead of
-- reading and adding up all sixty. The total is added up afresh from the buckets when
-- it is missing and once per window length, so it cannot drift for longer than that.
-- The two names are numbers below any real bucket: a gateway from before the total
-- (mid-upgrade, sharing this Redis) takes them for expired buckets and deletes them,
-- rather than failing on them, and the next admission here adds the window up again.
-- Concurrent limits count the reservations in flight.
-- Every reservation is a member of the limit's sorted set P, scored by its expiry; a
-- member that expires (its gateway died before settling) is refunded the next time
-- the limit is touched, so no quota leaks.
--
-- Calendar counters must hold what the ledger recorded before this Redis started:
-- each subject has a marker S set once its counters were rebuilt (sync_calendar.lua).
-- If a calendar limit's S is missing, nothing is charged and its index is returned,
-- so the gateway can rebuild the counters and try again.
--
-- KEYS[3i-2], KEYS[3i-1], KEYS[3i]  B, P and S of limit i
-- ARGV[1]  now in ms, or "" to take Redis's clock (tests pin it)
-- ARGV[2]  reservation id
-- ARGV[3]  reservation lifetime in ms
-- ARGV[4 + 7(i-1) ...]  limit i: kind ("amount" | "concurrent"), window ("rolling" |
--          "calendar"), capacity, span_a, span_b, amount, enforced (1 | 0);
--          rolling: span_a = window_ms, span_b = bucket_ms;
--          calendar: span_a = period start ms, span_b = period end ms
-- Returns  {admitted (1|0), now_ms, rejecting limit (0 if none), retry_after_ms
--          (-1: can never fit), unsynced limit (0 if none), then per limit: used,
--          reset_ms, charged (1|0), bucket}
--          used is after this reservation when charged, before it otherwise.

local now_ms = tonumber(ARGV[1])
if not now_ms then
  local clock = redis.call('TIME')
  now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end
local reservation, lifetime_ms = ARGV[2], tonumber(ARGV[3])
-- As text, for redis.call (see expires_at below).
local now_text = string.format('%d', now_ms)

-- Field names of a rolling window's running total and of its oldest counted bucket.
local TOTAL, FROM = '0', '1'

local function refund_expired(limit)
  local expired = redis.call('ZRANGEBYSCORE', limit.pending, '-inf', now_text)
  if #expired == 0 then return end
  if limit.kind == 'amount' then
    for _, member in ipairs(expired) do
      local bucket, amount = string.match(member, '^(%d+):(%d+):')
      if bucket and redis.call('HEXISTS', limit.buckets, bucket) == 1 then
        local left = redis.call('HINCRBY', limit.buckets, bucket, -tonumber(amount))
        if left <= 0 then redis.call('HDEL', limit.buckets, bucket) end
        if limit.window == 'rolling' then
          -- The bucket counts in the total for what it held; a deleted one for nothing.
          redis.call('HINCRBY', limit.buckets, TOTAL, -tonumber(amount) - math.min(left, 0))
        end
      end
    end
  end
  redis.call('ZREMRANGEBYSCORE', limit.pending, '-inf', now_text)
end

-- Buckets (index, amount) of B at or after `oldest`, in order; older ones are deleted.
local function live_buckets(limit, oldest)
  local flat = redis.call('HGETALL', limit.buckets)
  local entries, stale = {}, {}
  for j = 1, #flat, 2 do
    local index, amount = tonumber(flat[j]), tonumber(flat[j + 1])
    if flat[j] == TOTAL or flat[j] == FROM then
      -- Not a bucket.
    elseif index < oldest then
      stale[#stale + 1] = flat[j]
    else
      entries[#entries + 1] = {index, amount}
    end
  end
  if #stale > 0 then redis.call('HDEL', limit.buckets, unpack(stale)) end
  table.sort(entries, function(x, y) return x[1] < y[1] end)
  return entries
end

-- A rolling window's total, after dropping the buckets older than `oldest`.
local function rolling_total(limit, oldest)
  local meta = redis.call('HMGET', limit.buckets, TOTAL, FROM)
  local total, from = tonumber(meta[1]), tonumber(meta[2])
  local total_kept = total ~= nil
  if from == oldest and total then return total end
  if from and total and from < oldest and math.floor(from / limit.span) == math.floor(oldest / limit.span) then
    local fields = {}
    for index = from, oldest - 1 do fields[#fields + 1] = index end
    local amounts = redis.call('HMGET', limit.buckets, unpack(fields))
    local gone = {}
    for j, amount in ipairs(amounts) do
      if amount then
        total = total - tonumber(amount)
        gone[#gone + 1] = fields[j]
      end
    end
    if #gone > 0 then redis.call('HDEL', limit.buckets, unpack(gone)) end
  else
    -- Missing, a new window length begun, or a clock that went back: add it up afresh.
    local entries = live_buckets(limit, oldest)
    if #entries == 0 then
      -- Nothing in the window, so no total to keep. Writing one would make a key with
      -- no expiry (expiries are set when a bucket is charged), kept forever by a limit
      -- that is never charged.
      if total_kept then redis.call('HDEL', limit.buckets, TOTAL, FROM) end
      limit.untotalled = true  -- a charge below starts the total
      return 0
    end
    total = 0
    for _, entry in ipairs(entries) do total = total + entry[2] end
  end
  -- %d: a Lua number past 14 digits would otherwise be written as 1e+14.
  redis.call('HSET', limit.buckets, TOTAL, string.format('%d', total), FROM, oldest)
  return total
end

local function load_usage(limit)
  if limit.kind == 'concurrent' then
    limit.used = redis.call('ZCARD', limit.pending)
    return
  end
  if limit.window == 'rolling' then
    limit.span = math.floor(limit.a / limit.b)
    limit.current = math.floor(now_ms / limit.b)
    limit.oldest = limit.current - limit.span
    limit.used = rolling_total(limit, limit.oldest)
  else
    limit.current = limit.a
    limit.oldest = limit.a
    limit.entries = live_buckets(limit, limit.oldest)
    local used = 0
    for _, entry in ipairs(limit.entries) do used = used + entry[2] end
    limit.used = used
  end
end

-- The limit's buckets in order, read when needed (rolling windows do not keep them).
local function entries_of(limit)
  if not limit.entries then limit.entries = live_buckets(limit, limit.oldest) end
  return limit.entries
end

-- When the bucket at `index` stops counting.
local function leaves_at(limit, index)
  if limit.window == 'calendar' then return limit.b end
  return (index + limit.span + 1) * limit.b
end

local function wait_ms(limit)
  if limit.amount > limit.capacity then return -1 end
  if limit.kind == 'concurrent' then return 0 end
  local still_used = limit.used
  for _, entry in ipairs(entries_of(limit)) do
    still_used = still_used - entry[2]
    if still_used + limit.amount <= limit.capacity then
      return leaves_at(limit, entry[1]) - now_ms
    end
  end
  return 0
end

local limits = {}
local synced = {}  -- markers checked: a subject's day and month limits share one
for i = 1, #KEYS / 3 do
  local base = 4 + 7 * (i - 1)
  local marker = KEYS[3 * i]
  if ARGV[base + 1] == 'calendar' and not synced[marker] then
    if redis.call('EXISTS', marker) == 0 then return {0, now_ms, 0, 0, i} end
    synced[marker] = true
  end
end
for i = 1, #KEYS / 3 do
  local base = 4 + 7 * (i - 1)
  local limit = {
    buckets = KEYS[3 * i - 2], pending = KEYS[3 * i - 1],
    kind = ARGV[base], window = ARGV[base + 1], capacity = tonumber(ARGV[base + 2]),
    a = tonumber(ARGV[base + 3]), b = tonumber(ARGV[base + 4]),
    amount = tonumber(ARGV[base + 5]), amount_text = ARGV[base + 5],
    enforced = ARGV[base + 6] == '1',
  }
  refund_expired(limit)
  load_usage(limit)
  limit.fits = limit.used + limit.amount <= limit.capacity
  limits[i] = limit
end

local rejecting, retry_after = 0, 0
for i, limit in ipairs(limits) do
  if limit.enforced and not limit.fits then
    local wait = wait_ms(limit)
    if rejecting == 0 or retry_after ~= -1 and (wait == -1 or wait > retry_after) then
      rejecting, retry_after = i, wait
    end
  end
end

local result = {rejecting == 0 and 1 or 0, now_ms, rejecting, retry_after, 0}
-- Arguments to redis.call are written as text once each: Lua turns a number into text
-- anew (by sprintf) every time it is passed or joined, about a microsecond apiece.
local expires_at = string.format('%d', now_ms + lifetime_ms)
local lifetime = ARGV[3]
for _, limit in ipairs(limits) do
  -- A shadow limit that would reject is reported, and not charged.
  local charged = rejecting == 0 and limit.fits and limit.amount > 0
  local bucket = limit.current or 0
  if charged then
    if limit.kind == 'concurrent' then
      redis.call('ZADD', limit.pending, expires_at, reservation)
      redis.call('PEXPIRE', limit.pending, lifetime)
    else
      local keep_ms
      if limit.window == 'rolling' then
        keep_ms = limit.a + 2 * limit.b
      else
        keep_ms = limit.b - now_ms + 1000
      end
      local amount, field = limit.amount_text, string.format('%d', bucket)
      local held = redis.call('HINCRBY', limit.buckets, field, amount)
      if limit.untotalled then
        redis.call('HSET', limit.buckets, TOTAL, amount, FROM, limit.oldest)
      elseif limit.window == 'rolling' then
        redis.call('HINCRBY', limit.buckets, TOTAL, amount)
      end
      -- The expiry follows the newest bucket, so it is set when a bucket begins: a
      -- rolling window's key then outlives its newest bucket by two buckets, a calendar
      -- window's its period by a second, as when it was set on every charge.
      if held == limit.amount then redis.call('PEXPIRE', limit.buckets, keep_ms) end
      redis.call('ZADD', limit.pending, expires_at, field .. ':' .. amount .. ':' .. reservation)
      redis.call('PEXPIRE', limit.pending, keep_ms > lifetime_ms and keep_ms or lifetime)
    end
    limit.used = limit.used + limit.amount
  end
  local reset = 0
  if limit.kind == 'amount' and limit.used > 0 then
    -- Charged now: this bucket is the newest. Otherwise the newest one left.
    local newest = 0
    if charged then
      newest = bucket
    else
      for _, entry in ipairs(entries_of(limit)) do newest = math.max(newest, entry[1]) end
    end
    reset = leaves_at(limit, newest) - now_ms
  end
  result[#result + 1] = limit.used
  result[#result + 1] = reset
  result[#result + 1] = charged and 1 or 0
  result[#result + 1] = bucket
end
return result

-- Read limits without changing them: used, reserved (unexpired reservations) and when
-- each is whole again, by the same window rules as reserve_quota.lua.
--
-- KEYS[2i-1], KEYS[2i]  B and P of limit i
-- ARGV[1]  now in ms, or "" to take Redis's clock
-- ARGV[2 + 4(i-1) ...]  limit i: kind, window, span_a, span_b (as for reserve_quota.lua)
-- Returns  {now_ms, then per limit: used, reserved, reset_ms}

local now_ms = tonumber(ARGV[1])
if not now_ms then
  local clock = redis.call('TIME')
  now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end

local result = {now_ms}
for i = 1, #KEYS / 2 do
  local base = 2 + 4 * (i - 1)
  local kind, window = ARGV[base], ARGV[base + 1]
  local a, b = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local live = redis.call('ZRANGEBYSCORE', KEYS[2 * i], '(' .. now_ms, '+inf')
  local used, reserved, reset = 0, 0, 0
  if kind == 'concurrent' then
    used, reserved = #live, #live
  else
    for _, member in ipairs(live) do
      local amount = string.match(member, '^%d+:(%d+):')
      reserved = reserved + tonumber(amount or 0)
    end
    local oldest, span = a, 0
    if window == 'rolling' then
      span = math.floor(a / b)
      oldest = math.floor(now_ms / b) - span
    end
    local flat = redis.call('HGETALL', KEYS[2 * i - 1])
    local newest = nil
    for j = 1, #flat, 2 do
      local index = tonumber(flat[j])
      if index >= oldest then
        used = used + tonumber(flat[j + 1])
        if not newest or index > newest then newest = index end
      end
    end
    if newest and used > 0 then
      if window == 'rolling' then
        reset = (newest + span + 1) * b - now_ms
      else
        reset = b - now_ms
      end
    end
  end
  result[#result + 1] = used
  result[#result + 1] = reserved
  result[#result + 1] = reset
end
return result

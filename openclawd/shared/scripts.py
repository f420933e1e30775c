"""The engine's server-side scripts (Lua), run by ``shared/engine.py``: each reads the
engine's clock (``TIME``), so the fleet's hosts' clocks never matter.
"""

__all__ = ["BUCKET", "DAY", "WORD"]

# A per-minute bucket of N (ARGV[2]) refilled N/60 a second, by the engine's clock.
# KEYS[1]: a hash {level, ts}; absent means full. ARGV: op ('take' | 'adjust' | 'used'),
# N, amount. 'take' takes amount only if it fits; 'adjust' takes (or, negative, gives back)
# whatever the level, never over N. Returns {fitted, used, retry_after_s (-1: never)}.
BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op, cap, amount = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local rate = cap / 60
local state = redis.call('HMGET', KEYS[1], 'level', 'ts')
local level, ts = tonumber(state[1]), tonumber(state[2])
if level == nil or ts == nil then
  level, ts = cap, now
elseif now > ts then
  -- (a clock that went back, after a failover to another host, only delays the refill)
  level, ts = math.min(cap, level + (now - ts) * rate), now
end
local fitted, wait = 1, 0
if op == 'take' then
  if amount > cap then
    fitted, wait = 0, -1
  elseif level + 1e-9 < amount then
    fitted, wait = 0, math.ceil((amount - level) / rate * 1000000) / 1000000
  else
    level = level - amount
  end
elseif op == 'adjust' then
  level = math.min(cap, level - amount)
end
if fitted == 1 and op ~= 'used' then
  if level >= cap then
    redis.call('DEL', KEYS[1])
  else
    redis.call('HSET', KEYS[1], 'level', string.format('%.17g', level),
               'ts', string.format('%.17g', ts))
    redis.call('PEXPIRE', KEYS[1], math.ceil((cap - level) / rate * 1000) + 1000)
  end
end
return {fitted, string.format('%.17g', cap - level), string.format('%.17g', wait)}
"""

# A total per UTC day of the engine's clock, at most N (ARGV[2]) for 'take'.
# KEYS[1]: a hash {day, total}; another day's total counts as 0. Same ARGV and answer as
# the bucket's; a 'take' that does not fit waits for the engine's next UTC midnight.
DAY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local day = math.floor(tonumber(t[1]) / 86400)
local op, cap, amount = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'day', 'total')
local total = 0
if tonumber(state[1]) == day then
  total = tonumber(state[2]) or 0
end
local fitted, wait = 1, 0
if op == 'take' then
  if amount > cap then
    fitted, wait = 0, -1
  elseif total + amount > cap then
    fitted, wait = 0, (day + 1) * 86400 - now
  else
    total = total + amount
  end
elseif op == 'adjust' then
  total = math.max(0, total + amount)
end
if fitted == 1 and op ~= 'used' then
  redis.call('HSET', KEYS[1], 'day', string.format('%d', day),
             'total', string.format('%.17g', total))
  redis.call('EXPIREAT', KEYS[1], (day + 2) * 86400)
end
return {fitted, string.format('%.17g', total), string.format('%.17g', wait)}
"""


# An upstream's last word on its limits (upstream/headroom.py's Word), shared by the fleet.
# KEYS[1]: a hash {at, requests, requests_reset, tokens, tokens_reset}, times the engine's.
# ARGV: age ('' = only read), then requests, requests_reset_in, tokens, tokens_reset_in
# ('' = unknown). A word said later than the stored one replaces it. Returns the stored
# word as {age, requests, requests_reset_in, tokens, tokens_reset_in} ('' = unknown), or
# {} when none.
WORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function at(value)
  if value == '' then return '' end
  return string.format('%.17g', now + tonumber(value))
end
if ARGV[1] ~= '' then
  local said = now - tonumber(ARGV[1])
  local stored = tonumber(redis.call('HGET', KEYS[1], 'at'))
  if stored == nil or said > stored then
    redis.call('HSET', KEYS[1], 'at', string.format('%.17g', said),
               'requests', ARGV[2], 'requests_reset', at(ARGV[3]),
               'tokens', ARGV[4], 'tokens_reset', at(ARGV[5]))
    redis.call('EXPIRE', KEYS[1], 3600)
  end
end
local w = redis.call('HMGET', KEYS[1], 'at', 'requests', 'requests_reset', 'tokens',
                     'tokens_reset')
if not w[1] then return {} end
local function since(value)
  if value == '' then return '' end
  return string.format('%.17g', tonumber(value) - now)
end
return {string.format('%.17g', now - tonumber(w[1])), w[2], since(w[3]), w[4], since(w[5])}
"""

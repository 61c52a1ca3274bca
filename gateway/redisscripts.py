"""The Lua scripts of the limits shared through Redis (``redislimits``), one per step.

Redis runs a script whole, with no other command in between: a bucket is read, refilled
and taken from, or the replicas' requests in flight are summed and one more counted, in one
atomic step. Each reads Redis' own clock (``TIME``), so replicas whose clocks differ still
agree on a bucket's refill; Redis 5 or later replicates such scripts by their effects.
"""

from __future__ import annotations

# Redis' clock in milliseconds; a bucket's level and refill (capacity per minute).
_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  local l, at = tonumber(v[1]), tonumber(v[2])
  if l == nil or at == nil then return cap end
  if now > at then l = math.min(cap, l + (now - at) * cap / 60000) end
  return l
end
local function store(key, cap, l)
  if l >= cap then redis.call('DEL', key) return end
  redis.call('HSET', key, 'l', string.format('%.17g', l), 't', now)
  redis.call('PEXPIRE', key, math.ceil((cap - l) * 60000 / cap) + 1000)
end
local function reset_ms(cap, l)
  if cap <= 0 then return 0 end
  return math.max(0, math.ceil((cap - l) * 60000 / cap))
end
"""

# KeyBuckets.admit: refused while the tokens bucket is below one, else one request taken.
# KEYS: requests bucket, tokens bucket; ARGV: rpm, tpm (0: no such limit).
ADMIT = (
    _BUCKET
    + """
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local rl, tl, limited, wait = 0, 0, 0, 0
if tpm > 0 then tl = level(KEYS[2], tpm) end
if rpm > 0 then rl = level(KEYS[1], rpm) end
if tpm > 0 and tl < 1 then
  limited, wait = 2, math.ceil((1 - tl) * 60000 / tpm)
elseif rpm > 0 then
  if rl >= 1 then
    rl = rl - 1
    store(KEYS[1], rpm, rl)
  else
    limited, wait = 1, math.ceil((1 - rl) * 60000 / rpm)
  end
end
return {limited, wait, math.floor(rl), reset_ms(rpm, rl), math.floor(tl), reset_ms(tpm, tl)}
"""
)

# KeyBuckets.spend_tokens. KEYS: tokens bucket; ARGV: tpm, tokens.
SPEND = (
    _BUCKET
    + """
local cap = tonumber(ARGV[1])
store(KEYS[1], cap, level(KEYS[1], cap) - tonumber(ARGV[2]))
return 0
"""
)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Admission.enter across the replicas: 0 admitted, 1 the total cap is full, 2 the model's.
# KEYS: this replica's hash, the replicas; ARGV: replica, slot, model, max total, max per
# model (0: none), ttl ms, the prefix of the replicas' hashes.
ENTER = (
    _NOW
    + """
local ttl = tonumber(ARGV[6])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
local total, count = 0, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')) do
  local v = redis.call('HMGET', ARGV[7] .. id, 't', 'm:' .. ARGV[3])
  total = total + (tonumber(v[1]) or 0)
  count = count + (tonumber(v[2]) or 0)
end
if tonumber(ARGV[4]) > 0 and total >= tonumber(ARGV[4]) then return 1 end
if tonumber(ARGV[5]) > 0 and count >= tonumber(ARGV[5]) then return 2 end
redis.call('HSET', KEYS[1], 's:' .. ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[1], 't', 1)
redis.call('HINCRBY', KEYS[1], 'm:' .. ARGV[3], 1)
redis.call('PEXPIRE', KEYS[1], ttl)
return 0
"""
)

# Admission.leave: only a slot still there is taken off (a resync may have dropped it).
# KEYS: this replica's hash; ARGV: slot, model.
LEAVE = """
if redis.call('HDEL', KEYS[1], 's:' .. ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[1], 't', -1) <= 0 then redis.call('HDEL', KEYS[1], 't') end
  local m = 'm:' .. ARGV[2]
  if redis.call('HINCRBY', KEYS[1], m, -1) <= 0 then redis.call('HDEL', KEYS[1], m) end
end
return 0
"""

# The heartbeat: this replica's hash rewritten from the slots it really holds (and those it
# is asking for), its expiry and its place among the replicas refreshed, the dead dropped.
# KEYS: this replica's hash, the replicas; ARGV: replica, ttl ms, live slots…
RESYNC = (
    _NOW
    + """
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
local live = {}
for i = 3, #ARGV do live['s:' .. ARGV[i]] = true end
local held = redis.call('HGETALL', KEYS[1])
local kept, counts, total = {}, {}, 0
for i = 1, #held, 2 do
  local f, v = held[i], held[i + 1]
  if live[f] then
    kept[f] = v
    total = total + 1
    counts[v] = (counts[v] or 0) + 1
  end
end
redis.call('DEL', KEYS[1])
if total > 0 then
  for f, v in pairs(kept) do redis.call('HSET', KEYS[1], f, v) end
  redis.call('HSET', KEYS[1], 't', total)
  for m, c in pairs(counts) do redis.call('HSET', KEYS[1], 'm:' .. m, c) end
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return total
"""
)

"""The Lua scripts of the Redis coordinator (``redis.py``).

Each runs atomically on the server, so every check of an owner token or a fence
is made in the same step as the write it guards. ``KEYS`` and ``ARGV`` are listed
above each script. Fences travel as strings (``GET``, ``HGET``), never as Lua
numbers, which are doubles and would round the large fences Redis grants.
"""

from __future__ import annotations

#: How long an owner's activity count outlives its last grant or renewal.
ACTIVITY_KEEP_MS = 86_400_000

# Moves the activity count of an owner (its key in ``key``, the server's time in ``t``),
# seeded from the server's clock in microseconds when missing, so that a count that
# expired and came back never repeats one seen before (``Coordinator.silence``).
BUMP = """
local function bump(key, t)
  if redis.call('EXISTS', key) == 0 then
    redis.call('SET', key, t[1] .. string.format('%06d', tonumber(t[2])))
  end
  redis.call('INCR', key)
  redis.call('PEXPIRE', key, ACTIVITY_KEEP_MS)
end
""".replace("ACTIVITY_KEEP_MS", str(ACTIVITY_KEEP_MS))

# The rules of a lease request, called once per request (its keys and arguments as K and
# A). K: lease, fence, loop hash, loop set, the caller's activity count, the activity count
# of the owner of A[12]. A: owner, holder, ttl ms, loop key, quiet s, pid, the owner and
# fence of a holder known to be dead, the fence and renewal count of a claim the caller saw
# unchanged for its TTL ('' for none), linger ms, and an owner whose activity count the
# caller saw unchanged, that count, and the longest claim TTL (ms) its silence covers (''
# for none). A refusal says who holds it, ms left by the server's clock, owner, fence, pid,
# renewal count and TTL ms.
ACQUIRE_ONE = """
local function acquire(K, A)
  redis.call('SADD', K[4], A[4])
  if redis.call('HGET', K[3], 'paused') == '1' then return {'paused'} end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local owner = redis.call('HGET', K[1], 'owner')
  local held = redis.call('HGET', K[1], 'fence')
  local beat = redis.call('HGET', K[1], 'beat') or '0'
  local silent = A[12] ~= '' and owner == A[12]
    and (redis.call('GET', K[6]) or '') == A[13]
    and tonumber(redis.call('HGET', K[1], 'ttl') or 'x') ~= nil
    and tonumber(redis.call('HGET', K[1], 'ttl')) <= tonumber(A[14])
  if owner and owner ~= A[1] and not (owner == A[7] and held == A[8])
     and not (held == A[9] and beat == A[10]) and not silent then
    local ends = tonumber(redis.call('HGET', K[1], 'ends') or '')
    local left = ends and string.format('%d', ends - now) or redis.call('PTTL', K[1])
    return {'denied', redis.call('HGET', K[1], 'holder') or '', left, owner, held or '',
      redis.call('HGET', K[1], 'pid') or '', beat, redis.call('HGET', K[1], 'ttl') or ''}
  end
  if redis.call('EXISTS', K[2]) == 0 then
    -- A server that refuses INFO to scripts (some hosted ones) is taken to be up long.
    local info = redis.pcall('INFO', 'server')
    local up = type(info) == 'string' and string.match(info, 'uptime_in_seconds:(%d+)')
    if up and tonumber(up) <= tonumber(A[5]) then return {'denied', '', 250} end
    redis.call('SET', K[2], t[1] .. string.format('%06d', tonumber(t[2])))
  end
  redis.call('INCR', K[2])
  -- GET returns the counter as a string, never as a rounded Lua number.
  local fence = redis.call('GET', K[2])
  redis.call('DEL', K[1])
  redis.call('HSET', K[1], 'owner', A[1], 'holder', A[2], 'fence', fence, 'pid', A[6],
    'since', t[1] .. '.' .. string.format('%06d', tonumber(t[2])), 'beat', '0', 'ttl', A[3],
    'ends', string.format('%d', now + tonumber(A[3])))
  redis.call('PEXPIRE', K[1], tonumber(A[3]) + tonumber(A[11]))
  bump(K[5], t)
  return {'granted', fence, redis.call('HGET', K[3], 'last_start') or ''}
end
"""
# Many leases asked for in one call, each by the rules of ``acquire``. KEYS: the loop set,
# the caller's activity count. ARGV: owner, holder, quiet s, pid, linger ms, the prefix of
# every key name (``<prefix>:``), then the requests as one string of lines: key, ttl ms,
# dead holder's owner and fence, the claim seen unchanged (fence, renewal count), the
# silent owner, its count and longest TTL ms, TAB between fields ('' for none; a key is
# printable: no tab or newline). Returns each request's answer, in order, as the single
# call's list joined by TAB: one string each, which the caller splits (a list per request
# cost more to read than the rest of the call).
ACQUIRE_MANY = BUMP + ACQUIRE_ONE + """
local answers = {}
local field = '([^\\t\\n]*)'
local line = '([^\\t\\n]+)\\t(%d+)' .. string.rep('\\t' .. field, 7) .. '\\n'
local p = ARGV[6]
for key, ttl, dead, dead_fence, fence, beat, silent, count, silent_ttl in string.gmatch(ARGV[7], line) do
  local answer = acquire(
    {p .. 'lease:' .. key, p .. 'fence:' .. key, p .. 'loop:' .. key, KEYS[1], KEYS[2],
     p .. 'activity:' .. (silent ~= '' and silent or ARGV[1])},
    {ARGV[1], ARGV[2], ttl, key, ARGV[3], ARGV[4], dead, dead_fence, fence, beat, ARGV[5],
     silent, count, silent_ttl})
  for i = 1, #answer do answer[i] = tostring(answer[i]) end
  answers[#answers + 1] = table.concat(answer, '\\t')
end
return answers
"""

# Extends many leases in one call. A renewal after the claim ended by the server's clock is
# refused, and changes nothing; a paused loop's lease is given up. KEYS: the owner's activity
# count. ARGV: owner, linger ms, the prefix of lease keys, the prefix of loop hashes, then
# the leases as one string of lines ``key TAB fence TAB ttl-ms`` (a key is printable: no tab
# or newline; one string per call, where three arguments a lease made packing the call the
# renewer's main cost). The names are made here, so the script wants one Redis, not a
# cluster (as every other script here). Returns only the leases not held: their line
# numbers (from 1) with 'lost' or 'paused', flat; every other lease is held.
RENEW_MANY = BUMP + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local owner, linger = ARGV[1], tonumber(ARGV[2])
local lease_prefix, loop_prefix = ARGV[3], ARGV[4]
local out = {}
local i = 0
bump(KEYS[1], t)
for key, fence, ttl in string.gmatch(ARGV[5], '([^\\t\\n]+)\\t(%d+)\\t(%d+)\\n') do
  i = i + 1
  local lease = lease_prefix .. key
  local held = redis.call('HMGET', lease, 'owner', 'fence', 'ends')
  local ends = tonumber(held[3] or '')
  if held[1] ~= owner or held[2] ~= fence or (ends and ends <= now) then
    out[#out + 1] = i
    out[#out + 1] = 'lost'
  elseif redis.call('HGET', loop_prefix .. key, 'paused') == '1' then
    redis.call('DEL', lease)
    out[#out + 1] = i
    out[#out + 1] = 'paused'
  else
    redis.call('HINCRBY', lease, 'beat', 1)
    redis.call('HSET', lease, 'ttl', ttl, 'ends', string.format('%d', now + tonumber(ttl)))
    redis.call('PEXPIRE', lease, tonumber(ttl) + linger)
  end
end
return out
"""

# The lease passed from its owner to an heir in one step, with the next fence: never free
# between the two. KEYS: lease, fence, loop hash, the heir's activity count. ARGV: owner,
# fence, heir's owner, heir's holder label, ttl ms, heir's pid, linger ms. Returns
# {'granted', fence, last start}, {'paused'} (the lease given up) or {'lost'} (the owner no
# longer owns it with that fence).
HAND_OVER = BUMP + """
local held = redis.call('HMGET', KEYS[1], 'owner', 'fence')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then return {'lost'} end
if redis.call('HGET', KEYS[3], 'paused') == '1' then
  redis.call('DEL', KEYS[1])
  return {'paused'}
end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'lost'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('INCR', KEYS[2])
local fence = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'holder', ARGV[4], 'fence', fence, 'pid', ARGV[6],
  'since', t[1] .. '.' .. string.format('%06d', tonumber(t[2])), 'beat', '0', 'ttl', ARGV[5],
  'ends', string.format('%d', now + tonumber(ARGV[5])))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]) + tonumber(ARGV[7]))
bump(KEYS[4], t)
return {'granted', fence, redis.call('HGET', KEYS[3], 'last_start') or ''}
"""

# Gives many leases back. KEYS: each lease. ARGV: owner, then each lease's fence. Returns 1
# for each lease given back, 0 for each one the owner no longer owned with that fence.
RELEASE_MANY = """
local out = {}
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'owner') == ARGV[1]
     and redis.call('HGET', KEYS[i], 'fence') == ARGV[i + 1] then
    out[i] = redis.call('DEL', KEYS[i])
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: lease. Returns the fence of the lease it dropped, or nil if none was held (a
# claim that ended by the server's clock is dropped all the same).
REVOKE = """
local fence = redis.call('HGET', KEYS[1], 'fence')
if not fence then return nil end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends = tonumber(redis.call('HGET', KEYS[1], 'ends') or '')
redis.call('DEL', KEYS[1])
if ends and ends <= now then return nil end
return fence
"""

# The statistics of many loops in one call. KEYS: the set of loops, then each loop's hash.
# ARGV: one JSON list with an entry per loop hash: [key, passes, errors, {field: stored
# value}, [fields to clear]]. Counts are added; fields replace or clear the stored ones.
REPORT = """
local items = cjson.decode(ARGV[1])
for i, item in ipairs(items) do
  local loop = KEYS[i + 1]
  redis.call('SADD', KEYS[1], item[1])
  redis.call('HINCRBY', loop, 'passes', item[2])
  redis.call('HINCRBY', loop, 'errors', item[3])
  local flat = {}
  for name, value in pairs(item[4]) do
    flat[#flat + 1] = name
    flat[#flat + 1] = value
  end
  if #flat > 0 then redis.call('HSET', loop, unpack(flat)) end
  if #item[5] > 0 then redis.call('HDEL', loop, unpack(item[5])) end
end
return #items
"""

# KEYS: runner zset (score: expiry in server seconds), labels hash, hosts hash. ARGV: id,
# label, ttl s, hosts (a JSON list).
HEARTBEAT = """
local t = redis.call('TIME')
local now = string.format('%.6f', t[1] + t[2] / 1e6)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], gone)
  redis.call('HDEL', KEYS[3], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], string.format('%.6f', t[1] + t[2] / 1e6 + tonumber(ARGV[3])), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
"""

# KEYS: lease hash, loops set, loop stats hash. ARGV: loop key. 0 while a claim on the
# lease has not ended (a lease hash without an end counts as held); else the loop is
# dropped from status (its fence key stays) and 1 is returned.
FORGET = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then
  local ends = redis.call('HGET', KEYS[1], 'ends')
  if not ends or tonumber(ends) > now then
    return 0
  end
end
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: runner zset, labels hash, hosts hash. Returns id, expiry, label, hosts fours.
LIVE_RUNNERS = """
local t = redis.call('TIME')
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.6f', t[1] + t[2] / 1e6),
  '+inf', 'WITHSCORES')
local out = {}
for i = 1, #rows, 2 do
  out[#out + 1] = rows[i]
  out[#out + 1] = rows[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[2], rows[i]) or ''
  out[#out + 1] = redis.call('HGET', KEYS[3], rows[i]) or ''
end
return out
"""

# KEYS: setting hash. ARGV: value, fence. 1 when stored; 0, changing nothing, when the
# stored setting has a greater fence. Fences are compared as decimal text, not as Lua's
# doubles, which round integers past 2^53.
WRITE_SETTING = """
local function below(a, b)
  local neg_a, neg_b = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if neg_a ~= neg_b then return neg_a end
  if neg_a then a, b = string.sub(b, 2), string.sub(a, 2) end
  if #a ~= #b then return #a < #b end
  return a < b
end
local stored = redis.call('HGET', KEYS[1], 'fence')
if stored and below(ARGV[2], stored) then return 0 end
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'fence', ARGV[2])
return 1
"""

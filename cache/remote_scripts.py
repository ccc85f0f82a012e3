"""The remote tier's Lua scripts (`cache.remote` says what the keys hold). Each runs atomically in Redis; the
budget's bookkeeping (`sz`, `used`, `lru`, `own`, the positions index, session sets, a hybrid's KV block
counts) changes only here, so every replica keeps it consistent.
"""

from __future__ import annotations

# Shared by the scripts: `purge(k)` forgets blob `k` and everything that refers to it. `own` holds, per blob,
# "session set\npositions key\ncounts key\nposition", so the index keeps only live blobs' positions and a
# session set only its live blobs (Redis deletes a set or hash left empty); per KV block, the session set of
# its first writer alone (its bytes and count also leave `used:kv` and `used:kvn`).
_PURGE = r"""
local function purge(lru, sz, used, own, k)
  local n = redis.call('HGET', sz, k)
  local o = redis.call('HGET', own, k)
  if n then
    redis.call('HDEL', sz, k)
    if redis.call('DECRBY', used, n) < 0 then redis.call('SET', used, 0) end
  end
  if o then
    redis.call('HDEL', own, k)
    local s, p, c, pos = string.match(o, '^(.-)\n(.-)\n(.-)\n(.*)$')
    if s then
      redis.call('SREM', s, k)
      if redis.call('HINCRBY', c, pos, -1) <= 0 then
        redis.call('HDEL', c, pos)
        redis.call('ZREM', p, pos)
      end
    else  -- a KV block: `o` is the session set of its first writer
      redis.call('SREM', o, k)
      if n and redis.call('DECRBY', used .. ':kv', n) < 0 then redis.call('SET', used .. ':kv', 0) end
      if redis.call('DECR', used .. ':kvn') < 0 then redis.call('SET', used .. ':kvn', 0) end
    end
  end
  redis.call('ZREM', lru, k)
  redis.call('DEL', k)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function purge_expired(lru, sz, used, own, now)
  for _, k in ipairs(redis.call('ZRANGEBYSCORE', lru, '-inf', now, 'LIMIT', 0, 64)) do
    purge(lru, sz, used, own, k)
  end
end
-- Reserve `nbytes` for key `blob` expiring at `expiry` (ms): 0 if it is accounted already (its LRU place
-- refreshed), -1 if it exceeds the budget alone, else 1 (the oldest-expiring keys evicted until it fits).
local function reserve(blob, lru, sz, used, own, nbytes, budget, expiry)
  if redis.call('HEXISTS', sz, blob) == 1 then
    redis.call('ZADD', lru, expiry, blob)
    return 0
  end
  local total = tonumber(redis.call('GET', used) or '0')
  if nbytes > budget then return -1 end
  while total + nbytes > budget do
    local oldest = redis.call('ZRANGE', lru, 0, 0)
    if #oldest == 0 then
      redis.call('SET', used, 0)
      total = 0
      break
    end
    purge(lru, sz, used, own, oldest[1])
    total = tonumber(redis.call('GET', used) or '0')
  end
  redis.call('HSET', sz, blob, nbytes)
  redis.call('INCRBY', used, nbytes)
  redis.call('ZADD', lru, expiry, blob)
  return 1
end
local function totals(lru, used)
  local n = redis.call('ZCARD', lru) - tonumber(redis.call('GET', used .. ':kvn') or '0')
  return {tonumber(redis.call('GET', used) or '0'), n, tonumber(redis.call('GET', used .. ':kv') or '0')}
end
"""

# KEYS: blob, lru, sz, used, own, positions, counts, session; ARGV: accounted bytes, budget, ttl ms,
# position. Reserves the budget for a blob the same transaction then SETs (the payload never passes through
# Lua, which would copy it twice). Returns {status, used, checkpoints, KV bytes}: status 1 reserved, 0 existed
# (its TTL and LRU place refreshed; the SET rewrites the same bytes), -1 over the budget (the caller never
# gets here).
RESERVE = (
    _PURGE
    + r"""
local blob, lru, sz, used, own = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = now_ms()
purge_expired(lru, sz, used, own, now)
local status = reserve(blob, lru, sz, used, own, tonumber(ARGV[1]), tonumber(ARGV[2]), now + tonumber(ARGV[3]))
if status == 1 then
  redis.call('HSET', own, blob, KEYS[8] .. '\n' .. KEYS[6] .. '\n' .. KEYS[7] .. '\n' .. ARGV[4])
  redis.call('SADD', KEYS[8], blob)
  redis.call('ZADD', KEYS[6], tonumber(ARGV[4]), ARGV[4])
  redis.call('HINCRBY', KEYS[7], ARGV[4], 1)
end
local t = totals(lru, used)
return {status, t[1], t[2], t[3]}
"""
)

# KEYS: lru, sz, used, own, session, then KV block keys; ARGV: budget, block ttl ms, then per block its
# accounted bytes, 0 for a block the writer found stored. First every stored block lives another block TTL
# (refreshed first, so that reserving the new ones never evicts them), then the new ones are reserved (owned
# by the session: `delete_session` drops the blocks it wrote first) for the SET that follows each in the same
# transaction. Returns how many stored blocks were gone (the checkpoint will read as a miss).
BLOCKS = (
    _PURGE
    + r"""
local lru, sz, used, own, session = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, budget, ttl = now_ms(), tonumber(ARGV[1]), tonumber(ARGV[2])
purge_expired(lru, sz, used, own, now)
local gone = 0
for i = 6, #KEYS do
  if tonumber(ARGV[i - 3]) == 0 then
    if redis.call('HEXISTS', sz, KEYS[i]) == 1 and redis.call('PEXPIRE', KEYS[i], ttl) == 1 then
      redis.call('ZADD', lru, now + ttl, KEYS[i])
    else
      gone = gone + 1
    end
  end
end
for i = 6, #KEYS do
  local nbytes = tonumber(ARGV[i - 3])
  if nbytes > 0 and reserve(KEYS[i], lru, sz, used, own, nbytes, budget, now + ttl) == 1 then
    redis.call('HSET', own, KEYS[i], session)
    redis.call('SADD', session, KEYS[i])
    redis.call('INCRBY', used .. ':kv', nbytes)
    redis.call('INCR', used .. ':kvn')
  end
end
return gone
"""
)

# KEYS: lru, blob, then its KV block keys; ARGV: ttl ms, block ttl ms. A hit: the blob lives another TTL,
# its blocks another block TTL.
TOUCH = (
    _PURGE
    + r"""
local now = now_ms()
if redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[1])) == 0 then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), KEYS[2])
for i = 3, #KEYS do
  if redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2])) == 1 then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), KEYS[i])
  end
end
return 1
"""
)

# KEYS: session, lru, sz, used, own. Drops every blob the session wrote; returns how many.
DELETE = (
    _PURGE
    + r"""
local n = 0
for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  n = n + redis.call('EXISTS', k)
  purge(KEYS[2], KEYS[3], KEYS[4], KEYS[5], k)
end
redis.call('DEL', KEYS[1])
return n
"""
)

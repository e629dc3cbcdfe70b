"""The Redis broker's Lua scripts: each step that must be atomic, as one script.

A stream's keys share one hash tag, ``{<prefix>:<stream>}``, so a script
touches a single Redis Cluster slot:

* ``...:meta``, a hash: ``epoch`` and ``offset`` (the newest entry's). The
  epoch lives with the counter: if the hash is lost (a restart without
  persistence, an eviction), the next script to touch it starts a new epoch
  and drops the old log, so offsets never rewind silently within an epoch;
* ``...:log``, a Redis stream whose entry ids are ``<offset>-0``, so reading
  after an offset is one ``XRANGE``; fields ``t`` (the delivery frame), ``s``
  (sender, "" for none), ``e`` (echo, "1"/"0"), ``a`` (append time);
* ``...:key:<key>``, an append key's record: ``<epoch> <offset> <at>`` of
  the entry it made, so a publish resent to any node gets its first entry back.

The pub/sub message of an entry is its fields joined by newlines:
``epoch, offset, sender, echo, at, text`` (only the text may hold newlines,
and it comes last).
"""

from __future__ import annotations

__all__ = ["APPEND", "FORGET_REPLIES", "POSITION", "READ", "REMEMBER_REPLY", "REWOUND"]

_ENSURE_EPOCH = """
local function ensure_epoch(meta, log, new_epoch, meta_ttl)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = new_epoch
    redis.call('DEL', log)
    redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
  end
  redis.call('PEXPIRE', meta, meta_ttl)
  return epoch
end
"""

APPEND = (
    _ENSURE_EPOCH
    + """
-- KEYS: meta, log, append key (or "" for none)
-- ARGV: head, tail, new epoch, sender, echo, max bytes, history size, at,
--       key ttl ms, channel, meta ttl ms, log ttl ms
local meta, log, key = KEYS[1], KEYS[2], KEYS[3]
if key ~= '' then
  local earlier = redis.call('GET', key)
  if earlier then
    local epoch, offset, at = string.match(earlier, '^(%S+) (%d+) (%S+)$')
    return {'dup', epoch, tonumber(offset), at}
  end
end
local epoch = ensure_epoch(meta, log, ARGV[3], ARGV[11])
local offset = tonumber(redis.call('HGET', meta, 'offset')) + 1
local text = ARGV[1] .. ',"epoch":"' .. epoch .. '","offset":' .. offset .. ',' .. ARGV[2]
if #text > tonumber(ARGV[6]) then
  return {'big', #text}
end
redis.call('HSET', meta, 'offset', offset)
redis.call('XADD', log, 'MAXLEN', ARGV[7], offset .. '-0',
  't', text, 's', ARGV[4], 'e', ARGV[5], 'a', ARGV[8])
redis.call('PEXPIRE', log, ARGV[12])
if key ~= '' then
  redis.call('SET', key, epoch .. ' ' .. offset .. ' ' .. ARGV[8], 'PX', ARGV[9])
end
local nl = '\\n'
redis.call('PUBLISH', ARGV[10],
  epoch .. nl .. offset .. nl .. ARGV[4] .. nl .. ARGV[5] .. nl .. ARGV[8] .. nl .. text)
return {'ok', epoch, offset, text}
"""
)
"""Number, store, expire and publish one entry; idempotent by its key."""

POSITION = (
    _ENSURE_EPOCH
    + """
-- KEYS: meta, log; ARGV: new epoch, meta ttl ms
local epoch = ensure_epoch(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return {epoch, tonumber(redis.call('HGET', KEYS[1], 'offset'))}
"""
)
"""The stream's epoch and newest offset (a new epoch if it has none)."""

READ = (
    _ENSURE_EPOCH
    + """
-- KEYS: meta, log; ARGV: new epoch, meta ttl ms, reader's epoch, reader's offset
local epoch = ensure_epoch(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local from = '-'
if ARGV[3] == epoch and tonumber(ARGV[4]) <= offset then
  from = (tonumber(ARGV[4]) + 1) .. '-0'
end
local oldest = offset + 1
if first[1] then
  oldest = tonumber(string.match(first[1][1], '^(%d+)'))
end
return {epoch, offset, oldest, redis.call('XRANGE', KEYS[2], from, '+')}
"""
)
"""The stream's position, its oldest held offset and the entries after the reader's."""

REWOUND = """
-- KEYS: meta, log; ARGV: epoch and offset a node relayed, new epoch, meta ttl ms
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
if epoch == ARGV[1] and offset < tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'offset', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return 1
end
return 0
"""
"""A stream behind what a node already relayed (a failover to a replica that had not
caught up) starts a new epoch, so its offsets are never reused within one."""

REMEMBER_REPLY = """
-- KEYS: replies hash, ids sorted set; ARGV: message id, reply, keep at most, ttl ms
local replies, ids = KEYS[1], KEYS[2]
local highest = tonumber(redis.call('HGET', replies, 'h') or '0')
local id = tonumber(ARGV[1])
if id > highest then
  redis.call('HSET', replies, 'h', id)
end
redis.call('HSET', replies, ARGV[1], ARGV[2])
redis.call('ZADD', ids, id, ARGV[1])
if redis.call('ZCARD', ids) > tonumber(ARGV[3]) then
  local oldest = redis.call('ZPOPMIN', ids)
  redis.call('HDEL', replies, oldest[1])
  if tonumber(oldest[1]) > tonumber(redis.call('HGET', replies, 'f') or '0') then
    redis.call('HSET', replies, 'f', oldest[1])
  end
end
redis.call('PEXPIRE', replies, ARGV[4])
redis.call('PEXPIRE', ids, ARGV[4])
"""
"""Mark a message id processed with its reply; the oldest replies beyond the limit go.

The hash holds ``h``, the highest id processed, and ``f``, the floor: the
highest id whose reply was evicted or forgotten (processed, not held)."""

FORGET_REPLIES = """
-- KEYS: replies hash, ids sorted set; ARGV: up to this id
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[1], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local floor = math.min(tonumber(ARGV[1]), tonumber(redis.call('HGET', KEYS[1], 'h') or '0'))
if floor > tonumber(redis.call('HGET', KEYS[1], 'f') or '0') then
  redis.call('HSET', KEYS[1], 'f', floor)
end
"""
"""Drop the replies the client holds (ids up to ARGV[1]); they count as processed."""

"""The Redis broker's reads: history pages and presence (PROTOCOL §7.5, §7.6).

``RedisBroker`` delegates ``history`` and ``presence_*`` here; each is one Lua
script (``presence_refresh``: one pipeline of them), so it is atomic and one
round trip. The keys share the stream's hash tag ``{<prefix>:<stream>}`` with
``redis_lua``'s meta hash and log, so a room's state lives in one Cluster slot:

* history reads ``...:log`` (entry ids ``<offset>-0``, contiguous from the
  oldest held to the newest): entries appended more than ``history_seconds``
  ago count as trimmed, as for ``read_since``. The script finds the oldest
  young enough (the first entry, or a binary search when it is too old: append
  times rise with offsets, give or take the nodes' clock skew) and fetches at
  most ``limit`` entries from the page's anchor; ``pages.span``, the rule the
  memory broker uses too, then decides which of them the page holds, its gap
  and ``more``;
* ``...:presence``, a hash: session id -> the member as JSON
  (``PresenceMember``: session, user, client, joined_at);
* ``...:presence:exp``, a sorted set: session id -> when its entry expires, in
  seconds of the broker's clock (wall time by default: every node agrees).

Presence as Centrifugo keeps it: each script first drops the members whose
expiry has passed (``ZRANGEBYSCORE`` up to ``now``, then ``HDEL``), and the
sorted set decides who is present. Adding or refreshing gives both keys a
``PEXPIRE`` of their latest member's remaining TTL, and the last member out
deletes them, so a deployment that dies leaves no presence keys behind.
``now`` is an argument of every script, never Redis's own clock, so TTLs
follow the broker's clock (a fake one in tests).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis

from rtchat_sdk import protocol as p

from .base import Clock, Page, StreamEntry
from .pages import span
from .redis_lua import _ENSURE_EPOCH

__all__ = ["HISTORY", "PRESENCE_ADD", "PRESENCE_MEMBERS", "PRESENCE_REMOVE", "Reads", "log_entry"]

REFRESH_CHUNK = 500
"""Members per script in ``presence_refresh``: a long script would block Redis meanwhile."""

HISTORY = (
    _ENSURE_EPOCH
    + """
-- KEYS: meta, log
-- ARGV: new epoch, meta ttl ms, horizon (entries appended before it are trimmed),
--       since epoch ("" for none), since offset, limit, reverse ("1"/"0")
local meta, log = KEYS[1], KEYS[2]
local epoch = ensure_epoch(meta, log, ARGV[1], ARGV[2])
local newest = tonumber(redis.call('HGET', meta, 'offset'))
local horizon = tonumber(ARGV[3])

local function appended(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'a' then return tonumber(fields[i + 1]) end
  end
  return nil
end

local function young(offset)
  local found = redis.call('XRANGE', log, offset .. '-0', offset .. '-0')
  return found[1] ~= nil and appended(found[1][2]) >= horizon
end

local oldest = newest + 1
local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
if first[1] then
  local lo = tonumber(string.match(first[1][1], '^(%d+)'))
  if appended(first[1][2]) >= horizon then
    oldest = lo
  else  -- lo is too old, newest + 1 stands for "none young enough"
    local hi = newest + 1
    while hi - lo > 1 do
      local mid = math.floor((lo + hi) / 2)
      if young(mid) then hi = mid else lo = mid end
    end
    oldest = hi
  end
end

-- The anchor only; pages.span decides the page from what this fetches.
local after = nil
if ARGV[4] == epoch and tonumber(ARGV[5]) <= newest then after = tonumber(ARGV[5]) end
local entries = {}
if ARGV[7] == '1' then
  local last = newest
  if after then last = after - 1 end
  if last >= oldest then
    entries = redis.call('XREVRANGE', log, last .. '-0', oldest .. '-0', 'COUNT', ARGV[6])
  end
else
  local start = oldest
  if after and after + 1 > oldest then start = after + 1 end
  if start <= newest then
    entries = redis.call('XRANGE', log, start .. '-0', newest .. '-0', 'COUNT', ARGV[6])
  end
end
return {epoch, newest, oldest, entries}
"""
)
"""The stream's position, its oldest kept offset and at most ``limit`` entries from the
page's anchor (after ``since``, or before it with ``reverse``)."""

_PRESENCE = """
local data, expiry, now = KEYS[1], KEYS[2], tonumber(ARGV[1])

local function purge()
  local gone = redis.call('ZRANGEBYSCORE', expiry, '-inf', ARGV[1])
  for i = 1, #gone, 500 do
    redis.call('HDEL', data, unpack(gone, i, math.min(i + 499, #gone)))
  end
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', expiry, '-inf', ARGV[1])
  end
  return #gone
end

-- The keys live as long as their latest member, and go with the last one.
local function keep()
  local last = redis.call('ZRANGE', expiry, -1, -1, 'WITHSCORES')
  if last[1] then
    local ms = math.max(1, math.ceil((tonumber(last[2]) - now) * 1000))
    redis.call('PEXPIRE', data, ms)
    redis.call('PEXPIRE', expiry, ms)
  else
    redis.call('DEL', data, expiry)
  end
end

local function live()
  local ids = redis.call('ZRANGE', expiry, 0, -1)
  local out = {}
  for i = 1, #ids, 500 do
    local got = redis.call('HMGET', data, unpack(ids, i, math.min(i + 499, #ids)))
    for j = 1, #got do
      if got[j] then out[#out + 1] = got[j] end
    end
  end
  return out
end
"""

PRESENCE_ADD = (
    _PRESENCE
    + """
-- KEYS: data hash, expiry sorted set
-- ARGV: now, expires at, then (session, member JSON) pairs
purge()
local first_new, first = 0, nil
for i = 3, #ARGV, 2 do
  local session = ARGV[i]
  local new = 0
  local stored = nil
  if redis.call('ZSCORE', expiry, session) then
    stored = redis.call('HGET', data, session)
  end
  if not stored then  -- a session already present keeps its entry (and joined_at)
    redis.call('HSET', data, session, ARGV[i + 1])
    stored, new = ARGV[i + 1], 1
  end
  redis.call('ZADD', expiry, ARGV[2], session)
  if i == 3 then first_new, first = new, stored end
end
keep()
return {first_new, first}
"""
)
"""Add or renew members; the first one's stored entry and whether it is new."""

PRESENCE_REMOVE = (
    _PRESENCE
    + """
-- KEYS: data hash, expiry sorted set; ARGV: now, session
purge()
local removed = redis.call('ZREM', expiry, ARGV[2])
redis.call('HDEL', data, ARGV[2])
if redis.call('ZCARD', expiry) == 0 then
  redis.call('DEL', data, expiry)
end
return removed
"""
)
"""Take a session out; 1 if it was present (unexpired)."""

PRESENCE_MEMBERS = (
    _PRESENCE
    + """
-- KEYS: data hash, expiry sorted set; ARGV: now, "stats" or "members"
if purge() > 0 then keep() end
local members = live()
if ARGV[2] ~= 'stats' then return members end
local users, distinct = {}, 0
for _, json in ipairs(members) do
  local user = cjson.decode(json)['user']
  if type(user) == 'string' and not users[user] then
    users[user] = true
    distinct = distinct + 1
  end
end
return {#members, distinct}
"""
)
"""The unexpired members as JSON, or (with "stats") their count and distinct users."""

_SCRIPTS = {
    "HISTORY": HISTORY,
    "PRESENCE_ADD": PRESENCE_ADD,
    "PRESENCE_REMOVE": PRESENCE_REMOVE,
    "PRESENCE_MEMBERS": PRESENCE_MEMBERS,
}


def log_entry(stream: str, epoch: str, item: Sequence[Any]) -> StreamEntry:
    """One ``XRANGE`` item of a stream's log (``redis_lua``'s fields) as its entry."""
    entry_id, flat = item
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    return StreamEntry(
        stream,
        epoch,
        int(entry_id.split("-", 1)[0]),
        fields["t"],
        fields["s"] or None,
        fields["e"] == "1",
        float(fields["a"]),
    )


class Reads:
    """History and presence over the broker's Redis client; Redis errors pass through
    (``RedisBroker`` turns them into ``BrokerUnavailable``)."""

    def __init__(
        self,
        redis: Redis,
        stream_keys: Callable[[str], tuple[str, str]],
        *,
        clock: Clock,
        history_seconds: float,
        meta_ttl_ms: int,
    ) -> None:
        self._redis = redis
        self._stream_keys = stream_keys
        self._clock = clock
        self._history_seconds = history_seconds
        self._meta_ttl_ms = meta_ttl_ms
        self._scripts: dict[str, Any] = {
            name: redis.register_script(source) for name, source in _SCRIPTS.items()
        }

    def _presence_keys(self, stream: str) -> list[str]:
        meta, _ = self._stream_keys(stream)
        tag = meta.removesuffix(":meta")  # the stream's hash tag
        return [f"{tag}:presence", f"{tag}:presence:exp"]

    async def history(
        self, stream: str, since: tuple[str, int] | None, limit: int, reverse: bool
    ) -> Page:
        epoch, newest, oldest, raw = await self._scripts["HISTORY"](
            keys=list(self._stream_keys(stream)),
            args=[
                secrets.token_hex(8),
                self._meta_ttl_ms,
                repr(self._clock() - self._history_seconds),
                "" if since is None else since[0],
                0 if since is None else since[1],
                limit,
                "1" if reverse else "0",
            ],
        )
        page = span(epoch, int(oldest), int(newest), since, limit, reverse)
        entries = [log_entry(stream, epoch, item) for item in raw]
        picked = [e for e in entries if page.lo <= e.offset <= page.hi]
        return Page(picked, epoch, int(newest), page.gap, page.more)

    def _stamped(self, member: p.PresenceMember, now: float) -> str:
        """The member as stored: a ``joined_at`` of 0 becomes the broker's clock."""
        if not member.joined_at:
            member = member.model_copy(update={"joined_at": now})
        return member.model_dump_json()

    async def presence_add(
        self, stream: str, member: p.PresenceMember, ttl: float
    ) -> tuple[p.PresenceMember, bool]:
        now = self._clock()
        new, stored = await self._scripts["PRESENCE_ADD"](
            keys=self._presence_keys(stream),
            args=[repr(now), repr(now + ttl), member.session, self._stamped(member, now)],
        )
        return p.PresenceMember.model_validate_json(stored), bool(new)

    async def presence_refresh(
        self, members: list[tuple[str, p.PresenceMember]], ttl: float
    ) -> None:
        if not members:
            return
        now = self._clock()
        by_stream: dict[str, list[str]] = {}
        for stream, member in members:
            by_stream.setdefault(stream, []).extend((member.session, self._stamped(member, now)))
        script = self._scripts["PRESENCE_ADD"]
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, pairs in by_stream.items():
                keys = self._presence_keys(stream)
                for i in range(0, len(pairs), 2 * REFRESH_CHUNK):
                    chunk = pairs[i : i + 2 * REFRESH_CHUNK]
                    await script(keys=keys, args=[repr(now), repr(now + ttl), *chunk], client=pipe)
            await pipe.execute()

    async def presence_remove(self, stream: str, session_id: str) -> bool:
        removed = await self._scripts["PRESENCE_REMOVE"](
            keys=self._presence_keys(stream), args=[repr(self._clock()), session_id]
        )
        return bool(removed)

    async def presence(self, stream: str) -> list[p.PresenceMember]:
        raw = await self._scripts["PRESENCE_MEMBERS"](
            keys=self._presence_keys(stream), args=[repr(self._clock()), "members"]
        )
        members = [p.PresenceMember.model_validate_json(text) for text in raw]
        return sorted(members, key=lambda m: (m.joined_at, m.session))

    async def presence_stats(self, stream: str) -> tuple[int, int]:
        sessions, users = await self._scripts["PRESENCE_MEMBERS"](
            keys=self._presence_keys(stream), args=[repr(self._clock()), "stats"]
        )
        return int(sessions), int(users)

"""The Redis broker: several server nodes share streams, sessions and dedupe records.

``RedisBroker("redis://HOST:PORT/DB", prefix="rtchat")`` (redis-py's asyncio
client). Every key starts with the prefix, so deployments can share a Redis.
What is kept where (``redis_lua`` has the stream keys):

* streams: a meta hash (epoch, offset) and a log bounded by ``history_size``
  and, on read, by ``history_seconds``; appended, expired and published in one
  Lua script, with the append key's record (resends to any node are
  recognised for ``dedupe_ttl``);
* sessions: ``<prefix>:session:<token>``, the record as JSON with its expiry
  by the broker's clock; Redis expires the key a little later. A record saved
  with no TTL (its connection is live) is kept for ``live_ttl`` and refreshed
  by this node while it holds it, so a node that dies leaves nothing forever;
* dedupe records: ``{<prefix>:dd:<session>}:r`` (replies by message id, and
  ``h``, the highest id) and ``...:ids`` (their ids, to evict the oldest),
  expiring with the session;
* presence (``redis_reads``): per room stream, in its hash tag,
  ``{<prefix>:<stream>}:presence`` (session -> member JSON) and
  ``...:presence:exp`` (session -> expiry by the broker's clock), expired
  members dropped by every script that touches them, the keys expiring with
  their latest member; history pages are read from the stream's log there too;
* fan-out: each stream's channel ``<prefix>:ch:<stream>`` and each node's
  probe channel,
  read by ``redis_relay.Relay``; each node also follows its own stream
  ``node:<node>``, whose entries name the sessions another node took over;
* calls between nodes (``redis_calls``): pub/sub on ``<prefix>:call:<node>``
  and each broker's answers channel, at most ``max_calls`` in flight each way.

Times are the broker's clock, wall time by default (``time.time``): nodes
compare each other's entry times and expiries, which a per-process monotonic
clock cannot give, so ``start(clock)`` does not take the server's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from rtchat_sdk import protocol as p

from ..errors import BrokerUnavailable, FrameTooLarge
from . import redis_lua
from .base import (
    MAX_CALLS,
    Broker,
    CallFailed,
    CallHandler,
    Clock,
    Draft,
    EntryListener,
    Page,
    ReplacedListener,
    Replay,
    SessionRecord,
    StreamEntry,
)
from .calls import Calls
from .redis_calls import NodeCalls
from .redis_reads import Reads, log_entry
from .redis_relay import Relay

__all__ = ["BrokerUnavailable", "RedisBroker"]

log = logging.getLogger("server_ref.redis")

_P = ParamSpec("_P")
_R = TypeVar("_R")

STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
"""What an unreachable, failing or timed-out Redis raises."""


def _store_call(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Redis trouble leaves the broker as ``BrokerUnavailable``, whatever the command."""

    @functools.wraps(method)
    async def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(*args, **kwargs)
        except STORE_ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc!r}") from exc

    return call


class RedisBroker(Broker):
    """Streams, sessions and dedupe records in Redis, shared by every node using it."""

    keeps_append_keys = True  # each for dedupe_ttl: a publish needs no remember_reply

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "rtchat",
        history_size: int = 1_000,
        history_seconds: float = 300.0,
        dedupe_size: int = 2_000,
        dedupe_ttl: float = 3_600.0,
        live_ttl: float = 3_600.0,
        stream_ttl: float = 86_400.0,
        probe_interval: float = 2.0,
        probe_timeout: float = 3.0,
        connect_timeout: float = 3.0,
        max_connections: int = 32,
        max_calls: int = MAX_CALLS,
        clock: Clock | None = None,
    ) -> None:
        limits = (history_size, history_seconds, dedupe_size, dedupe_ttl, live_ttl, stream_ttl)
        if min(limits) <= 0 or min(probe_interval, probe_timeout, max_connections) <= 0:
            raise ValueError("history, dedupe, TTL and probe limits must be positive")
        if not prefix or any(c in prefix for c in "{}\n "):
            raise ValueError(
                f"the key prefix must be non-empty, without braces or spaces: {prefix!r}"
            )
        self.url = url
        self.prefix = prefix
        self.history_size = history_size
        self.history_seconds = history_seconds
        self.dedupe_size = dedupe_size
        self.dedupe_ttl = dedupe_ttl
        self.live_ttl = live_ttl
        self.stream_ttl = stream_ttl
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._connect_timeout = connect_timeout
        self.max_connections = max_connections
        """Redis connections of this node for commands (pub/sub has its own)."""
        self._clock: Clock = clock or time.time
        self._redis: Redis | None = None
        self._relay: Relay | None = None
        self._watchers: dict[str, ReplacedListener] = {}
        self._live: dict[str, str] = {}
        """Tokens of the sessions saved here with no TTL -> their session ids (refreshed)."""
        self._refresher: asyncio.Task[None] | None = None
        self._scripts: dict[str, Any] = {}
        self._calls = Calls(max_calls)
        """Calls between nodes in flight (``max_calls`` each way)."""
        self._node_calls: NodeCalls | None = None
        self._reads: Reads | None = None

    # ------------------------------------------------------------------
    # Keys

    def _stream_keys(self, stream: str) -> tuple[str, str]:
        tag = f"{{{self.prefix}:{stream}}}"
        return f"{tag}:meta", f"{tag}:log"

    def _channel(self, stream: str) -> str:
        return f"{self.prefix}:ch:{stream}"

    @staticmethod
    def _node_stream(node: str) -> str:
        """A node's own stream: the sessions other nodes took over from it, in order."""
        return f"node:{node}"

    def _session_key(self, token: str) -> str:
        return f"{self.prefix}:session:{token}"

    def _dedupe_keys(self, session_id: str) -> tuple[str, str]:
        tag = f"{{{self.prefix}:dd:{session_id}}}"
        return f"{tag}:r", f"{tag}:ids"

    # ------------------------------------------------------------------
    # Life cycle

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("the Redis broker is not started")
        return self._redis

    async def start(self, clock: Clock | None = None) -> None:
        """Connect; raises ``BrokerUnavailable`` if Redis does not answer in time."""
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,  # then callers wait for one, up to timeout
            timeout=max(5.0, self._connect_timeout),
            decode_responses=True,
            socket_connect_timeout=self._connect_timeout,
            socket_timeout=max(5.0, self._connect_timeout),
            retry=Retry(NoBackoff(), 0),  # the callers see each failure: no hidden resubscribe
        )
        self._redis = Redis.from_pool(pool)  # closing the client closes the pool
        try:
            await asyncio.wait_for(self._redis.ping(), self._connect_timeout)
            for name in redis_lua.__all__:
                self._scripts[name] = self._redis.register_script(getattr(redis_lua, name))
            self._reads = Reads(
                self._redis,
                self._stream_keys,
                clock=self._clock,
                history_seconds=self.history_seconds,
                meta_ttl_ms=self._ms(self.stream_ttl),
            )
            self._relay = Relay(
                self._redis,
                self.read_since,
                self._redis_position,
                self._rewound,
                probe_channel=f"{self.prefix}:probe:{secrets.token_hex(8)}",
                probe_interval=self._probe_interval,
                probe_timeout=self._probe_timeout,
                clock=self._clock,
            )
            await self._relay.start(self._connect_timeout)
            self._node_calls = NodeCalls(self._redis, self._relay, self.prefix, self._calls)
            await self._node_calls.start()
        except (RedisError, OSError, TimeoutError) as exc:
            await self.close()
            raise BrokerUnavailable(f"cannot reach Redis at {self.url}: {exc}") from exc
        self._refresher = asyncio.create_task(self._refresh_live(), name="rtchat-redis-refresh")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._node_calls is not None:
            await self._node_calls.close()
            self._node_calls = None
        if self._relay is not None:
            await self._relay.close()
            self._relay = None
        self._reads = None
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.aclose()
            self._redis = None

    def health(self) -> str | None:
        """Why this node cannot be trusted to deliver now (None: it can)."""
        if self._relay is None:
            return "the Redis broker is not started"
        return self._relay.reason

    def relay_stats(self) -> Relay | None:
        """The pub/sub relay's lag and gap fills (None until started)."""
        return self._relay

    def _ms(self, seconds: float) -> int:
        return max(1, int(seconds * 1000))

    # ------------------------------------------------------------------
    # Streams

    @_store_call
    async def append(self, stream: str, draft: Draft, key: str | None = None) -> StreamEntry:
        meta, log_key = self._stream_keys(stream)
        tag_key = f"{{{self.prefix}:{stream}}}:key:{key}" if key is not None else ""
        now = self._clock()
        result = await self._scripts["APPEND"](
            keys=[meta, log_key, tag_key],
            args=[
                draft.head,
                draft.tail,
                secrets.token_hex(8),
                draft.sender or "",
                "1" if draft.echo else "0",
                draft.max_bytes,
                self.history_size,
                repr(now),
                self._ms(self.dedupe_ttl),
                self._channel(stream),
                self._ms(self.stream_ttl),
                self._ms(max(self.history_seconds, 1.0)),
            ],
        )
        kind = result[0]
        if kind == "big":
            raise FrameTooLarge(
                f"the delivery would be {result[1]} bytes; the limit is {draft.max_bytes}"
            )
        if kind == "dup":
            epoch, offset, at = result[1], int(result[2]), float(result[3])
            text = draft.render(epoch, offset)
            return StreamEntry(stream, epoch, offset, text, draft.sender, draft.echo, at)
        return StreamEntry(
            stream, result[1], int(result[2]), result[3], draft.sender, draft.echo, now
        )

    async def position(self, stream: str) -> tuple[str, int]:
        """A followed stream's position as relayed here (what comes after it will be)."""
        relay = self._relay
        if relay is not None:
            f = relay.follows.get(stream)
            if f is not None and f.ready.is_set():
                return f.epoch, f.offset
        return await self._redis_position(stream)

    @_store_call
    async def _redis_position(self, stream: str) -> tuple[str, int]:
        meta, log_key = self._stream_keys(stream)
        epoch, offset = await self._scripts["POSITION"](
            keys=[meta, log_key], args=[secrets.token_hex(8), self._ms(self.stream_ttl)]
        )
        return epoch, int(offset)

    @_store_call
    async def _rewound(self, stream: str, epoch: str, offset: int) -> bool:
        """A new epoch if the stream is behind ``offset`` of ``epoch``, as a node saw it."""
        meta, log_key = self._stream_keys(stream)
        started = await self._scripts["REWOUND"](
            keys=[meta, log_key],
            args=[epoch, offset, secrets.token_hex(8), self._ms(self.stream_ttl)],
        )
        if started:
            log.warning("stream %s was behind offset %d: a new epoch begins", stream, offset)
        return bool(started)

    @_store_call
    async def read_since(self, stream: str, epoch: str, offset: int) -> Replay:
        meta, log_key = self._stream_keys(stream)
        current, newest, oldest, raw = await self._scripts["READ"](
            keys=[meta, log_key],
            args=[secrets.token_hex(8), self._ms(self.stream_ttl), epoch, offset],
        )
        newest, oldest = int(newest), int(oldest)
        horizon = self._clock() - self.history_seconds
        entries = [log_entry(stream, current, item) for item in raw]
        fresh = [e for e in entries if e.at >= horizon]
        if len(fresh) < len(entries):  # entries past their age count as trimmed
            oldest = max(oldest, fresh[0].offset if fresh else newest + 1)
        gap: str | None = None
        if epoch != current or offset > newest:
            gap, offset = "epoch_changed", 0
        if offset + 1 < oldest:
            gap, offset = gap or "trimmed", oldest - 1
        if gap is None and offset == newest:
            return Replay([], current, newest)
        return Replay([e for e in fresh if e.offset > offset], current, newest, gap, offset)

    @_store_call
    async def subscribe(self, stream: str, listener: EntryListener) -> None:
        assert self._relay is not None, "the Redis broker is not started"
        await self._relay.follow(stream, self._channel(stream), listener)

    @_store_call
    async def unsubscribe(self, stream: str, listener: EntryListener) -> None:
        if self._relay is not None:
            await self._relay.unfollow(stream, listener)

    # ------------------------------------------------------------------
    # History and presence: redis_reads

    @property
    def reads(self) -> Reads:
        if self._reads is None:
            raise RuntimeError("the Redis broker is not started")
        return self._reads

    @_store_call
    async def history(
        self, stream: str, since: tuple[str, int] | None, limit: int, reverse: bool
    ) -> Page:
        return await self.reads.history(stream, since, limit, reverse)

    @_store_call
    async def presence_add(
        self, stream: str, member: p.PresenceMember, ttl: float
    ) -> tuple[p.PresenceMember, bool]:
        return await self.reads.presence_add(stream, member, ttl)

    @_store_call
    async def presence_refresh(
        self, members: list[tuple[str, p.PresenceMember]], ttl: float
    ) -> None:
        await self.reads.presence_refresh(members, ttl)

    @_store_call
    async def presence_remove(self, stream: str, session_id: str) -> bool:
        return await self.reads.presence_remove(stream, session_id)

    @_store_call
    async def presence(self, stream: str) -> list[p.PresenceMember]:
        return await self.reads.presence(stream)

    @_store_call
    async def presence_stats(self, stream: str) -> tuple[int, int]:
        return await self.reads.presence_stats(stream)

    # ------------------------------------------------------------------
    # Sessions

    @_store_call
    async def save_session(self, record: SessionRecord, ttl: float | None) -> None:
        now = self._clock()
        keep = self.live_ttl if ttl is None else ttl
        data = {
            "id": record.id,
            "token": record.token,
            "user": record.user,
            "rooms": [
                [ns, room, epoch, offset] for (ns, room), (epoch, offset) in record.rooms.items()
            ],
            "previous": record.previous,
            "owner": record.owner,
            "expires": None if ttl is None else now + ttl,
        }
        margin = 60.0  # Redis drops the key a little after the record's own expiry
        replies, ids = self._dedupe_keys(record.id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._session_key(record.token), json.dumps(data), px=self._ms(keep + margin))
            pipe.pexpire(replies, self._ms(keep + margin))
            pipe.pexpire(ids, self._ms(keep + margin))
            await pipe.execute()
        if ttl is None:
            self._live[record.token] = record.id
        else:
            self._live.pop(record.token, None)

    @_store_call
    async def load_session(self, token: str) -> SessionRecord | None:
        raw = await self.redis.get(self._session_key(token))
        if raw is None:
            return None
        data = json.loads(raw)
        expires = data["expires"]
        if expires is not None and self._clock() >= expires:
            return None
        return SessionRecord(
            data["id"],
            data["token"],
            data["user"],
            {(ns, room): (epoch, offset) for ns, room, epoch, offset in data["rooms"]},
            list(data["previous"]),
            data["owner"],
        )

    @_store_call
    async def delete_session(self, record: SessionRecord) -> None:
        self._live.pop(record.token, None)
        key = self._session_key(record.token)
        raw = await self.redis.get(key)
        if raw is not None and json.loads(raw)["id"] == record.id:
            await self.redis.delete(key)
        await self.redis.delete(*self._dedupe_keys(record.id))

    async def _refresh_live(self) -> None:
        """Keep the records of sessions connected here alive past ``live_ttl``."""
        while True:
            await asyncio.sleep(self.live_ttl / 3)
            live = dict(self._live)
            if not live:
                continue
            ms = self._ms(self.live_ttl + 60.0)
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for token, session_id in live.items():
                        pipe.pexpire(self._session_key(token), ms)
                        for key in self._dedupe_keys(session_id):
                            pipe.pexpire(key, ms)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("could not refresh live sessions' TTLs: %s", exc)

    async def watch_replaced(self, node: str, listener: ReplacedListener) -> None:
        self._watchers[node] = listener
        await self.subscribe(self._node_stream(node), self._replaced_entry)

    async def unwatch_replaced(self, node: str) -> None:
        self._watchers.pop(node, None)
        await self.unsubscribe(self._node_stream(node), self._replaced_entry)

    def _replaced_entry(self, entry: StreamEntry) -> None:
        listener = self._watchers.get(entry.stream.removeprefix("node:"))
        if listener is not None:
            listener(entry.text.split(",", 1)[0])  # the text starts with the session id

    @_store_call
    async def replace(self, owner: str, session_id: str) -> None:
        # An entry of the owner's stream, not a bare PUBLISH: the relay's gap
        # filling then covers a replacement published while its pub/sub was down.
        await self.append(self._node_stream(owner), Draft(session_id, "", None, False, 1 << 16))

    # ------------------------------------------------------------------
    # Dedupe records

    @_store_call
    async def recall_reply(self, session_id: str, message_id: int) -> tuple[bool, str | None]:
        replies, _ = self._dedupe_keys(session_id)
        highest, floor, reply = await self.redis.hmget(replies, ["h", "f", str(message_id)])
        if highest is None or message_id > int(highest):
            return False, None
        if reply is not None:
            return True, str(reply)
        return message_id <= int(floor or 0), None  # the floor: see redis_lua.REMEMBER_REPLY

    @_store_call
    async def remember_reply(self, session_id: str, message_id: int, reply: str) -> None:
        replies, ids = self._dedupe_keys(session_id)
        await self._scripts["REMEMBER_REPLY"](
            keys=[replies, ids],
            args=[message_id, reply, self.dedupe_size, self._ms(self.live_ttl + 60.0)],
        )

    @_store_call
    async def forget_replies(self, session_id: str, upto: int) -> None:
        replies, ids = self._dedupe_keys(session_id)
        await self._scripts["FORGET_REPLIES"](keys=[replies, ids], args=[upto])

    # ------------------------------------------------------------------
    # Calls between nodes

    @property
    def node_calls(self) -> NodeCalls:
        if self._node_calls is None:
            raise RuntimeError("the Redis broker is not started")
        return self._node_calls

    @_store_call
    async def serve_node(self, node: str, handler: CallHandler) -> None:
        await self.node_calls.serve(node, handler)

    async def unserve_node(self, node: str) -> None:
        if self._node_calls is not None:  # a closed broker serves nothing already
            with contextlib.suppress(*STORE_ERRORS):
                await self._node_calls.unserve(node)

    async def call_node(self, node: str, payload: str, timeout: float) -> str:
        try:  # not _store_call: CallTimeout is a TimeoutError (an OSError), and must stay one
            return await self.node_calls.call(node, payload, timeout)
        except CallFailed:
            raise
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis: {exc!r}") from exc

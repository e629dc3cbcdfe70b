"""The Redis broker's pub/sub side: every entry of a followed stream, in order, once.

Redis pub/sub drops what is published while a subscriber's connection is
down, and a wedged connection can look healthy. The relay does not trust it:

* it keeps, per followed stream, the (epoch, offset) it last relayed; an
  entry that skips offsets is preceded by the skipped ones, read from the
  stream's log (``fill``), and one already relayed is dropped;
* when its connection drops it reconnects with backoff (tenacity), then fills
  every followed stream from its last relayed offset before relaying anything
  newer, so nothing published meanwhile is missed; a stream found behind
  what was relayed (Redis failed over to a replica that had not caught up)
  starts a new epoch rather than reuse offsets;
* every ``probe_interval`` it publishes a probe on the node's own channel; a
  probe that does not come back within ``probe_timeout`` means the
  connection is wedged: the node reports not ready and the relay reconnects;
* plain channels (``listen``: the calls between nodes, ``redis_calls``) ride
  the same connection, resubscribed with it, with no offsets: what they lose
  while it is down is lost, and their callers ask again.

One task reads the connection; subscribes are written from the callers' tasks
and confirmed through the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from ..core.stats import LAG_BOUNDS, Buckets
from .base import EntryListener, Replay, StreamEntry

__all__ = ["Follow", "Relay", "parse_entry"]

log = logging.getLogger("server_ref.redis")

_DOWN = (RedisError, OSError, asyncio.TimeoutError)
"""What a lost or refused Redis connection raises."""


def parse_entry(stream: str, data: str) -> StreamEntry:
    """An entry from its pub/sub message (``redis_lua``: fields joined by newlines)."""
    epoch, offset, sender, echo, at, text = data.split("\n", 5)
    return StreamEntry(stream, epoch, int(offset), text, sender or None, echo == "1", float(at))


@dataclass(slots=True)
class Follow:
    """One followed stream: its listeners and the position last relayed to them."""

    stream: str
    channel: str
    listeners: list[EntryListener] = field(default_factory=list)
    epoch: str = ""
    offset: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the position is known; entries that come earlier wait in ``early``."""
    early: list[StreamEntry] = field(default_factory=list)


Reader = Callable[[str, str, int], Awaitable[Replay]]
"""``read_since(stream, epoch, offset)``: the log after a position."""
Position = Callable[[str], Awaitable[tuple[str, int]]]
"""``position(stream)``: the stream's epoch and newest offset, from Redis."""
Rewound = Callable[[str, str, int], Awaitable[bool]]
"""``rewound(stream, epoch, offset)``: start a new epoch if the stream is behind that."""


class Relay:
    """Pub/sub subscriptions of one node, and the probe that proves them alive."""

    def __init__(
        self,
        redis: Redis,
        read_since: Reader,
        position: Position,
        rewound: Rewound,
        *,
        probe_channel: str,
        probe_interval: float,
        probe_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._clock = clock
        """The broker's clock, which stamped each entry's ``at``: wall time, as every
        node's is, so the lag below holds across nodes (within their clock skew)."""
        self._read_since = read_since
        self._position = position
        self._rewound = rewound
        self._probe_channel = probe_channel
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self.follows: dict[str, Follow] = {}
        self._by_channel: dict[str, Follow] = {}
        self._plain: dict[str, Callable[[str], None]] = {}
        """Channels ``listen`` follows -> what gets each message."""
        self._pubsub: PubSub | None = None
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._connected = asyncio.Event()
        self._probe_sent = 0
        self._probe_back = 0
        self._probe_sent_at = 0.0
        self._reason: str | None = "pub/sub not connected yet"
        self.history: deque[tuple[float, str | None]] = deque(maxlen=64)
        """The latest changes of ``reason``, with their (monotonic) times."""
        self.reconnects = 0
        """Pub/sub connections made after the first (a drop, a wedge)."""
        self.gap_fills = 0
        """Entries relayed from the log because pub/sub skipped or lost them."""
        self.lag = Buckets(LAG_BOUNDS)
        """Seconds from each entry's append to its hand-over here (``rtchat_pubsub_lag``)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    @property
    def reason(self) -> str | None:
        """Why the relay cannot be trusted now, or None."""
        return self._reason

    @reason.setter
    def reason(self, reason: str | None) -> None:
        if reason != self._reason:
            self._reason = reason
            self.history.append((time.monotonic(), reason))

    async def start(self, timeout: float) -> None:
        """Connect and start reading; raises if Redis cannot be reached within ``timeout``."""
        self._tasks.append(asyncio.create_task(self._run(), name="rtchat-redis-relay"))
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            await self.close()
            raise
        self._tasks.append(asyncio.create_task(self._probe(), name="rtchat-redis-probe"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, *_DOWN):
                await task
        self._tasks.clear()
        if self._pubsub is not None:
            with contextlib.suppress(*_DOWN):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2
            self._pubsub = None

    # ------------------------------------------------------------------
    # Following streams

    async def follow(self, stream: str, channel: str, listener: EntryListener) -> None:
        """Relay the entries of ``stream`` to ``listener`` from now on."""
        f = self.follows.get(stream)
        if f is not None:
            f.listeners.append(listener)
            await f.ready.wait()
            return
        f = self.follows[stream] = self._by_channel[channel] = Follow(stream, channel, [listener])
        try:
            await self._subscribe(channel)
            f.epoch, f.offset = await self._position(stream)
            while f.early:  # what came between the subscribe and the position
                early, f.early = f.early, []
                for entry in early:
                    if entry.epoch == f.epoch and entry.offset <= f.offset:
                        continue
                    if entry.epoch == f.epoch and entry.offset == f.offset + 1:
                        self._hand_on(f, entry)
                    else:
                        await self._fill(f)
        except BaseException:
            self._forget(f)
            raise
        f.ready.set()

    async def unfollow(self, stream: str, listener: EntryListener) -> None:
        f = self.follows.get(stream)
        if f is None or listener not in f.listeners:
            return
        f.listeners.remove(listener)
        if not f.listeners:
            self._forget(f)
            if self._pubsub is not None:
                with contextlib.suppress(*_DOWN):
                    await self._pubsub.unsubscribe(f.channel)

    async def listen(self, channel: str, listener: Callable[[str], None]) -> None:
        """Call ``listener`` with each message of ``channel`` from now on (no offsets)."""
        self._plain[channel] = listener
        try:
            await self._subscribe(channel)
        except BaseException:
            self._plain.pop(channel, None)
            raise

    async def unlisten(self, channel: str) -> None:
        if self._plain.pop(channel, None) is not None and self._pubsub is not None:
            with contextlib.suppress(*_DOWN):
                await self._pubsub.unsubscribe(channel)

    def _forget(self, f: Follow) -> None:
        self.follows.pop(f.stream, None)
        self._by_channel.pop(f.channel, None)

    async def _subscribe(self, channel: str) -> None:
        """Subscribe and return once Redis confirmed it (messages flow from then on)."""
        await self._connected.wait()
        pubsub = self._pubsub
        assert pubsub is not None
        confirmed = self._confirmed.setdefault(channel, asyncio.Future())
        await pubsub.subscribe(channel)
        await asyncio.wait_for(asyncio.shield(confirmed), self._probe_timeout)

    # ------------------------------------------------------------------
    # Reading

    async def _run(self) -> None:
        """Read messages; on a lost connection, reconnect with backoff and fill the gaps."""
        while True:
            retrying = AsyncRetrying(
                wait=wait_random_exponential(multiplier=0.05, max=2.0),
                retry=retry_if_exception_type(Exception),
                before_sleep=lambda state: log.warning(
                    "redis pub/sub unavailable (%s); retrying",
                    state.outcome.exception() if state.outcome is not None else None,
                ),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    pubsub = await self._connect()
            try:
                await self._read(pubsub)
            except Exception as exc:  # whatever the connection raised: start again, never stop
                log.warning("redis pub/sub connection lost (%r); reconnecting", exc)
            self.reason = "pub/sub connection lost; reconnecting"
            self._connected.clear()
            self._pubsub = None
            with contextlib.suppress(*_DOWN):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2

    async def _connect(self) -> PubSub:
        """A new subscription with every channel followed; each stream filled up to now."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=False)
        try:
            channels = [self._probe_channel, *self._by_channel, *self._plain]
            await pubsub.subscribe(*channels)
            pending = set(channels)
            while pending:  # the confirmations, in order
                message = await pubsub.get_message(timeout=self._probe_timeout)
                if message is None:
                    raise TimeoutError("no subscribe confirmation from redis")
                if message["type"] == "subscribe":
                    pending.discard(message["channel"])
            self._pubsub = pubsub
            for f in list(self.follows.values()):
                if f.ready.is_set():
                    # Behind what we relayed (a failover to a lagging replica): a new epoch,
                    # so no offset is used twice; its entries then come as a new epoch.
                    await self._rewound(f.stream, f.epoch, f.offset)
                    await self._fill(f)
        except BaseException:
            self._pubsub = None
            with contextlib.suppress(*_DOWN):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2
            raise
        self._probe_sent = self._probe_back
        if self._started:
            self.reconnects += 1
        self._started = True
        self.reason = None
        self._connected.set()
        return pubsub

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind, channel, data = message["type"], message["channel"], message["data"]
            if kind == "message":
                f = self._by_channel.get(channel)
                if f is not None:
                    entry = parse_entry(f.stream, data)
                    if f.ready.is_set():
                        await self._relay(f, entry)
                    else:
                        f.early.append(entry)
                elif channel in self._plain:
                    try:
                        self._plain[channel](data)
                    except Exception:
                        log.exception("a channel listener raised")
                elif channel == self._probe_channel:
                    self._took(data)
            elif kind == "subscribe":
                confirmed = self._confirmed.pop(channel, None)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)

    def _took(self, data: str) -> None:
        """A probe came back: the subscription delivers."""
        self._probe_back = max(self._probe_back, int(data.removeprefix("probe:")))
        if self._probe_back >= self._probe_sent:
            self.reason = None

    async def _relay(self, f: Follow, entry: StreamEntry) -> None:
        """Hand ``entry`` on after any entries it skipped; drop it if relayed already."""
        if entry.epoch == f.epoch and entry.offset <= f.offset:
            return
        if entry.epoch != f.epoch or entry.offset > f.offset + 1:
            await self._fill(f)
            if entry.epoch == f.epoch and entry.offset <= f.offset:
                return  # the fill brought it
        self._hand_on(f, entry)

    async def _fill(self, f: Follow) -> None:
        """Relay what the log holds after the last relayed position."""
        replay = await self._read_since(f.stream, f.epoch, f.offset)
        for entry in replay.entries:
            self.gap_fills += 1
            self._hand_on(f, entry)

    def _hand_on(self, f: Follow, entry: StreamEntry) -> None:
        f.epoch, f.offset = entry.epoch, entry.offset
        self.lag.observe(max(0.0, self._clock() - entry.at))  # 0: a clock behind the appender's
        for listener in tuple(f.listeners):
            try:
                listener(entry)
            except Exception:
                log.exception("a stream listener raised")

    # ------------------------------------------------------------------
    # Proving the subscription alive

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            now = time.monotonic()
            if self._connected.is_set():
                overdue = self._probe_sent > self._probe_back
                if overdue and now - self._probe_sent_at > self._probe_timeout:
                    self.reason = f"a pub/sub probe did not come back within {self._probe_timeout}s"
                    log.warning("redis pub/sub looks wedged: reconnecting it")
                    pubsub = self._pubsub
                    if pubsub is not None and pubsub.connection is not None:
                        await pubsub.connection.disconnect()
                    continue
            if self._probe_sent <= self._probe_back:
                self._probe_sent += 1
                self._probe_sent_at = now
            try:  # bounded: a wedged data connection must not stall the checks above
                await asyncio.wait_for(
                    self._redis.publish(self._probe_channel, f"probe:{self._probe_sent}"),
                    self._probe_timeout,
                )
            except _DOWN as exc:
                self.reason = f"redis unavailable: {exc!r}"

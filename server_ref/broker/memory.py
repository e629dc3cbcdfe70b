"""The in-memory broker: the single-node default.

Each stream keeps its newest ``history_size`` entries, none older than
``history_seconds``. A stream's epoch is random and made when the stream is
first used, so after a restart every client's old positions are recognisably
stale and clients are told of the gap instead of silently missing messages.
Sessions expire lazily at their TTL; each keeps the replies to its newest
``dedupe_size`` processed messages, and the newest ``dedupe_size`` append keys
are remembered with the entry they made. Subscribers are called inside
``append``, before it returns. Several servers in one process may share one
``MemoryBroker`` as several nodes share a Redis; a call to a node runs its
handler in a task of this process. Presence entries expire at their TTL by the
broker's clock; their ``joined_at`` is wall time (``wall``).
"""

from __future__ import annotations

import asyncio
import heapq
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from rtchat_sdk import protocol as p

from .base import (
    LATER,
    MAX_CALLS,
    Broker,
    CallHandler,
    CallTimeout,
    Clock,
    Draft,
    EntryListener,
    NodeGone,
    Page,
    ReplacedListener,
    Replay,
    SessionRecord,
    StreamEntry,
)
from .calls import Calls
from .pages import span

__all__ = ["MemoryBroker"]


_NO_ENTRIES: deque[StreamEntry] = deque(maxlen=0)
"""The entries of every stream not appended to yet (never appended to itself)."""


class _Stream:
    __slots__ = ("entries", "epoch", "listeners", "offset")

    def __init__(self) -> None:
        self.epoch = secrets.token_hex(8)
        self.offset = 0
        self.entries: deque[StreamEntry] = _NO_ENTRIES
        """Its newest entries; a stream's own deque is made at its first append (an
        empty deque takes ~600 bytes, and each session has an inbox stream)."""
        self.listeners: list[EntryListener] = []


class _Dedupe:
    """One session's processed ids: the highest, and the newest replies.

    ``order`` holds the ids of ``replies`` oldest first, so evicting the oldest
    is a ``popleft`` (deleting a dict's first key instead costs time in
    proportion to the deleted slots at its front).
    """

    __slots__ = ("floor", "highest", "order", "replies")

    def __init__(self) -> None:
        self.highest = 0
        self.floor = 0
        """The highest id whose reply was evicted or forgotten: processed, not held."""
        self.replies: dict[int, str] = {}
        self.order: deque[int] = deque()


class MemoryBroker(Broker):
    """Streams in this process's memory, bounded by count and age."""

    def __init__(
        self,
        *,
        history_size: int = 1_000,
        history_seconds: float = 300.0,
        dedupe_size: int = 2_000,
        max_calls: int = MAX_CALLS,
        clock: Clock | None = None,
        wall: Clock = time.time,
    ) -> None:
        if history_size < 1 or history_seconds <= 0 or dedupe_size < 1:
            raise ValueError("history and dedupe limits must be positive")
        self._calls = Calls(max_calls)
        self._served: dict[str, CallHandler] = {}
        self.history_size = history_size
        self.history_seconds = history_seconds
        self.dedupe_size = dedupe_size
        self._clock: Clock = clock or time.monotonic
        self._own_clock = clock is not None
        self._wall = wall
        self._presence: dict[str, dict[str, tuple[p.PresenceMember, float]]] = {}
        """Per stream: session id -> (its entry, when it expires by the broker's clock)."""
        self._streams: dict[str, _Stream] = {}
        self._sessions: dict[str, tuple[SessionRecord, float | None]] = {}
        self._dedupe: dict[str, _Dedupe] = {}
        self._expiries: list[tuple[float, str]] = []
        self._appended: OrderedDict[str, StreamEntry] = OrderedDict()
        self._watchers: dict[str, ReplacedListener] = {}
        cls = type(self)
        self._at_once: dict[str, Callable[..., Any]] = {
            name: at_once
            for name, at_once in (
                ("recall_reply", self._recall),
                ("remember_reply", self._remember),
                ("position", self._position),
            )
            if getattr(cls, name) is getattr(MemoryBroker, name)
        }
        """What ``answer_now`` answers: not a method a subclass overrides (it awaits its own)."""

    async def start(self, clock: Clock | None = None) -> None:
        """Take the server's clock, unless one was given when the broker was made."""
        if clock is not None and not self._own_clock:
            self._clock = clock

    async def close(self) -> None:
        await self._calls.close()

    def _stream(self, name: str) -> _Stream:
        stream = self._streams.get(name)
        if stream is None:
            stream = self._streams[name] = _Stream()
        return stream

    def _trim(self, stream: _Stream, now: float) -> None:
        horizon = now - self.history_seconds
        entries = stream.entries
        while entries and entries[0].at < horizon:
            entries.popleft()

    async def append(self, stream: str, draft: Draft, key: str | None = None) -> StreamEntry:
        if key is not None:
            earlier = self._appended.get(key)
            if earlier is not None:
                return earlier
        s = self._stream(stream)
        now = self._clock()
        text = draft.render(s.epoch, s.offset + 1)  # may raise: then nothing is numbered
        s.offset += 1
        entry = StreamEntry(stream, s.epoch, s.offset, text, draft.sender, draft.echo, now)
        if s.entries is _NO_ENTRIES:
            s.entries = deque(maxlen=self.history_size)
        s.entries.append(entry)
        self._trim(s, now)
        if key is not None:
            self._appended[key] = entry
            if len(self._appended) > self.dedupe_size:
                self._appended.popitem(last=False)
        for listener in tuple(s.listeners):
            listener(entry)
        return entry

    async def position(self, stream: str) -> tuple[str, int]:
        return self._position(stream)

    def _position(self, stream: str) -> tuple[str, int]:
        s = self._stream(stream)
        return s.epoch, s.offset

    async def read_since(self, stream: str, epoch: str, offset: int) -> Replay:
        s = self._stream(stream)
        self._trim(s, self._clock())
        gap: str | None = None
        if epoch != s.epoch or offset > s.offset:
            gap, offset = "epoch_changed", 0
        oldest = s.entries[0].offset if s.entries else s.offset + 1
        if offset + 1 < oldest:
            gap, offset = gap or "trimmed", oldest - 1
        if gap is None and offset == s.offset:
            return Replay([], s.epoch, s.offset)
        entries = [s.entries[i] for i in range(offset + 1 - oldest, len(s.entries))]
        return Replay(entries, s.epoch, s.offset, gap, offset)

    async def history(
        self, stream: str, since: tuple[str, int] | None, limit: int, reverse: bool
    ) -> Page:
        s = self._stream(stream)
        self._trim(s, self._clock())
        entries = s.entries
        oldest = entries[0].offset if entries else s.offset + 1
        page = span(s.epoch, oldest, s.offset, since, limit, reverse)
        picked = [entries[o - oldest] for o in range(page.lo, page.hi + 1)]
        if reverse:
            picked.reverse()
        return Page(picked, s.epoch, s.offset, page.gap, page.more)

    async def subscribe(self, stream: str, listener: EntryListener) -> None:
        self._stream(stream).listeners.append(listener)

    async def unsubscribe(self, stream: str, listener: EntryListener) -> None:
        s = self._streams.get(stream)
        if s is not None and listener in s.listeners:
            s.listeners.remove(listener)

    async def presence_add(
        self, stream: str, member: p.PresenceMember, ttl: float
    ) -> tuple[p.PresenceMember, bool]:
        now = self._clock()
        members = self._presence.setdefault(stream, self._present(stream, now))
        found = members.get(member.session)
        if found is not None:
            member = found[0]
        elif not member.joined_at:
            member = member.model_copy(update={"joined_at": self._wall()})
        members[member.session] = (member, now + ttl)
        return member, found is None

    async def presence_refresh(
        self, members: list[tuple[str, p.PresenceMember]], ttl: float
    ) -> None:
        for stream, member in members:
            await self.presence_add(stream, member, ttl)

    async def presence_remove(self, stream: str, session_id: str) -> bool:
        members = self._present(stream, self._clock())
        found = members.pop(session_id, None) is not None
        if not members:
            self._presence.pop(stream, None)  # no empty dicts left behind for read-only rooms
        return found

    async def presence(self, stream: str) -> list[p.PresenceMember]:
        members = self._present(stream, self._clock())
        if not members:
            self._presence.pop(stream, None)
        return sorted((m for m, _ in members.values()), key=lambda m: (m.joined_at, m.session))

    async def presence_stats(self, stream: str) -> tuple[int, int]:
        members = self._present(stream, self._clock())
        users = {m.user for m, _ in members.values() if m.user is not None}
        return len(members), len(users)

    def _present(self, stream: str, now: float) -> dict[str, tuple[p.PresenceMember, float]]:
        """``stream``'s presence entries, the expired ones dropped (a new dict if none)."""
        members = self._presence.get(stream)
        if members is None:
            return {}
        for session_id in [sid for sid, (_, expires) in members.items() if expires <= now]:
            del members[session_id]
        return members

    async def save_session(self, record: SessionRecord, ttl: float | None) -> None:
        now = self._clock()
        self._purge_expired(now)
        expires = None if ttl is None else now + ttl
        self._sessions[record.token] = (record, expires)
        if expires is not None:
            heapq.heappush(self._expiries, (expires, record.token))

    def _purge_expired(self, now: float) -> None:
        """Drop sessions past their TTL, so unclaimed ones do not pile up."""
        while self._expiries and self._expiries[0][0] <= now:
            _, token = heapq.heappop(self._expiries)
            found = self._sessions.get(token)
            if found is not None and found[1] is not None and found[1] <= now:
                del self._sessions[token]
                self._dedupe.pop(found[0].id, None)

    async def load_session(self, token: str) -> SessionRecord | None:
        found = self._sessions.get(token)
        if found is None:
            return None
        record, expires = found
        if expires is not None and self._clock() >= expires:
            await self.delete_session(record)
            return None
        return record

    async def delete_session(self, record: SessionRecord) -> None:
        found = self._sessions.get(record.token)
        if found is not None and found[0] is record:
            del self._sessions[record.token]
        self._dedupe.pop(record.id, None)

    async def watch_replaced(self, node: str, listener: ReplacedListener) -> None:
        self._watchers[node] = listener

    async def unwatch_replaced(self, node: str) -> None:
        self._watchers.pop(node, None)

    async def replace(self, owner: str, session_id: str) -> None:
        listener = self._watchers.get(owner)
        if listener is not None:
            listener(session_id)

    def answer_now(self, method: str, args: tuple[Any, ...]) -> Any:
        """The dedupe records and positions are plain dicts here: answered at once."""
        at_once = self._at_once.get(method)
        return LATER if at_once is None else at_once(*args)

    async def recall_reply(self, session_id: str, message_id: int) -> tuple[bool, str | None]:
        return self._recall(session_id, message_id)

    def _recall(self, session_id: str, message_id: int) -> tuple[bool, str | None]:
        dedupe = self._dedupe.get(session_id)
        if dedupe is None or message_id > dedupe.highest:
            return False, None
        reply = dedupe.replies.get(message_id)
        if reply is not None:
            return True, reply
        # Not held: processed if at or below the floor (evicted or forgotten); an id
        # above it was never processed (it was answered ``unavailable``).
        return message_id <= dedupe.floor, None

    async def remember_reply(self, session_id: str, message_id: int, reply: str) -> None:
        self._remember(session_id, message_id, reply)

    def _remember(self, session_id: str, message_id: int, reply: str) -> None:
        dedupe = self._dedupe.get(session_id)
        if dedupe is None:
            dedupe = self._dedupe[session_id] = _Dedupe()
        if message_id > dedupe.highest:
            dedupe.highest = message_id
        replies = dedupe.replies
        if message_id not in replies:
            dedupe.order.append(message_id)
        replies[message_id] = reply
        if len(replies) > self.dedupe_size:
            evicted = dedupe.order.popleft()
            del replies[evicted]
            if evicted > dedupe.floor:  # (not max(): this runs for every message)
                dedupe.floor = evicted

    async def forget_replies(self, session_id: str, upto: int) -> None:
        dedupe = self._dedupe.get(session_id)
        if dedupe is None:
            return
        dedupe.replies = {i: r for i, r in dedupe.replies.items() if i > upto}
        dedupe.order = deque(dedupe.replies)
        dedupe.floor = max(dedupe.floor, min(upto, dedupe.highest))

    async def serve_node(self, node: str, handler: CallHandler) -> None:
        self._served[node] = handler

    async def unserve_node(self, node: str) -> None:
        self._served.pop(node, None)

    async def call_node(self, node: str, payload: str, timeout: float) -> str:
        handler = self._served.get(node)
        if handler is None:
            raise NodeGone(f"no node serves {node!r}")
        with self._calls.making():
            answer: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

            async def run() -> None:  # a task of its own: a timeout does not cut it short
                got = await self._calls.answer(handler, payload)
                if not answer.done():
                    answer.set_result(got)

            self._calls.spawn(run())
            try:
                kind, text = await asyncio.wait_for(answer, timeout)
            except TimeoutError as exc:
                raise CallTimeout(f"no answer from node {node!r} within {timeout}s") from exc
        return Calls.outcome(node, kind, text)

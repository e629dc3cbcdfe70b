"""The in-memory broker: the single-node default.

Each stream keeps its newest ``history_size`` entries, none older than
``history_seconds``. A stream's epoch is random and made when the stream is
first used, so after a restart every client's old positions are recognisably
stale and clients are told of the gap instead of silently missing messages.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from typing import TYPE_CHECKING

from .base import Broker, FrameBuilder, Listener, Replay, StreamEntry

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["MemoryBroker"]


class _Stream:
    __slots__ = ("entries", "epoch", "listeners", "offset")

    def __init__(self, history_size: int) -> None:
        self.epoch = secrets.token_hex(8)
        self.offset = 0
        self.entries: deque[StreamEntry] = deque(maxlen=history_size)
        self.listeners: list[Listener] = []


class MemoryBroker(Broker):
    """Streams in this process's memory, bounded by count and age."""

    def __init__(
        self,
        *,
        history_size: int = 1_000,
        history_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if history_size < 1 or history_seconds <= 0:
            raise ValueError("history limits must be positive")
        self.history_size = history_size
        self.history_seconds = history_seconds
        self._clock = clock
        self._streams: dict[str, _Stream] = {}

    def _stream(self, name: str) -> _Stream:
        stream = self._streams.get(name)
        if stream is None:
            stream = self._streams[name] = _Stream(self.history_size)
        return stream

    def _trim(self, stream: _Stream, now: float) -> None:
        horizon = now - self.history_seconds
        entries = stream.entries
        while entries and entries[0].at < horizon:
            entries.popleft()

    async def append(
        self, stream: str, build: FrameBuilder, *, sender: str | None, echo: bool = False
    ) -> StreamEntry:
        s = self._stream(stream)
        now = self._clock()
        s.offset += 1
        entry = StreamEntry(stream, s.epoch, s.offset, build(s.epoch, s.offset), sender, echo, now)
        s.entries.append(entry)
        self._trim(s, now)
        for listener in tuple(s.listeners):
            listener(entry)
        return entry

    async def position(self, stream: str) -> tuple[str, int]:
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

    def subscribe(self, stream: str, listener: Listener) -> None:
        self._stream(stream).listeners.append(listener)

    def unsubscribe(self, stream: str, listener: Listener) -> None:
        s = self._streams.get(stream)
        if s is not None and listener in s.listeners:
            s.listeners.remove(listener)

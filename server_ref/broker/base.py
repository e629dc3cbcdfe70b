"""The Broker interface: where shared server state lives.

Three kinds of state, and the server knows each only through this interface,
so one node can keep them in memory and several nodes can share them through
Redis:

* streams: history and offsets. Appending is atomic and numbers the entry
  (epoch, offset); listeners of a stream get every appended entry in offset
  order, on every node;
* resumable sessions: who a token belongs to and which rooms it is in, kept
  for a TTL after its connection drops;
* dedupe records: per session, which message ids were processed and the
  replies they got, so a resent message is answered again, not run again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Broker", "FrameBuilder", "Listener", "Replay", "SessionRecord", "StreamEntry"]


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One appended message: its position, its encoded delivery frame, its origin."""

    stream: str
    epoch: str
    offset: int
    text: str
    sender: str | None
    echo: bool
    at: float


@dataclass(frozen=True, slots=True)
class Replay:
    """What ``read_since`` found: the entries after a position, or why not."""

    entries: list[StreamEntry]
    epoch: str
    offset: int
    gap: str | None = None
    """None, 'trimmed' (history no longer reaches back) or 'epoch_changed'."""
    gap_offset: int = 0
    """With a gap: the position the reader stands at after it; entries follow it."""


@dataclass(slots=True)
class SessionRecord:
    """The part of a session that outlives its connections."""

    id: str
    token: str
    user: str | None
    rooms: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    """(namespace, room) -> the room stream's (epoch, offset) when joined."""
    previous: list[str] = field(default_factory=list)
    """Ids of lost sessions this one replaced: their publishes are this client's own."""


FrameBuilder = Callable[[str, int], str]
"""Builds the encoded delivery frame once the entry's (epoch, offset) is known."""

Listener = Callable[[StreamEntry], None]


class Broker(ABC):
    """Stream storage and fan-out. Methods are async so a networked store fits."""

    async def start(self) -> None:
        """Connect to whatever backs the broker."""

    async def close(self) -> None:
        """Release connections; the broker is not used afterwards."""

    @abstractmethod
    async def append(
        self, stream: str, build: FrameBuilder, *, sender: str | None, echo: bool = False
    ) -> StreamEntry:
        """Atomically number and store one entry, then hand it to listeners."""

    @abstractmethod
    async def position(self, stream: str) -> tuple[str, int]:
        """The stream's epoch and the offset of its newest entry (0 if none)."""

    @abstractmethod
    async def read_since(self, stream: str, epoch: str, offset: int) -> Replay:
        """Entries after ``offset`` in ``epoch``; with a gap, what is left after it.

        A different epoch means the reader's position is meaningless here: it
        gets gap 'epoch_changed' at offset 0 and every entry still held.
        """

    @abstractmethod
    def subscribe(self, stream: str, listener: Listener) -> None:
        """Call ``listener`` with every entry appended to ``stream`` from now on."""

    @abstractmethod
    def unsubscribe(self, stream: str, listener: Listener) -> None:
        """Stop calling ``listener`` for ``stream``."""

    # ------------------------------------------------------------------
    # Resumable sessions

    @abstractmethod
    async def save_session(self, record: SessionRecord, ttl: float | None) -> None:
        """Store ``record``; it expires ``ttl`` seconds from now (None: never)."""

    @abstractmethod
    async def load_session(self, token: str) -> SessionRecord | None:
        """The live record for ``token``, or None if unknown or expired."""

    @abstractmethod
    async def delete_session(self, record: SessionRecord) -> None:
        """Forget the session and its dedupe records."""

    # ------------------------------------------------------------------
    # Dedupe records

    @abstractmethod
    async def recall_reply(self, session_id: str, message_id: int) -> tuple[bool, str | None]:
        """(was this id already processed?, the reply given, if still held)."""

    @abstractmethod
    async def remember_reply(self, session_id: str, message_id: int, reply: str) -> None:
        """Mark ``message_id`` processed with ``reply``; older replies may be evicted."""

    @abstractmethod
    async def forget_replies(self, session_id: str, upto: int) -> None:
        """The client holds every reply up to ``upto``: they need not be kept."""

"""The Broker interface: where streams (history, offsets) live and fan out.

The server knows streams only through this interface, so one node can keep
them in memory and several nodes can share them through Redis. Appending is
atomic and numbers the entry (epoch, offset); listeners of a stream get every
appended entry in offset order, on every node.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Broker", "FrameBuilder", "Listener", "Replay", "StreamEntry"]


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

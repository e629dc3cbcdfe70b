"""The offline send buffer: messages kept in order until the server replies.

Every emit, request, publish, join and leave goes through the outbox. An
entry leaves it only when the server acknowledges it (reply or error), when
its expiry passes, or when the overflow policy drops it. After a reconnect
the session sends again, in id order, everything still in the outbox; the
server's dedupe makes that safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from .errors import BufferFull
from .protocol import wire_size

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_MESSAGES",
    "Outbox",
    "OutboxEntry",
    "OverflowPolicy",
    "SavedState",
    "HandledPosition",
]

DEFAULT_MAX_MESSAGES = 10_000
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


class OverflowPolicy(StrEnum):
    """What happens when a new message does not fit in the outbox."""

    RAISE = "raise"
    """Refuse the new message with BufferFull; nothing queued is touched."""
    DROP_OLDEST = "drop_oldest"
    """Evict the oldest queued messages (reported to a callback) to make room."""
    BLOCK = "block"
    """Make the sender wait until acknowledgements free enough room."""


@dataclass(slots=True)
class OutboxEntry:
    """One unacknowledged message, already encoded for the wire."""

    id: int
    kind: str
    text: str
    expires_at: float | None = None
    size: int = field(init=False, repr=False, compare=False)
    """Bytes on the wire (UTF-8), as the outbox's byte limit counts them."""

    def __post_init__(self) -> None:
        text = self.text
        self.size = wire_size(text)


@dataclass(slots=True)
class HandledPosition:
    """The last offset handed to the app on one stream, and its epoch."""

    epoch: str
    offset: int
    ns: str
    room: str | None


@dataclass(slots=True)
class SavedState:
    """What a persistent outbox restores after a process restart."""

    session_id: str | None
    token: str | None
    next_id: int
    streams: dict[str, HandledPosition]
    rooms: dict[tuple[str, str], str]


class Outbox:
    """In-memory, ordered, bounded store of unacknowledged messages.

    The ``load_state`` / ``save_*`` hooks do nothing here; a persistent
    outbox overrides them (and ``add`` / ``remove``) to survive a restart.
    """

    def __init__(
        self,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        policy: OverflowPolicy | str = OverflowPolicy.RAISE,
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("outbox limits must be at least 1")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.policy = OverflowPolicy(policy)
        self._entries: dict[int, OutboxEntry] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[OutboxEntry]:
        return iter(list(self._entries.values()))

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._entries

    @property
    def bytes(self) -> int:
        return self._bytes

    def fits(self, size: int) -> bool:
        """Whether a message of ``size`` fits without evicting anything."""
        return len(self._entries) < self.max_messages and self._bytes + size <= self.max_bytes

    def check_size(self, size: int) -> None:
        """Refuse a message that could never fit, whatever the policy."""
        if size > self.max_bytes:
            raise BufferFull(
                f"message of {size} bytes exceeds the outbox byte limit {self.max_bytes}"
            )

    def add(self, entry: OutboxEntry) -> list[OutboxEntry]:
        """Queue ``entry``; returns the entries evicted to make room (drop_oldest).

        Raises BufferFull under the ``raise`` policy (and under ``block``, whose
        waiting is done by the driver before calling this).
        """
        self.check_size(entry.size)
        dropped: list[OutboxEntry] = []
        if not self.fits(entry.size):
            if self.policy is not OverflowPolicy.DROP_OLDEST:
                raise BufferFull(
                    f"outbox full ({len(self._entries)}/{self.max_messages} messages, "
                    f"{self._bytes}/{self.max_bytes} bytes)"
                )
            while self._entries and not self.fits(entry.size):
                oldest = next(iter(self._entries))
                removed = self.remove(oldest)
                assert removed is not None
                dropped.append(removed)
        self._entries[entry.id] = entry
        self._bytes += entry.size
        return dropped

    def get(self, message_id: int) -> OutboxEntry | None:
        return self._entries.get(message_id)

    def remove(self, message_id: int) -> OutboxEntry | None:
        """Forget an entry (acknowledged, expired or dropped)."""
        entry = self._entries.pop(message_id, None)
        if entry is not None:
            self._bytes -= entry.size
        return entry

    def ids(self) -> list[int]:
        """Queued ids in send order."""
        return list(self._entries)

    # ------------------------------------------------------------------
    # Resume state: kept by persistent outboxes only

    def load_state(self) -> SavedState | None:
        """The state saved by an earlier process, or None."""
        return None

    def save_session(
        self, session_id: str | None, token: str | None, rooms: dict[tuple[str, str], str]
    ) -> None:
        """The session to resume and the rooms it is in changed."""

    def save_stream(self, stream: str, position: HandledPosition | None) -> None:
        """A stream's position moved (None: the stream is no longer followed)."""

    def close(self) -> None:
        """Release any resources (files, connections)."""

"""What the client core hands its driver: events, its state, its counters.

Plain frozen dataclasses, so a test compares them with ``==`` and a driver
matches on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .. import protocol as p

__all__ = [
    "Delivered",
    "Dropped",
    "Failed",
    "GapReported",
    "LinkDead",
    "ProtocolViolation",
    "Refused",
    "Replied",
    "RoundTrip",
    "ServerNotice",
    "SessionCounters",
    "SessionEvent",
    "SessionState",
    "TimedOut",
    "Welcomed",
]


class SessionState(StrEnum):
    DISCONNECTED = "disconnected"
    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSED = "closed"


# --------------------------------------------------------------------------
# Events the session hands to the driver


@dataclass(frozen=True, slots=True)
class Welcomed:
    session: str
    resumed: bool


@dataclass(frozen=True, slots=True)
class Replied:
    id: int
    kind: str
    data: Any


@dataclass(frozen=True, slots=True)
class Failed:
    """The server answered message ``id`` with an error."""

    id: int
    kind: str
    code: str
    message: str
    details: Any = None


@dataclass(frozen=True, slots=True)
class TimedOut:
    """Message ``id`` passed its deadline; it has left the outbox for good."""

    id: int
    kind: str


@dataclass(frozen=True, slots=True)
class Dropped:
    """Message ``id`` was evicted by the drop-oldest overflow policy."""

    id: int
    kind: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The server refused the handshake (fatal unless ``retry_after`` says wait)."""

    code: str
    message: str
    fatal: bool
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class ServerNotice:
    """An error frame about the connection, not about one message."""

    code: str
    message: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Delivered:
    frame: p.MessageFrame


@dataclass(frozen=True, slots=True)
class GapReported:
    stream: str
    ns: str
    room: str | None
    epoch: str
    offset: int
    reason: str


@dataclass(frozen=True, slots=True)
class LinkDead:
    """No frame within the deadline: the driver must drop the transport."""

    reason: str


@dataclass(frozen=True, slots=True)
class RoundTrip:
    seconds: float


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The server sent something we cannot parse; reported, then ignored."""

    error: str


SessionEvent = (
    Welcomed
    | Replied
    | Failed
    | TimedOut
    | Dropped
    | Refused
    | ServerNotice
    | Delivered
    | GapReported
    | LinkDead
    | RoundTrip
    | ProtocolViolation
)


@dataclass(slots=True)
class SessionCounters:
    """Numbers a user can read to see what reliability work happened."""

    sent: int = 0
    resent: int = 0
    duplicates_dropped: int = 0
    gaps: int = 0
    timed_out: int = 0
    dropped: int = 0
    connections: int = 0

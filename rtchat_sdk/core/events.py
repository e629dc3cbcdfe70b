"""What the client core hands its driver: events, its state, its counters.

Plain frozen dataclasses, so a test compares them with ``==`` and a driver
matches on them; ``ConnectionState`` is the one enum of connection state,
the core's and the public ``client.state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .. import protocol as p

__all__ = [
    "ConnectionState",
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
    "TimedOut",
    "Welcomed",
]


class ConnectionState(StrEnum):
    """What the client is doing about its connection: ``client.state``, and the core's.

    The client (``client.state``, public) and its core (``ClientSession.state``)
    use these same values. The core sees only the transports it is handed;
    the client also sees its own dialing and its waits between attempts.

    * ``IDLE``: the client: ``connect()`` not called yet. The core: no
      transport (none yet, or the last one was lost; whether and when another
      comes is the driver's business).
    * ``CONNECTING``: the client: from its first attempt to its first welcome.
      The core: a transport is up and its ``hello`` waits for the ``welcome``,
      and no connection of this session was welcomed before.
    * ``CONNECTED``: welcomed; messages are written (both alike).
    * ``RECONNECTING``: as ``CONNECTING``, once a connection was welcomed: the
      client from its first attempt after that connection ended.
    * ``CLOSED``: for good (both alike).
    """

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


# --------------------------------------------------------------------------
# Events the session hands to the driver


@dataclass(frozen=True, slots=True)
class Welcomed:
    session: str
    resumed: bool
    limits: p.Limits | None = None
    """The server's limits (the driver's long polling follows them)."""


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
    retried: int = 0
    """Messages the server asked to resend later (``unavailable``): waited, then resent."""
    duplicates_dropped: int = 0
    gaps: int = 0
    timed_out: int = 0
    dropped: int = 0
    connections: int = 0

"""The client's sans-I/O core: ``ClientSession`` and what it hands its driver.

No asyncio, no sockets, no clock: the driver (``rtchat_sdk.aio``) feeds it
frames and the time, and acts on the frames and events it returns.
"""

from .events import (
    ConnectionState,
    Delivered,
    Dropped,
    Failed,
    GapReported,
    LinkDead,
    ProtocolViolation,
    Refused,
    Replied,
    RoundTrip,
    ServerNotice,
    SessionCounters,
    SessionEvent,
    TimedOut,
    Welcomed,
)
from .session import ClientSession

__all__ = [
    "ClientSession",
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

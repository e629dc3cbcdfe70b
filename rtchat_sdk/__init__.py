"""rtchat: reliable real-time messaging over WebSocket.

``async with Client(url) as client:`` gives rooms, requests, typed events,
heartbeats, reconnection and an outbox, with nothing lost, duplicated or
reordered silently.

Logs go to the ``rtchat_sdk`` logger; as a library it adds only a
``NullHandler``, so nothing is printed unless the app configures logging.
"""

import importlib
import logging
from typing import TYPE_CHECKING, Any

# Light, and what the server shares with the client: imported at once.
from .errors import (
    AckTimeout,
    BufferFull,
    ClientClosed,
    ConnectionFailed,
    ConnectionLost,
    FatalConnectionError,
    Forbidden,
    GaveUp,
    HandlerError,
    IncompatibleProtocol,
    InvalidFrame,
    InvalidState,
    MessageDropped,
    MessageExpired,
    MessageTooLarge,
    NotEnabled,
    ProtocolError,
    RemoteError,
    RTChatError,
    SessionReplaced,
    Unauthorized,
    UnknownEvent,
    UnknownNamespace,
    ValidationFailed,
)
from .events import Event, MemberJoined, MemberLeft
from .protocol import PROTOCOL_VERSION

if TYPE_CHECKING:
    from .aio import Client, NamespaceClient
    from .aio.handlers import Delivery
    from .backoff import ReconnectPolicy
    from .core import ConnectionState, GapReported
    from .outbox import Outbox, OverflowPolicy
    from .sqlite_outbox import OutboxFileError, OutboxInUse, OutboxStorageError, SqliteOutbox
    from .sync import SyncClient

# The client's driver and its helpers load on first use, so that importing
# ``rtchat_sdk.protocol`` (as the server does) loads no asyncio driver, no
# sqlite3 and no tenacity (tests/test_layering.py).
_LAZY = {
    "Client": "aio",
    "ConnectionState": "core",
    "NamespaceClient": "aio",
    "Delivery": "aio.handlers",
    "ReconnectPolicy": "backoff",
    "GapReported": "core",
    "Outbox": "outbox",
    "OverflowPolicy": "outbox",
    "OutboxFileError": "sqlite_outbox",
    "OutboxInUse": "sqlite_outbox",
    "OutboxStorageError": "sqlite_outbox",
    "SqliteOutbox": "sqlite_outbox",
    "SyncClient": "sync",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

logging.getLogger("rtchat_sdk").addHandler(logging.NullHandler())

__all__ = [
    "PROTOCOL_VERSION",
    "AckTimeout",
    "BufferFull",
    "Client",
    "ClientClosed",
    "ConnectionFailed",
    "ConnectionLost",
    "ConnectionState",
    "Delivery",
    "Event",
    "MemberJoined",
    "MemberLeft",
    "FatalConnectionError",
    "Forbidden",
    "GapReported",
    "GaveUp",
    "HandlerError",
    "IncompatibleProtocol",
    "InvalidFrame",
    "InvalidState",
    "MessageDropped",
    "MessageExpired",
    "MessageTooLarge",
    "NotEnabled",
    "NamespaceClient",
    "Outbox",
    "OutboxFileError",
    "OutboxInUse",
    "OutboxStorageError",
    "OverflowPolicy",
    "ProtocolError",
    "RTChatError",
    "ReconnectPolicy",
    "RemoteError",
    "SessionReplaced",
    "SqliteOutbox",
    "SyncClient",
    "Unauthorized",
    "UnknownEvent",
    "UnknownNamespace",
    "ValidationFailed",
    "__version__",
]

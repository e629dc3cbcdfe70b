"""rtchat: reliable real-time messaging over WebSocket.

``async with Client(url) as client:`` gives rooms, requests, typed events,
heartbeats, reconnection and an outbox, with nothing lost, duplicated or
reordered silently.

Logs go to the ``rtchat_sdk`` logger; as a library it adds only a
``NullHandler``, so nothing is printed unless the app configures logging.
"""

import logging

from .backoff import ReconnectPolicy
from .client import Client, ConnectionState, NamespaceClient
from .dispatch import Delivery
from .errors import (
    AckTimeout,
    BufferFull,
    ClientClosed,
    ConnectionFailed,
    ConnectionLost,
    FatalConnectionError,
    GaveUp,
    HandlerError,
    IncompatibleProtocol,
    InvalidFrame,
    MessageDropped,
    MessageExpired,
    MessageTooLarge,
    ProtocolError,
    RemoteError,
    RTChatError,
    SessionReplaced,
    Unauthorized,
    UnknownEvent,
    UnknownNamespace,
    ValidationFailed,
)
from .events import Event
from .outbox import Outbox, OverflowPolicy
from .protocol import PROTOCOL_VERSION
from .session import GapReported
from .sqlite_outbox import OutboxFileError, OutboxInUse, OutboxStorageError, SqliteOutbox
from .sync import SyncClient

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
    "FatalConnectionError",
    "GapReported",
    "GaveUp",
    "HandlerError",
    "IncompatibleProtocol",
    "InvalidFrame",
    "MessageDropped",
    "MessageExpired",
    "MessageTooLarge",
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

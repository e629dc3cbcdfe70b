"""The one exception hierarchy of rtchat.

::

    RTChatError
    ├── ProtocolError            a peer sent something the protocol forbids
    ├── InvalidState             (also a RuntimeError) local misuse: the object cannot do that now
    ├── ConnectionFailed         could not connect (refused, bad URL, handshake)
    │   ├── FatalConnectionError the server refused us for good: no retry helps
    │   │   ├── Unauthorized
    │   │   ├── IncompatibleProtocol
    │   │   └── SessionReplaced  another connection resumed this session
    │   └── GaveUp               reconnection stopped after its limits
    ├── ConnectionLost           the link is down and the operation needs it now
    ├── ClientClosed             the client was closed; the operation cannot run
    ├── AckTimeout               (also a TimeoutError) no reply in time
    ├── BufferFull               the outbox is full and its policy is "raise"
    ├── MessageDropped           evicted from a full outbox (policy "drop_oldest")
    ├── MessageExpired           a queued message outlived its expiry
    ├── MessageTooLarge          (also a ValueError) larger than the server accepts
    ├── ValidationFailed         a payload did not match its Event model
    └── RemoteError              the server answered with an error frame
        ├── UnknownEvent
        ├── UnknownNamespace
        ├── HandlerError
        ├── InvalidFrame
        ├── Forbidden            the server's authorization refused this action
        └── NotEnabled           the server does not offer this here (presence off)

Third-party exceptions (websockets, pydantic) are translated into these at the
boundary, so an application catches ``RTChatError`` and nothing else.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AckTimeout",
    "BufferFull",
    "ClientClosed",
    "ConnectionFailed",
    "ConnectionLost",
    "FatalConnectionError",
    "Forbidden",
    "GaveUp",
    "HandlerError",
    "IncompatibleProtocol",
    "InvalidFrame",
    "MessageDropped",
    "MessageExpired",
    "MessageTooLarge",
    "InvalidState",
    "NotEnabled",
    "ProtocolError",
    "RTChatError",
    "RemoteError",
    "SessionReplaced",
    "Unauthorized",
    "UnknownEvent",
    "UnknownNamespace",
    "ValidationFailed",
    "remote_error",
]


class RTChatError(Exception):
    """Base class of every error rtchat raises."""


class ProtocolError(RTChatError):
    """The peer broke the wire protocol (unparsable or unexpected frame)."""


class InvalidState(RTChatError, RuntimeError):
    """Our own code asked for something its object cannot do in its state (a closed session).

    Not ``ProtocolError``: that one means the peer broke the protocol.
    """


class ConnectionFailed(RTChatError):
    """A connection attempt failed (refused, unreachable, bad handshake)."""


class FatalConnectionError(ConnectionFailed):
    """The server refused the client in a way that retrying cannot fix."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Unauthorized(FatalConnectionError):
    """The server rejected the credentials."""


class IncompatibleProtocol(FatalConnectionError):
    """Client and server share no protocol version."""


class SessionReplaced(FatalConnectionError):
    """Another connection resumed this session (two clients sharing one token)."""


class ConnectionLost(RTChatError):
    """The connection dropped while an operation was waiting on it."""


class ClientClosed(RTChatError):
    """The client is closed; nothing more can be sent or awaited."""


class GaveUp(ConnectionFailed):
    """Reconnection stopped after its attempt or time limit."""


class AckTimeout(RTChatError, TimeoutError):
    """No reply arrived before the timeout (also a builtin TimeoutError)."""


class BufferFull(RTChatError):
    """The outbox is at its limit and its overflow policy is ``raise``."""


class MessageDropped(RTChatError):
    """The message was evicted from a full outbox by the drop-oldest policy."""


class MessageExpired(RTChatError):
    """A queued message passed its expiry before it could be sent."""


class MessageTooLarge(RTChatError, ValueError):
    """The encoded message exceeds the server's frame size limit; it was not queued."""


class ValidationFailed(RTChatError):
    """A payload did not validate against its Event model."""


class RemoteError(RTChatError):
    """The server answered an operation with an error frame."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


class UnknownEvent(RemoteError):
    """No handler for this event on the server."""


class UnknownNamespace(RemoteError):
    """The server has no such namespace."""


class HandlerError(RemoteError):
    """The server's handler raised (or rejected the payload)."""


class InvalidFrame(RemoteError):
    """The server could not accept a frame we sent."""


class Forbidden(RemoteError):
    """The server's authorization refused this join, publish, emit or request
    (``forbidden``); the connection stays up, and resending will not help."""


class NotEnabled(RemoteError):
    """The server does not offer this in the namespace (``not_enabled``: presence is off)."""


_BY_CODE: dict[str, type[RemoteError]] = {
    "unknown_event": UnknownEvent,
    "unknown_namespace": UnknownNamespace,
    "handler_error": HandlerError,
    "invalid_payload": HandlerError,
    "bad_json": InvalidFrame,
    "bad_frame": InvalidFrame,
    "unknown_type": InvalidFrame,
    "invalid_frame": InvalidFrame,
    "too_large": InvalidFrame,
    "forbidden": Forbidden,
    "not_enabled": NotEnabled,
}


def remote_error(code: str, message: str, details: Any = None) -> RemoteError:
    """Build the most specific RemoteError subclass for an error code."""
    return _BY_CODE.get(code, RemoteError)(code, message, details)

"""The server's exceptions, in rtchat's one tree (``rtchat_sdk.errors``).

::

    RTChatError
    ├── HandlerFailure   a handler could not produce a reply: the error frame's fields
    ├── FrameTooLarge    (also a ValueError) a delivery would pass max_frame_bytes
    ├── BrokerUnavailable  the broker's store (Redis) cannot be reached
    └── CredentialsRefused an authenticator refuses a hello, saying why (4001)
"""

from __future__ import annotations

from typing import Any

from rtchat_sdk.errors import RTChatError

__all__ = ["BrokerUnavailable", "CredentialsRefused", "FrameTooLarge", "HandlerFailure"]


class HandlerFailure(RTChatError):
    """A handler could not produce a reply; carries the error frame's fields."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class FrameTooLarge(RTChatError, ValueError):
    """A delivery would exceed ``max_frame_bytes``; nothing was appended."""


class BrokerUnavailable(RTChatError):
    """The broker's store cannot be reached (at start: the server does not start)."""


class CredentialsRefused(RTChatError):
    """Raised by an authenticator to refuse a hello with a reason the client is told
    (returning None refuses too, with a generic one)."""

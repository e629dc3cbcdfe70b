"""Authorization per action, as the hub sees it: which actions a namespace guards.

A namespace (``app.Namespace``) may have a hook per action; the hub asks for
one (an ``Authorize`` call, carried out by the driver) only when the
namespace has a hook for that action, so an unguarded namespace costs a set
lookup per message and no call. A denial is the error ``forbidden`` with the
message's id; the connection stays up.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol

from rtchat_sdk import protocol as p

from ..errors import HandlerFailure

__all__ = ["ACTIONS", "CALL", "JOIN", "PUBLISH", "RECEIVE", "Guarded", "Namespaces", "forbidden"]

JOIN = "join"
"""May this session join this room (a ``join``, and a room restored after a lost session)."""
PUBLISH = "publish"
"""May it publish this event to this room (a client ``publish``)."""
CALL = "call"
"""May it call this event (an ``emit`` or a ``request``)."""
RECEIVE = "receive"
"""May it receive this direct message (``server.send_to``, ``ctx.send``); run by the driver."""
ACTIONS = (JOIN, PUBLISH, CALL, RECEIVE)


class Guarded(Protocol):
    """What the hub needs of a namespace: the actions it has a hook for, and whether it
    keeps presence (and appends join/leave entries)."""

    @property
    def guards(self) -> Collection[str]: ...

    @property
    def presence(self) -> bool: ...

    @property
    def presence_events(self) -> bool: ...


Namespaces = Mapping[str, Guarded]
"""The node's namespaces by path (the server's ``Namespace`` objects)."""


def forbidden(what: str) -> HandlerFailure:
    """The failure a denial answers with: ``forbidden``, not retryable."""
    return HandlerFailure(p.ErrorCode.FORBIDDEN, f"not allowed to {what}")

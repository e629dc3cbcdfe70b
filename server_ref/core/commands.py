"""What the hub asks of its driver: plain data, executed in the order given.

Plain slotted dataclasses, not frozen (a frozen one costs three times as
much to build, and the hub builds several per message); nobody changes a
command once made, but for the call's ``op``, which the hub sets.

Sync commands (``Send``, ``Deliver``, ``Close``, ``Batching``, ``Finished``)
are carried out at once. A ``Call`` needs a result: the driver runs it (a
broker method, or an app hook: authenticate, an authorize_* hook, a handler) and
gives the outcome back with ``Hub.call_done(call.op, result, now)`` or
``Hub.call_failed(call.op, exc, now)``. Each operation has at most one call
outstanding, so ``op`` names both; an operation yields a call with ``op``
unset and the hub numbers it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CALLS",
    "Authenticate",
    "Authorize",
    "Batching",
    "BrokerCall",
    "Call",
    "Close",
    "Command",
    "Deliver",
    "Finished",
    "Handle",
    "Identity",
    "Send",
]


@dataclass(slots=True)
class Send:
    """Write these encoded frames to connection ``conn``, in order."""

    conn: int
    frames: list[str]


@dataclass(slots=True)
class Deliver:
    """Write one delivery frame to each of ``conns`` (encoded once for all of them).

    The driver reports a recipient whose unsent data is past its limit with
    ``Hub.connection_slow`` instead of writing to it.
    """

    text: str
    conns: list[int]


@dataclass(slots=True)
class Close:
    """Close connection ``conn`` with ``code`` after what was sent to it."""

    conn: int
    code: int
    reason: str


@dataclass(slots=True)
class Batching:
    """Connection ``conn`` accepts batches: frames of one write may go as one message."""

    conn: int


@dataclass(slots=True)
class Finished:
    """Operation ``op`` that the driver started (``Hub.join``...) ended with ``result``."""

    op: int
    result: Any
    error: BaseException | None = None


@dataclass(slots=True)
class BrokerCall:
    """Await ``broker.<method>(*args)``; its return value is the result."""

    method: str
    args: tuple[Any, ...]
    op: int = 0


@dataclass(slots=True)
class Identity:
    """Who an authenticator says a hello speaks for (it may also return a plain user string).

    ``claims`` are kept with the session for later authorization; ``expires_in``
    (seconds from the hello, e.g. a JWT's ``exp``) lets the hub close the
    connection with TOKEN_EXPIRED once the credentials are stale.
    """

    user: str | None
    claims: dict[str, Any] = field(default_factory=dict)
    expires_in: float | None = None


@dataclass(slots=True)
class Authenticate:
    """Run the app's authenticator on ``hello.auth``; the result is the user, an
    ``Identity``, or None (refused)."""

    auth: dict[str, Any] | None
    op: int = 0


@dataclass(slots=True)
class Authorize:
    """Run namespace ``ns``'s hook for ``action`` (``authz.py``); the result is a bool.

    Asked only when the namespace has a hook for the action: no hook, no call.
    ``room`` is set for join and publish, ``event`` for publish and call.
    """

    ns: str
    action: str
    session_id: str
    user: str | None
    claims: dict[str, Any]
    room: str | None
    event: str | None
    op: int = 0


@dataclass(slots=True)
class Handle:
    """Run the handler of ``event`` in ``ns``; the result is the JSON-ready reply.

    It raises ``HandlerFailure`` for an error reply (``Namespace.call``).
    """

    ns: str
    session_id: str
    user: str | None
    event: str
    data: Any
    claims: dict[str, Any]
    op: int = 0
    started: Awaitable[Any] | None = None
    """The reply's awaitable when ``handle_now`` called the handler and it must be
    awaited (an ``async def`` handler): the driver awaits it, and does not call again."""


Call = BrokerCall | Authenticate | Authorize | Handle
CALLS = (BrokerCall, Authenticate, Authorize, Handle)
"""The call types, for ``isinstance``."""
Command = Send | Deliver | Close | Batching | Finished | Call

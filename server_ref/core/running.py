"""What the hub keeps per connection and per running operation: plain records.

An *operation* (``Op``) is a generator that yields calls and receives their
results (``hub.py`` explains the style); ``Running`` is one in progress.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from .commands import Call
from .connection import ConnectionCore
from .limits import ConnLimits
from .sessions import Session

__all__ = ["Conn", "CredentialsExpiry", "Op", "PresenceTimer", "Running"]

Op = Generator[Call, Any, Any]
"""An operation: yields calls, receives their results, returns its own."""


class Conn:
    __slots__ = (
        "bearer",
        "busy",
        "claims",
        "client",
        "core",
        "early",
        "id",
        "limits",
        "scheduled",
        "session",
    )

    def __init__(
        self, conn_id: int, core: ConnectionCore, bearer: str | None, limits: ConnLimits
    ) -> None:
        self.id = conn_id
        self.core = core
        self.limits = limits
        """Its client address, message rate and refusals (``limits.py``)."""
        self.bearer = bearer
        """The token of the request's ``Authorization: Bearer`` header, if any."""
        self.claims: dict[str, Any] = {}
        """What the authenticator said about the credentials of its hello."""
        self.client: str | None = None
        """The ``hello.client`` it named."""
        self.session: Session | None = None
        self.busy = 0
        """Operations of this connection's messages running or waiting."""
        self.scheduled: float | None = None
        """The deadline this connection has in the hub's timer heap."""
        self.early: list[str | bytes] | None = None
        """While its hello is handled: frames that came after it, read once it is."""


class CredentialsExpiry:
    """A timer-heap item: the connection's credentials are stale from its deadline on."""

    __slots__ = ("conn",)

    def __init__(self, conn: Conn) -> None:
        self.conn = conn


class PresenceTimer:
    """A timer-heap item: a dropped session's presence grace period ends (``session``), or
    the node's presence entries are due for renewal (``session`` None)."""

    __slots__ = ("session",)

    def __init__(self, session: Session | None) -> None:
        self.session = session


class Running:
    __slots__ = ("answers", "conn", "gen", "id", "report", "session")

    def __init__(
        self,
        op_id: int,
        gen: Op,
        session: Session | None,
        conn: Conn | None,
        report: bool,
        answers: Conn | None,
    ) -> None:
        self.id = op_id
        self.gen = gen
        self.session = session
        """Set for a session-ordered operation: the next one starts when it ends."""
        self.conn = conn
        self.report = report
        """Started by the driver: its end is reported with ``Finished``."""
        self.answers = answers
        """For a client message: the connection it came on, which gets its answer."""

"""The hub's timers: one heap of deadlines, and what each kind means when it is due.

``HubTimers`` is the part of ``Hub`` (``hub.py``) that keeps the heap: the
connections' heartbeat and handshake deadlines, detached sessions' expiry,
stale credentials (TOKEN_EXPIRED), and presence (PROTOCOL §7.5): the grace
period of a session whose connection dropped, after which it leaves its
rooms, and the node's renewal of its sessions' entries every third of
``presence_ttl``. The driver arms one timer on ``get_timer()`` and calls
``handle_timer(now)``.
"""

from __future__ import annotations

import heapq
import logging
from typing import Any

from rtchat_sdk import protocol as p

from ..config import ServerConfig
from .commands import BrokerCall
from .presence import Rooms
from .running import Conn, CredentialsExpiry, Op, PresenceTimer
from .sessions import Session, Sessions

__all__ = ["HubTimers"]

log = logging.getLogger("server_ref")


class HubTimers:
    """The timer heap and its deadlines; ``Hub`` supplies the state and the operations."""

    config: ServerConfig
    sessions: Sessions
    rooms: Rooms
    _conns: dict[int, Conn]
    _timers: list[tuple[float, int, Any]]
    _seq: int
    _now: float
    _renewing: bool
    """A presence renewal is in the heap."""

    def _flush(self, c: Conn, received: bool = False) -> None:
        raise NotImplementedError  # Hub's

    def _start(self, gen: Op) -> int:
        raise NotImplementedError  # Hub's

    def _enqueue(self, session: Session, gen: Op, answers: Conn | None = None) -> None:
        raise NotImplementedError  # Hub's

    def _schedule(self, c: Conn) -> None:
        when = c.core.get_timer()
        if when is not None and (c.scheduled is None or when < c.scheduled):
            c.scheduled = when
            self._at(when, c)

    def _schedule_expiry(self, session: Session, when: float) -> None:
        session.expires = when
        self._at(when, session)

    def _at(self, when: float, item: Any) -> None:
        """Put ``item`` in the timer heap at ``when`` (``handle_timer`` says what each is)."""
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, item))

    def get_timer(self) -> float | None:
        """The next deadline, or None (it may be early: then nothing is due at it)."""
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> None:
        """Handle every deadline at or before ``now``."""
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, item = heapq.heappop(timers)
            if isinstance(item, Session):
                if item.expires == when and item.conn is None:
                    item.expires = None
                    self._enqueue(item, self._expire(item))
                continue
            if type(item) is PresenceTimer:
                self._presence_due(item)
                continue
            if type(item) is CredentialsExpiry:
                stale = item.conn
                if stale.id in self._conns:
                    reason = "credentials expired; reconnect with fresh ones"
                    stale.core.close(p.CloseCode.TOKEN_EXPIRED, reason)
                    self._flush(stale)
                continue
            c: Conn = item
            if c.scheduled != when or c.id not in self._conns:
                continue  # superseded by an earlier deadline, or gone
            c.scheduled = None
            if c.busy:
                c.core.keepalive(now)  # a slow handler, not a silent peer
            c.core.handle_timer(now)
            self._flush(c)

    def _expire(self, session: Session) -> Op:
        """A detached session's time is up here: out of presence, then forgotten."""
        if session.conn is None and self.sessions.by_id.get(session.id) is session:
            yield from self.rooms.exit_all(session, "expired")
        yield from self.sessions.drop_local(session)

    # ------------------------------------------------------------------
    # Presence: grace periods and renewals

    def _presence_due(self, timer: PresenceTimer) -> None:
        session = timer.session
        if session is None:  # the node's renewal of its sessions' entries
            self._renewing = False
            if self.sessions.by_id:
                self._start(self._renew(self.rooms.renewal()))
            return
        if session.conn is None and self.sessions.by_id.get(session.id) is session:
            self._enqueue(session, self.rooms.exit_all(session, "disconnected"))

    def _renew(self, members: list[tuple[str, p.PresenceMember]]) -> Op:
        try:
            if members:
                yield BrokerCall("presence_refresh", (members, self.config.presence_ttl))
        except Exception as exc:  # the next renewal tries again, well within the TTL
            log.warning("presence entries not renewed: %s", exc)
        self._renew_later()

    def _renew_later(self) -> None:
        """Renew the node's presence entries a third of ``presence_ttl`` from now, once."""
        if not self._renewing:
            self._renewing = True
            self._at(self._now + self.config.presence_ttl / 3, PresenceTimer(None))

"""Presence: who is in each room, kept in the broker, and the ``$join`` / ``$leave`` entries.

PROTOCOL §7.5. ``Rooms`` wraps the membership steps of ``Sessions`` (join,
leave) so that a session's presence follows its membership in rooms of a
namespace with presence on, and adds the session-wide steps the hub takes:
enter every room on attach, leave them on goodbye, after the grace period
of a dropped connection, or at expiry. A session's ``present`` says whether
its entries are in the broker; the hub renews them every third of
``presence_ttl`` (``renewal``) while the session lives on this node, so a
node that dies leaves none behind for longer than the TTL.

Every step is a generator in the hub's operation style (yields calls,
receives their results).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from rtchat_sdk import protocol as p

from ..broker.base import Draft
from .authz import Namespaces
from .commands import BrokerCall, Call
from .sessions import Session, Sessions

__all__ = ["JOINED", "LEFT", "Rooms"]

Step = Generator[Call, Any, Any]

JOINED = "$join"
LEFT = "$leave"


class Rooms:
    """Membership with presence: the join and leave the hub's operations use."""

    __slots__ = ("_max_bytes", "_namespaces", "sessions", "ttl")

    def __init__(
        self, sessions: Sessions, namespaces: Namespaces, ttl: float, max_bytes: int
    ) -> None:
        self.sessions = sessions
        self._namespaces = namespaces
        self.ttl = ttl
        self._max_bytes = max_bytes

    def _keeps(self, ns: str) -> bool:
        space = self._namespaces.get(ns)
        return space is not None and space.presence

    def _member(self, session: Session) -> p.PresenceMember:
        return p.PresenceMember(
            session=session.id, user=session.record.user, client=session.client, joined_at=0
        )

    def join(
        self, session: Session, ns: str, room: str, since: p.Since | None = None
    ) -> Generator[Call, Any, tuple[str, int]]:
        """Put the session in a room (``Sessions.join``), and in its presence."""
        new = (ns, room) not in session.record.rooms
        position: tuple[str, int] = yield from self.sessions.join(session, ns, room, since)
        if new and session.present and self._keeps(ns):
            yield from self._enter(session, ns, room)
        return position

    def leave(self, session: Session, ns: str, room: str) -> Step:
        """Take the session out of a room and its presence (``$leave``, reason "left")."""
        was = (ns, room) in session.record.rooms
        yield from self.sessions.leave(session, ns, room)
        if was and session.present and self._keeps(ns):
            yield from self._exit(session, ns, room, "left")

    def enter_all(self, session: Session) -> Step:
        """An attached session is present in its rooms (again): after a hello."""
        if session.present:
            return
        session.present = True
        for ns, room in list(session.record.rooms):
            if self._keeps(ns):
                yield from self._enter(session, ns, room)

    def exit_all(self, session: Session, reason: str) -> Step:
        """The session is no longer present anywhere: goodbye, grace over, or expiry."""
        if not session.present:
            return
        session.present = False
        for ns, room in list(session.record.rooms):
            if self._keeps(ns):
                yield from self._exit(session, ns, room, reason)

    def renewal(self) -> list[tuple[str, p.PresenceMember]]:
        """Every (stream, member) this node's present sessions hold, to renew."""
        return [
            (p.room_stream(ns, room), self._member(session))
            for session in self.sessions.by_id.values()
            if session.present
            for ns, room in session.record.rooms
            if self._keeps(ns)
        ]

    def _enter(self, session: Session, ns: str, room: str) -> Step:
        stream = p.room_stream(ns, room)
        member, new = yield BrokerCall("presence_add", (stream, self._member(session), self.ttl))
        session.joined[ns, room] = member.joined_at
        if new and self._events(ns):
            yield from self._announce(stream, ns, room, JOINED, member.model_dump(), session.id)

    def _exit(self, session: Session, ns: str, room: str, reason: str) -> Step:
        stream = p.room_stream(ns, room)
        removed = yield BrokerCall("presence_remove", (stream, session.id))
        joined_at = session.joined.pop((ns, room), 0.0)
        if removed and self._events(ns):
            member = self._member(session).model_copy(update={"joined_at": joined_at})
            data = {**member.model_dump(), "reason": reason}
            yield from self._announce(stream, ns, room, LEFT, data, session.id)

    def _events(self, ns: str) -> bool:
        space = self._namespaces.get(ns)
        return space is not None and space.presence_events

    def _announce(
        self, stream: str, ns: str, room: str, event: str, data: dict[str, Any], sender: str
    ) -> Step:
        """A ``$join`` / ``$leave`` entry of the room stream, ordered with its messages."""
        draft = Draft.message(
            stream,
            ns=ns,
            room=room,
            event=event,
            data=data,
            sender=sender,  # by the echo rule, not delivered to the session itself
            echo=False,
            max_bytes=self._max_bytes,
        )
        yield BrokerCall("append", (stream, draft, None))

"""The one owner of sessions, room membership and subscriptions on this node.

A session's rooms live in its ``SessionRecord`` (what the broker keeps);
``members`` is the index from a stream to the local sessions following it,
changed only here, together with the record, so the two cannot disagree; the
node subscribes to a stream while it has local members (``following``). The
steps that change them are generators in the hub's operation style: they
yield the broker calls (subscribe, position, save_session...) they need. The
echo rule is here too, once, for live deliveries and replays alike.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rtchat_sdk import protocol as p

from ..broker.base import SessionRecord, StreamEntry
from .commands import BrokerCall, Call, Send

if TYPE_CHECKING:
    from collections.abc import Generator

    Step = Generator[Call, Any, Any]

__all__ = ["Covered", "Session", "Sessions", "release_held", "wants"]

Covered = dict[str, tuple[str, int]]
"""Per stream, the (epoch, offset) a replay reached."""

log = logging.getLogger("server_ref")


class Session:
    """A session as this node holds it: the shared record plus local live state."""

    __slots__ = (
        "busy",
        "claims",
        "client",
        "conn",
        "expires",
        "held",
        "highest",
        "id",
        "inbox",
        "joined",
        "own",
        "present",
        "queue",
        "record",
        "refusing",
        "replaying",
    )

    def __init__(self, record: SessionRecord) -> None:
        self.record = record
        self.id = record.id
        self.inbox = p.inbox_stream(record.id)
        self.own = {record.id, *record.previous}
        """Sender ids whose entries are this client's own publishes."""
        self.conn: Any = None
        """The hub's connection attached to the session, if any."""
        self.claims: dict[str, Any] = {}
        """The authenticator's claims about its current connection's credentials
        (e.g. a JWT's), for authorization by the app."""
        self.expires: float | None = None
        """When this node forgets the detached session."""
        self.replaying = False
        self.held: list[StreamEntry] = []
        """Live entries that arrived during a replay, sent after it."""
        self.busy = False
        """An operation of the session is running: the next waits in ``queue``."""
        self.queue: deque[tuple[Generator[Any, Any, Any], Any]] | None = None
        """Operations waiting for ``busy`` to clear, each with the connection it answers
        (made by ``wait``, when the first waits: an empty deque takes ~600 bytes)."""
        self.highest: int | None = None
        """The highest message id it processed, when all of them were processed here
        (None: unknown, ask the broker's dedupe records for every message)."""
        self.client: str | None = None
        """The ``hello.client`` of its current connection (shown in presence)."""
        self.present = False
        """Its presence entries are in the broker (``presence.py``)."""
        self.joined: dict[tuple[str, str], float] = {}
        """When it joined each presence room, as the broker stamped it."""
        self.refusing: int | None = None
        """A message answered ``unavailable``: later ones are refused too until it is
        resent, so the session's messages are still processed in id order."""

    def wait(self, op: Generator[Any, Any, Any], answers: Any) -> None:
        """Queue an operation behind the running one (``busy``), with the connection
        it answers, if any."""
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        queue.append((op, answers))


def wants(session: Session, entry: StreamEntry) -> bool:
    """The echo rule: a client gets its own publishes only when it asked for echo."""
    return entry.echo or entry.sender not in session.own


class Sessions:
    """Local sessions by id, and the streams each follows."""

    __slots__ = ("by_id", "following", "members", "out")

    def __init__(self, out: Callable[[Session, str], None] = lambda session, text: None) -> None:
        self.out = out
        """Writes an encoded frame to a session's connection (a join's catch-up)."""
        self.by_id: dict[str, Session] = {}
        self.members: dict[str, set[Session]] = {}
        self.following: dict[str, tuple[str, int] | None] = {}
        """Streams this node subscribed to, each with the (epoch, offset) of the last
        live entry the broker handed over (None before the first)."""

    def skip_notices(self, entry: StreamEntry) -> list[Send]:
        """Notes a live entry; if it skips offsets the broker never handed over, a
        gap frame for each attached member, to send before it.

        A broker hands over every entry in order; one that could not (a Redis
        node whose pub/sub was down longer than the stream's history reaches)
        skips, and the members must be told rather than see a silent jump.
        (A member replaying at that moment learns of it from its replay only
        if the history no longer holds the skipped entries.)
        """
        if entry.stream not in self.following:
            return []  # late, from a stream being unfollowed: noting it would follow it again
        last = self.following[entry.stream]
        self.following[entry.stream] = (entry.epoch, entry.offset)
        if last is None or last[0] != entry.epoch or entry.offset <= last[1] + 1:
            return []
        log.warning("stream %s skipped to offset %d: members told", entry.stream, entry.offset)
        notices = []
        for session in self.members.get(entry.stream, ()):
            c = session.conn
            if c is None or c.core.close_code is not None or session.replaying:
                continue
            ns, room = p.DEFAULT_NAMESPACE, None
            for key in session.record.rooms:
                if p.room_stream(*key) == entry.stream:
                    ns, room = key
            gap = p.GapFrame(
                stream=entry.stream,
                ns=ns,
                room=room,
                epoch=entry.epoch,
                offset=entry.offset - 1,
                reason="trimmed",
            )
            notices.append(Send(c.id, [p.encode(gap)]))
        return notices

    def recipients(self, entry: StreamEntry) -> list[int]:
        """The connections a live entry goes to now: members that want it (the echo rule),
        attached and not cut off; a member that is replaying holds it for later."""
        conns: list[int] = []
        for session in self.members.get(entry.stream, ()):
            if not wants(session, entry):
                continue
            if session.replaying:
                session.held.append(entry)
                continue
            c = session.conn
            if c is None or c.core.close_code is not None:
                continue  # detached or cut off: it replays from history on resume
            conns.append(c.id)
        return conns

    def _local(self, record: SessionRecord) -> tuple[Session, list[str]]:
        """This node's session for ``record`` (made if new here).

        Returns it with the streams that got their first local member.
        """
        session = self.by_id.get(record.id)
        if session is not None:
            session.record = record
            session.own.update(record.previous)
            session.expires = None
            return session, []
        session = self.by_id[record.id] = Session(record)
        streams = [session.inbox, *(p.room_stream(ns, room) for ns, room in record.rooms)]
        return session, [s for s in streams if self._add(s, session)]

    def attach_record(self, record: SessionRecord) -> Generator[Call, Any, Session]:
        """This node's session for ``record``, following its streams."""
        session, streams = self._local(record)
        session.refusing = None  # a new connection resends everything unanswered, in order
        for stream in streams:
            yield from self._follow(stream)
        return session

    def join(
        self, session: Session, ns: str, room: str, since: p.Since | None = None
    ) -> Generator[Call, Any, tuple[str, int]]:
        """Put the session in a room; returns the room stream's (epoch, offset).

        With ``since`` (PROTOCOL §7.6), the entries after it are written first,
        as a resume's replay is: live ones that arrive meanwhile are held and
        written after them, minus those the catch-up covered.
        """
        stream = p.room_stream(ns, room)
        if (ns, room) in session.record.rooms:
            position: tuple[str, int] = yield BrokerCall("position", (stream,))
            return position
        # Follow the stream before reading its position, so no entry after it is missed.
        yield from self._follow(stream)
        position = yield BrokerCall("position", (stream,))
        if (ns, room) in session.record.rooms:
            return position
        session.record.rooms[(ns, room)] = position
        holding = since is not None and not session.replaying
        if holding:
            session.replaying, session.held = True, []
        self._add(stream, session)
        try:
            if since is not None:
                try:
                    yield from self._catch_up(session, stream, ns, room, since, position)
                except BaseException:  # not caught up: not joined, so a resend catches up
                    session.record.rooms.pop((ns, room), None)
                    self._remove(stream, session)
                    raise
            yield BrokerCall("save_session", (session.record, None))
        finally:
            if holding:
                session.replaying = False
                release_held(session, {stream: position}, lambda t: self.out(session, t))
        return position

    def _catch_up(
        self,
        session: Session,
        stream: str,
        ns: str,
        room: str,
        since: p.Since,
        position: tuple[str, int],
    ) -> Step:
        """Write the entries after ``since`` up to ``position`` (what followed comes live)."""
        found = yield BrokerCall("read_since", (stream, since.epoch, since.offset))
        if found.gap is not None:
            gap = p.GapFrame(
                stream=stream,
                ns=ns,
                room=room,
                epoch=found.epoch,
                offset=found.gap_offset,
                reason=found.gap,
            )
            self.out(session, p.encode(gap))
        epoch, last = position
        for entry in found.entries:
            if entry.epoch == epoch and entry.offset <= last and wants(session, entry):
                self.out(session, entry.text)

    def leave(self, session: Session, ns: str, room: str) -> Step:
        if session.record.rooms.pop((ns, room), None) is None:
            return
        stream = p.room_stream(ns, room)
        self._remove(stream, session)
        yield BrokerCall("save_session", (session.record, None))
        yield from self._unfollow(stream)

    def drop_local(self, session: Session) -> Step:
        """Forget this node's live state of a session (its record expires on its own)."""
        if session.conn is not None or self.by_id.get(session.id) is not session:
            return  # resumed meanwhile, or already dropped
        session.expires = None
        for stream in self._drop(session):
            yield from self._unfollow(stream)

    def _follow(self, stream: str) -> Step:
        """Subscribe to a stream this node does not follow yet (once, whoever asks)."""
        if stream not in self.following:
            self.following[stream] = None
            try:
                yield BrokerCall("subscribe", (stream,))
            except BaseException:  # not subscribed: the next join must try again
                self.following.pop(stream, None)
                raise

    def _unfollow(self, stream: str) -> Step:
        """Unsubscribe from a stream no local session follows any more."""
        if stream in self.following and not self.members.get(stream):
            del self.following[stream]
            yield BrokerCall("unsubscribe", (stream,))

    def _drop(self, session: Session) -> list[str]:
        """Forget the session here; returns the streams left without local members."""
        self.by_id.pop(session.id, None)
        streams = [session.inbox, *(p.room_stream(ns, r) for ns, r in session.record.rooms)]
        return [s for s in streams if self._remove(s, session)]

    def _add(self, stream: str, session: Session) -> bool:
        members = self.members.get(stream)
        if members is None:
            self.members[stream] = {session}
            return True
        members.add(session)
        return False

    def _remove(self, stream: str, session: Session) -> bool:
        members = self.members.get(stream)
        if members is None or session not in members:
            return False
        members.discard(session)
        if members:
            return False
        del self.members[stream]
        return True


def release_held(session: Session, covered: Covered, out: Callable[[str], None]) -> None:
    """Write the live entries held during a replay that it did not cover, in order."""
    held, session.held = session.held, []
    for entry in held:
        epoch, offset = covered.get(entry.stream, ("", 0))
        if entry.epoch != epoch or entry.offset > offset:
            covered[entry.stream] = (entry.epoch, entry.offset)
            out(entry.text)

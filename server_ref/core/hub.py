"""The server hub: every decision of the server, sans I/O.

The hub takes inputs with the time (a connection opened, a text frame, a
connection closed with the peer's close code, the result of a call it asked
for, an entry appended to a stream it follows, a session replaced on another
node, a timer) and answers with commands (``commands.py``) that its driver
takes with ``take_commands()``: frames to write, connections to close, and
calls (broker methods, app hooks) whose results come back through
``call_done`` / ``call_failed``. ``get_timer()`` is the next deadline
(heartbeats, handshake timeouts, session expiry); the driver arms one timer
for it and calls ``handle_timer(now)``, as aioquic's connection does.

Multi-step work (a hello: authenticate, load the session, replay; a message:
recall its dedupe record, run it, remember the reply, answer) is an
*operation*: a generator that yields one call at a time and receives its
result (or has its exception thrown in), so each reads top to bottom, and
the hub stays a plain object. It runs until a call the driver must await
(``answer_now`` takes the ones answered at once), then waits in ``_ops``.

Ordering rules kept here:

1. A session's messages (and its detach) are operations run one at a time in
   arrival order (``Session.queue``), whatever connection they came on.
2. While a session replays, live entries for it are held and sent after the
   replay, minus those it covered (``replay.py``).
3. One echo rule for live and replayed entries (``sessions.wants``).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from functools import partial
from typing import Any

from rtchat_sdk import protocol as p

from ..broker.base import LATER, SessionRecord, StreamEntry
from ..config import ServerConfig
from ..errors import BrokerUnavailable
from .commands import (
    CALLS,
    Batching,
    BrokerCall,
    Call,
    Close,
    Command,
    Deliver,
    Finished,
    Handle,
    Send,
)
from .connection import ConnectionCore
from .limits import Addresses, ConnLimits, admit, bounded_join, cap_rooms, refusal
from .presence import Rooms
from .replay import gap_frame, replay
from .running import Conn, CredentialsExpiry, Op, PresenceTimer, Running
from .sessions import Covered, Session, Sessions, release_held
from .stats import Stats
from .steps import Namespaces, answer, identify, restore_rooms
from .timers import HubTimers

__all__ = ["Hub", "Op"]

log = logging.getLogger("server_ref")

_CALL_TYPES = frozenset(CALLS)


class Hub(HubTimers):
    """All sessions, rooms and connections of one node (its timers: ``timers.py``)."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        namespaces: Namespaces,
        node: str,
        authenticates: bool = False,
        new_session: Callable[[], tuple[str, str]] | None = None,
        answer_now: Callable[[str, tuple[Any, ...]], Any] | None = None,
        handle_now: Callable[[Handle], Any] | None = None,
        appends_remembered: bool = False,
    ) -> None:
        self.config = config
        self._answer_now = answer_now
        """``answer_now(method, args)``: a broker call's result if the broker has it at
        once (no I/O, no call back into the hub: ``Broker.answer_now``), or ``LATER``."""
        self._handle_now = handle_now
        """``handle_now(call)``: the reply of a handler that needs no awaiting, run at once
        (by the driver, which keeps app code from calling back into the hub while it
        runs), or ``LATER`` (the driver sets ``call.started`` if it began the call)."""
        self.node = node
        self._namespaces = namespaces
        self._authenticates = authenticates
        self._new_session = new_session or (
            lambda: (secrets.token_hex(8), secrets.token_urlsafe(32))
        )
        self.stats = Stats()  # what the metrics count (stats.py), read when scraped
        self.sessions = Sessions(lambda session, text: self._send(session.conn, text))
        self.rooms = Rooms(self.sessions, namespaces, config.presence_ttl, config.max_frame_bytes)
        self._renewing = False
        self._answer = partial(
            answer,
            namespaces,
            config.max_frame_bytes,
            config.unavailable_retry_after,
            appends_remembered,
            answer_now,
            bounded_join(config.max_rooms, self.rooms.join),
            self.rooms.leave,
        )
        self._conns: dict[int, Conn] = {}
        self.addresses = Addresses(config.max_connections_per_address)
        self._ops: dict[int, Running] = {}
        self._out: list[Command] = []
        self._timers: list[tuple[float, int, Any]] = []
        self._seq = 0
        self._now = 0.0
        self.closing = False
        self._heartbeat = p.HeartbeatInfo(
            interval=config.heartbeat_interval, timeout=config.heartbeat_timeout
        )
        self._limits = p.Limits(
            max_frame_bytes=config.max_frame_bytes,
            max_in_flight=config.max_in_flight,
            history_size=config.history_size,
            history_seconds=config.history_seconds,
            session_ttl=config.session_ttl,
            poll_max_frames=config.poll_max_frames,
            poll_timeout=config.poll_timeout,
        )

    # ------------------------------------------------------------------
    # Output

    def take_commands(self) -> list[Command]:
        """The commands produced since the last call, oldest first."""
        out, self._out = self._out, []
        return out

    def take_call(self) -> Call | None:
        """The one command waiting if it is a call (an operation's common step), else None."""
        out = self._out
        if len(out) == 1 and type(out[0]) in _CALL_TYPES:
            return out.pop()  # type: ignore[return-value]
        return None

    def session_ids(self) -> list[str]:
        return list(self.sessions.by_id)

    def connection_count(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------------
    # Connections

    def connection_opened(
        self, now: float, bearer: str | None = None, address: str | None = None
    ) -> int:
        """A transport accepted a connection; returns its id (refused ones are closed).

        ``bearer``, ``address``: its ``Authorization: Bearer`` token, its client's address.
        """
        self._now = now
        self._seq += 1
        conn_id = self._seq
        if self.closing:
            self._out.append(Close(conn_id, p.CloseCode.GOING_AWAY, "server shutting down"))
            return conn_id
        refused = refusal(self.config, len(self._conns), self.addresses, conn_id, address)
        if refused:  # past max_connections or max_connections_per_address: overloaded, 1013
            self._out.extend(refused)
            return conn_id
        core = ConnectionCore(
            now,
            handshake_timeout=self.config.handshake_timeout,
            max_bad_frames=self.config.max_bad_frames,
        )
        limits = ConnLimits(self.config, now, address)
        c = self._conns[conn_id] = Conn(conn_id, core, bearer, limits)
        self.addresses.add(address)
        self._schedule(c)
        return conn_id

    def text_received(self, conn_id: int, text: str | bytes, now: float) -> None:
        """One text frame from the peer."""
        self._now = now
        c = self._conns.get(conn_id)
        if c is None:
            return
        if c.early is not None:
            c.early.append(text)
            return
        self._receive(c, text, now)

    def _receive(self, c: Conn, text: str | bytes, now: float) -> None:
        frame = c.core.receive_text(text, now)
        if frame is not None:
            self.stats.received[frame.type] += 1
            if frame.type == "hello":  # (not isinstance: slow on a pydantic model class)
                c.early = []
                self._start(self._handshake(c, frame), conn=c)
            else:
                session = c.session
                assert session is not None  # the core lets messages through only after hello
                c.busy += 1
                refused = admit(c, session, frame.id, now)  # over a limit: answered, not run
                gen = refused or self._answer(session, frame)
                if session.busy:  # _enqueue, inline (every message)
                    session.wait(gen, c)
                else:
                    session.busy = True
                    self._seq += 1
                    self._step(Running(self._seq, gen, session, None, False, c), None, None)
        self._flush(c, received=True)

    def connection_closed(self, conn_id: int, peer_code: int | None, now: float) -> None:
        """The connection is gone; ``peer_code`` is the close code the peer sent, if any."""
        self._now = now
        c = self._conns.pop(conn_id, None)
        if c is None:
            return
        self.addresses.remove(c.limits.address)
        c.core.close(p.CloseCode.NORMAL, "closed")  # nothing more is sent or read
        session = c.session
        if session is None or session.conn is not c:
            return
        session.conn = None
        goodbye = peer_code == p.CloseCode.NORMAL
        self._enqueue(session, self._detach(session, goodbye))

    def connection_slow(self, conn_id: int, now: float) -> None:
        """The transport holds more unsent data for the connection than allowed."""
        self._now = now
        c = self._conns.get(conn_id)
        if c is not None:
            self.stats.slow_consumers += 1
            c.core.close(p.CloseCode.SLOW_CONSUMER, "too much unsent data; resume to catch up")
            self._flush(c)

    def shutdown(self, now: float) -> None:
        """Refuse new connections; tell every connection to go, and close it."""
        self._now = now
        self.closing = True
        notice = p.encode_error(
            p.ErrorCode.SHUTTING_DOWN,
            "server is shutting down",
            retry_after=self.config.shutdown_retry_after,
        )
        for c in list(self._conns.values()):
            if c.core.close_code is None:
                self._out.append(Send(c.id, [notice]))
                c.core.close(p.CloseCode.GOING_AWAY, "server shutting down")
            self._flush(c)

    def _flush(self, c: Conn, received: bool = False) -> None:
        """Turn what the connection's core produced into commands.

        ``received``: after a frame from the peer, which only moves the
        connection's deadlines later, so a deadline already in the heap stands.
        """
        core = c.core
        frames = core.data_to_send()
        if frames:
            self._out.append(Send(c.id, frames))
        if core.close_code is not None:
            if self._conns.pop(c.id, None) is not None:  # closed now: say so once
                self.addresses.remove(c.limits.address)
                self._out.append(Close(c.id, core.close_code, core.close_reason))
                c.scheduled = None
                self._closed(c)
            return
        if not (received and c.scheduled is not None):
            self._schedule(c)

    def _closed(self, c: Conn) -> None:
        """The hub closed the connection: it counts as gone, as if the peer had left."""
        session = c.session
        if session is not None and session.conn is c:
            session.conn = None
            self._enqueue(session, self._detach(session, goodbye=False))

    def _send(self, c: Conn | None, text: str) -> None:
        if c is not None and c.core.close_code is None:
            self._out.append(Send(c.id, [text]))

    # ------------------------------------------------------------------
    # Streams

    def entry_appended(self, entry: StreamEntry) -> None:
        """An entry of a stream this node follows: deliver it to its local members."""
        self._out.extend(self.sessions.skip_notices(entry))
        conns = self.sessions.recipients(entry)
        if conns:
            self._out.append(Deliver(entry.text, conns))

    def session_replaced(self, session_id: str, now: float) -> None:
        """Another node resumed one of our sessions: close its connection here with 4006."""
        self._now = now
        session = self.sessions.by_id.get(session_id)
        if session is None:
            return
        old, session.conn = session.conn, None
        if old is not None:
            old.session = None
            old.core.close(p.CloseCode.SESSION_REPLACED, "session resumed on another connection")
            self._flush(old)
        self._enqueue(session, self.sessions.drop_local(session))

    # ------------------------------------------------------------------
    # Operations the driver starts (Context.join / leave); each ends with Finished

    def join(self, session_id: str, ns: str, room: str, now: float) -> int:
        """Put a session in a room; ``Finished.result`` is the stream's (epoch, offset)."""
        self._now = now
        return self._start(self.rooms.join(self.sessions.by_id[session_id], ns, room), report=True)

    def leave(self, session_id: str, ns: str, room: str, now: float) -> int:
        self._now = now
        return self._start(self.rooms.leave(self.sessions.by_id[session_id], ns, room), report=True)

    # ------------------------------------------------------------------
    # Running operations

    def call_done(self, op_id: int, result: Any, now: float) -> None:
        """The result of operation ``op_id``'s outstanding call."""
        self._now = now
        running = self._ops.pop(op_id)
        self._step(running, result, None)

    def call_failed(self, op_id: int, error: BaseException, now: float) -> None:
        """Operation ``op_id``'s outstanding call raised ``error``."""
        self._now = now
        running = self._ops.pop(op_id)
        self._step(running, None, error)

    def _start(
        self,
        gen: Op,
        *,
        session: Session | None = None,
        conn: Conn | None = None,
        report: bool = False,
        answers: Conn | None = None,
    ) -> int:
        self._seq += 1
        running = Running(self._seq, gen, session, conn, report, answers)
        self._step(running, None, None)
        return running.id

    def _enqueue(self, session: Session, gen: Op, answers: Conn | None = None) -> None:
        """Run ``gen`` after the session's earlier operations.

        ``answers``: the operation answers a message from this connection;
        it gets the operation's result, and its count of busy messages drops.
        """
        if session.busy:
            session.wait(gen, answers)
            return
        session.busy = True
        self._seq += 1  # _start, inline (every message)
        self._step(Running(self._seq, gen, session, None, False, answers), None, None)

    def _step(self, running: Running, value: Any, error: BaseException | None) -> None:
        """Run the operation to its next call that the driver must await (or to its end)."""
        gen, answer_now, handle_now = running.gen, self._answer_now, self._handle_now
        while True:
            try:
                call = gen.send(value) if error is None else gen.throw(error)
            except StopIteration as stop:
                c = running.answers
                session = running.session
                if c is None or session is None or running.report:
                    self._ended(running, stop.value, None)
                    return
                # A client message answered: _ended, inline (every message).
                c.busy -= 1
                if c.core.close_code is None:
                    self._out.append(Send(c.id, [stop.value]))
                if session.queue:
                    gen, answers = session.queue.popleft()
                    self._start(gen, session=session, answers=answers)
                else:
                    session.busy = False
                return
            except Exception as exc:  # a bug, or a broker that failed: report it, keep serving
                # Failed half-way: close, so the client reconnects and resends what has no
                # answer; 1013 (try again later) when the broker is out of reach, else 1011.
                code, reason = p.CloseCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"
                if isinstance(exc, BrokerUnavailable):
                    log.warning("server operation failed: %s", exc)
                    code, reason = p.CloseCode.TRY_AGAIN_LATER, "broker unavailable; try again"
                else:
                    log.exception("server operation failed")
                c = running.conn or (running.session.conn if running.session is not None else None)
                if c is not None and c.core.close_code is None:
                    c.core.close(code, reason)
                    self._flush(c)
                self._ended(running, None, exc)
                return
            try:  # the calls the driver can answer at once: taken here, no trip through it
                if type(call) is Handle:
                    if handle_now is None:
                        break
                    value = handle_now(call)
                elif answer_now is not None and type(call) is BrokerCall:
                    value = answer_now(call.method, call.args)
                else:
                    break
                error = None
            except Exception as exc:
                value, error = None, exc
                continue
            if value is LATER:
                break
        call.op = running.id
        self._ops[running.id] = running
        self._out.append(call)

    def _ended(self, running: Running, result: Any, error: BaseException | None) -> None:
        if running.report:
            self._out.append(Finished(running.id, result, error))
        c = running.answers
        if c is not None:
            c.busy -= 1
            if error is None and c.core.close_code is None:  # _send, inline (every message)
                self._out.append(Send(c.id, [result]))
        session = running.session
        if session is None:
            return
        if session.queue:
            gen, answers = session.queue.popleft()
            self._start(gen, session=session, answers=answers)
        else:
            session.busy = False

    # ------------------------------------------------------------------
    # Hello: the handshake decision

    def _handshake(self, c: Conn, hello: p.HelloFrame) -> Op:
        """The hello, then the frames that came while it was handled, in order."""
        try:
            yield from self._hello(c, hello)
        finally:
            early, c.early = c.early or [], None
            for text in early:
                if c.early is not None:  # a second hello: it queues the rest itself
                    c.early.append(text)
                elif c.id in self._conns:
                    self._receive(c, text, self._now)

    def _hello(self, c: Conn, hello: p.HelloFrame) -> Op:
        c.client = hello.client
        if hello.batch:
            self._out.append(Batching(c.id))
        identity = yield from identify(c.core, hello, self._authenticates, c.bearer)
        if c.core.close_code is not None:
            self._flush(c)
            return
        user, c.claims = identity.user, identity.claims
        if identity.expires_in is not None:
            # Stale credentials end the connection (TOKEN_EXPIRED) a grace period after
            # they expire; the client comes back with fresh ones and resumes.
            when = self._now + max(0.0, identity.expires_in) + self.config.token_expiry_grace
            self._at(when, CredentialsExpiry(c))
        record: SessionRecord | None = None
        if hello.resume is not None:
            record = yield BrokerCall("load_session", (hello.resume.token,))
            if record is not None and record.user != user:
                record = None  # a token is bound to its user: nobody else resumes it
        if record is None:
            session_id, token = self._new_session()
            record = SessionRecord(session_id, token, user)
            refused: list[p.StreamPosition] = []
            if hello.resume is not None:
                refused = yield from restore_rooms(record, hello.resume, self._namespaces, c.claims)
                refused += cap_rooms(record, hello.resume, self.config.max_rooms)
                if hello.resume.session is not None:
                    record.previous.append(hello.resume.session)
            record.owner = self.node
            yield BrokerCall("save_session", (record, None))
            session = yield from self.sessions.attach_record(record)
            session.highest = 0  # made here: every message it processes, this node sees
            yield from self._attach(c, session, False, hello.resume, refused)
            return
        previous_owner, record.owner = record.owner, self.node
        yield BrokerCall("save_session", (record, None))
        if previous_owner is not None and previous_owner != self.node:
            yield BrokerCall("replace", (previous_owner, record.id))
        session = yield from self.sessions.attach_record(record)
        if previous_owner is not None and previous_owner != self.node:
            session.highest = None  # another node may have processed its messages
        old = session.conn
        if old is not None and old is not c and c.core.close_code is None:
            if old.id > c.id:  # a newer connection (ids grow) holds the session: we are stale
                c.core.close(p.CloseCode.SESSION_REPLACED, "session resumed on a newer connection")
                self._flush(c)
                return
            old.session = None
            session.conn = None
            old.core.close(p.CloseCode.SESSION_REPLACED, "session resumed on another connection")
            self._flush(old)
        assert hello.resume is not None
        yield BrokerCall("forget_replies", (record.id, hello.resume.last_reply))
        yield from self._attach(c, session, True, hello.resume, [])

    def _attach(
        self,
        c: Conn,
        session: Session,
        resumed: bool,
        resume: p.ResumeInfo | None,
        refused: list[p.StreamPosition],
    ) -> Op:
        if c.core.close_code is not None:
            # The connection went while the session was looked up: detach it at once.
            if session.conn is None:
                self._enqueue(session, self._detach(session, goodbye=False))
            return
        c.session = session
        session.conn = c
        session.claims = c.claims
        session.client = c.client
        session.replaying = True
        session.held = []
        try:
            inbox_epoch, inbox_offset = yield BrokerCall("position", (session.inbox,))
            c.core.accept(
                p.WelcomeFrame(
                    protocol=p.PROTOCOL_VERSION,
                    session=session.id,
                    token=session.record.token,
                    resumed=resumed,
                    heartbeat=self._heartbeat,
                    limits=self._limits,
                    inbox=p.StreamPosition(
                        stream=session.inbox, epoch=inbox_epoch, offset=inbox_offset
                    ),
                ),
                self._now,
            )
            self._flush(c)
            for position in refused:
                self._send(
                    c,
                    gap_frame(
                        position.stream,
                        position.ns or p.DEFAULT_NAMESPACE,
                        position.room,
                        position.epoch,
                        position.offset,
                        "not_rejoined",
                    ),
                )
            covered: Covered = {session.inbox: (inbox_epoch, inbox_offset)}
            if resume is not None:
                self.stats.replays += 1
                if resume.session is not None:
                    session.own.add(resume.session)
                covered.update((yield from replay(session, resume, lambda t: self._send(c, t))))
            release_held(session, covered, lambda t: self._send(c, t))
        finally:
            session.replaying = False
            session.held = []
        yield from self.rooms.enter_all(session)  # (again) present in its rooms
        self._renew_later()

    # ------------------------------------------------------------------
    # Sessions

    def _detach(self, session: Session, goodbye: bool) -> Op:
        """The session's connection is gone: keep the session for resume, or end it."""
        if session.conn is not None:
            return  # resumed meanwhile
        if goodbye and not self.closing:
            yield from self.rooms.exit_all(session, "closed")
            yield BrokerCall("delete_session", (session.record,))
            yield from self.sessions.drop_local(session)
            return
        # Not a goodbye (or this node is stopping): the record stays in the broker
        # for its TTL, so this node or another can resume it.
        session.record.owner = None
        yield BrokerCall("save_session", (session.record, self.config.session_ttl))
        if self.closing:
            yield from self.sessions.drop_local(session)
        elif session.conn is None:
            self._schedule_expiry(session, self._now + self.config.session_ttl)
            if session.present:  # present while it may resume; then it leaves its rooms
                self._at(self._now + self.config.presence_grace, PresenceTimer(session))

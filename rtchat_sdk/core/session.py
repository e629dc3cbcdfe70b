"""The client's sans-I/O state machine: ids, outbox, replies, offsets, heartbeats.

``ClientSession`` does no I/O and reads no clock. The driver feeds it what
happened and the time it happened at, and collects what to do:

* ``connection_made(now)`` / ``connection_lost(now)``: the transport's life;
* ``receive_text(text, now)``: one frame from the server;
* ``emit`` / ``request`` / ``publish`` / ``join`` / ``leave``: the app sends;
* ``data_to_send()``: frames for the driver to write, in order
  (``has_data_to_send()`` says whether there are any);
* ``events_received()``: what the app must hear about (replies, deliveries...);
* ``get_timer()`` / ``handle_timer(now)``: the next deadline and its handling.

Rules:

1. Every app message gets the next id and enters the outbox before anything
   is written; it leaves the outbox only on its reply or error, on expiry, or
   when the overflow policy drops it. Nothing is ever silently discarded:
   each exit produces an event.
2. Frames other than ``hello`` are written only after ``welcome``. Then the
   outbox is written in id order through the in-flight window of PROTOCOL
   §10.2 (``window.Window``). After a reconnect everything unanswered is
   written again.
   A message past its deadline is never written, even if the driver's timer
   has not fired yet: whichever call first sees the time expires it.
3. A delivery whose offset is not above the stream's last handled offset is a
   duplicate: counted and dropped. A new epoch or a ``gap`` frame is reported.
4. Heartbeats: a ``ping`` at most ``interval`` apart (spread at random over its
   last tenth, ``ping_spread``) while connected; no frame at all
   for ``interval + timeout`` means the link is dead (``LinkDead``).
5. A resume that the server cannot honour (``welcome.resumed`` false) keeps
   the rooms: the server rejoins them from the positions in the hello and
   replays or reports a gap per stream; only the old inbox is lost, and that
   is reported here as a ``session_unknown`` gap.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from .. import protocol as p
from ..backoff import refusal_error
from ..errors import InvalidState, MessageTooLarge
from ..outbox import HandledPosition, Outbox, OutboxEntry
from ..protocol.fastpath import encode_message
from ..protocol.heartbeat import Heartbeat
from .calls import AppCalls
from .events import (
    ConnectionState,
    Delivered,
    Dropped,
    Failed,
    GapReported,
    LinkDead,
    ProtocolViolation,
    Refused,
    Replied,
    RoundTrip,
    ServerNotice,
    SessionCounters,
    SessionEvent,
    TimedOut,
    Welcomed,
)
from .resume import resume_info
from .window import Deadlines, Window

__all__ = ["ClientSession"]

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_IN_FLIGHT = 1_000
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024
_HANDSHAKING = (ConnectionState.CONNECTING, ConnectionState.RECONNECTING)  # hello unanswered
_RESEND_LATER = frozenset({p.ErrorCode.UNAVAILABLE, p.ErrorCode.RATE_LIMITED})
"""Errors that do not settle a message: not processed, write it again after ``retry_after``."""


class ClientSession(AppCalls):
    """Client protocol state for one logical session, across many connections
    (the app's calls, each made a frame by ``_queue``: ``calls.py``)."""

    def __init__(
        self,
        *,
        outbox: Outbox | None = None,
        auth: dict[str, Any] | None = None,
        client_name: str | None = "rtchat-python",
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        first_id: int = 1,
        ping_spread: float = p.PING_SPREAD,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.outbox = outbox if outbox is not None else Outbox()
        self.auth = auth
        self.client_name = client_name
        self.handshake_timeout = handshake_timeout
        self.state = ConnectionState.IDLE
        """The connection as the core sees it (what each value means: ``ConnectionState``)."""
        self.session_id: str | None = None
        self.token: str | None = None
        self.streams: dict[str, HandledPosition] = {}
        self.rooms: dict[tuple[str, str], str] = {}
        self.counters = SessionCounters()
        self.rtt: float | None = None
        self._to_send: list[str] = []
        self._events: list[SessionEvent] = []
        self._timer: float | None = None  # what get_timer() returns, unless _timer_stale
        self._timer_stale = True
        self.heartbeat = Heartbeat(ping_always=True, spread=ping_spread, random=random)
        """The deadlines of PROTOCOL §9: our pings, and when the server counts as gone."""
        self.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES
        self._hello_at = 0.0
        self._ever_sent: set[int] = set()
        self._unlisted_rooms: list[str] = []
        self._tracked_early: dict[int, str] = {}
        """Joins with ``since``, by id: the stream tracked before the reply (dropped if
        the join fails)."""
        self._now = float("-inf")  # the latest time any call told us
        saved = self.outbox.load_state()
        self._window = Window(self.outbox, max_in_flight=max_in_flight, first_id=first_id)
        self._deadlines = Deadlines(self.outbox)
        if saved is not None:
            self.session_id, self.token = saved.session_id, saved.token
            self.streams = dict(saved.streams)
            self.rooms = dict(saved.rooms)
            self._window.next_id = max(first_id, saved.next_id)
            self._window.restart()

    # ------------------------------------------------------------------
    # Output

    def data_to_send(self) -> list[str]:
        """Frames to write, in order; the list is handed over and cleared."""
        out, self._to_send = self._to_send, []
        return out

    def has_data_to_send(self) -> bool:
        """Whether ``data_to_send()`` would return any frame (a cheap check)."""
        return bool(self._to_send)

    def events_received(self) -> list[SessionEvent]:
        """Events for the app, in order; the list is handed over and cleared."""
        out, self._events = self._events, []
        return out

    # ------------------------------------------------------------------
    # Transport life

    def connection_made(self, now: float) -> None:
        """A transport is up: say hello (with resume info when we have a session)."""
        if self.state is ConnectionState.CLOSED:
            raise InvalidState("session is closed")
        self._now = now
        again = self.counters.connections > 0
        self.state = ConnectionState.RECONNECTING if again else ConnectionState.CONNECTING
        self._hello_at = now
        self.heartbeat.connected(now, self.handshake_timeout)
        self._timer_stale = True
        resume = None
        self._unlisted_rooms = []
        if self.token is not None:
            resume, self._unlisted_rooms = resume_info(
                self.token, self.session_id, self.last_reply, self.streams
            )
        hello = p.HelloFrame(
            protocol=p.PROTOCOL_VERSION,
            auth=self.auth,
            resume=resume,
            client=self.client_name,
            batch=True,
        )
        self._to_send.append(p.encode(hello))

    def connection_lost(self, now: float) -> None:
        """The transport is gone: everything unanswered will be written again."""
        if self.state is ConnectionState.CLOSED:
            return
        self.state = ConnectionState.IDLE
        self._to_send.clear()
        self._window.restart()
        self.heartbeat.stopped()
        self._timer_stale = True
        self.handle_timer(now)

    def close(self) -> None:
        """No more connections; pending entries stay in the outbox for the caller."""
        self.state = ConnectionState.CLOSED
        self._to_send.clear()
        self.heartbeat.stopped()
        self._timer_stale = True

    def keepalive(self, now: float) -> None:
        """Count the server as alive now: the driver has paused reading on purpose."""
        self.heartbeat.heard(now)
        self._timer_stale = True

    def ping(self, now: float) -> None:
        """Send a heartbeat now (its pong yields a RoundTrip event)."""
        if self.state is ConnectionState.CONNECTED:
            self._to_send.append(p.encode_ping(now))

    @property
    def last_reply(self) -> int:
        """Every message id up to this one has been answered (or given up)."""
        return self._window.lowest_unanswered() - 1

    @property
    def in_flight(self) -> int:
        """How many messages are written on this connection and not answered."""
        return len(self._window)

    # ------------------------------------------------------------------
    # Sending

    def _queue(
        self,
        kind: str,
        ns: str,
        event: str | None,
        room: str | None,
        data: Any,
        echo: bool,
        now: float,
        expires_in: float | None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[int, list[Dropped]]:
        if self.state is ConnectionState.CLOSED:
            raise InvalidState("session is closed")
        self._now = max(self._now, now)
        window = self._window
        message_id = window.next_id
        text = encode_message(kind, message_id, ns, event, room, data, echo, extra)
        size = p.wire_size(text)
        if size > self.max_frame_bytes:
            raise MessageTooLarge(
                f"{kind} is {size} bytes encoded; the server accepts at most {self.max_frame_bytes}"
            )
        expires_at = None if expires_in is None else now + expires_in
        dropped = self.outbox.add(OutboxEntry(message_id, kind, text, expires_at))
        window.queue(message_id)
        evicted = [Dropped(e.id, e.kind) for e in dropped]
        for e in dropped:
            self._give_up(e)
        self.counters.dropped += len(evicted)
        if expires_at is not None:
            self._deadlines.add(expires_at, message_id)
            if self._timer is None or expires_at < self._timer:
                self._timer_stale = True
        self._pump()
        return message_id, evicted

    def _pump(self) -> None:
        """Write queued messages, in order, while the in-flight window (``Window``) allows."""
        if self.state is not ConnectionState.CONNECTED:
            return
        window = self._window
        while (entry := window.take()) is not None:
            message_id = entry.id
            if entry.expires_at is not None and entry.expires_at <= self._now:
                window.discard(message_id)  # not written after all
                self._expire(entry)  # overdue, though the driver's timer has not fired yet
                continue
            self._to_send.append(entry.text)
            if message_id in self._ever_sent:
                self.counters.resent += 1
            else:
                self._ever_sent.add(message_id)
                self.counters.sent += 1

    def _expire(self, entry: OutboxEntry) -> None:
        self._give_up(entry)
        self.counters.timed_out += 1
        self._events.append(TimedOut(entry.id, entry.kind))

    def _give_up(self, entry: OutboxEntry) -> None:
        """The app stops waiting (expired, dropped): never written again.

        If it is on the wire it keeps its in-flight slot until the server
        answers or the link drops: the server will still run it, and the window
        must count it, or the server's dedupe could lose an older reply.
        """
        self.outbox.remove(entry.id)
        self._ever_sent.discard(entry.id)
        self._deadline_gone(entry)

    def _settle(self, message_id: int) -> OutboxEntry | None:
        entry = self.outbox.remove(message_id)
        self._window.discard(message_id)
        self._ever_sent.discard(message_id)
        if entry is not None:
            self._deadline_gone(entry)
        return entry

    def _deadline_gone(self, entry: OutboxEntry) -> None:
        """``entry`` left the outbox: the next deadline moves if it was this one."""
        if entry.expires_at is not None and (
            self._timer is None or entry.expires_at <= self._timer
        ):
            self._timer_stale = True

    # ------------------------------------------------------------------
    # Receiving

    def receive_text(self, text: str | bytes, now: float) -> None:
        """Handle one message from the server: a frame, or a batch of frames in order."""
        self._now = now
        heartbeat = self.heartbeat
        old = heartbeat.dead_at
        heartbeat.heard(now)
        dead_at = heartbeat.dead_at
        if dead_at != old:
            timer = self._timer
            if timer is None or old is None or dead_at is None or old <= timer or dead_at < timer:
                self._timer_stale = True  # else it was not, and is not, the next deadline
        try:
            frames = p.decode_server_message(text)
        except ValidationError as exc:
            self._events.append(ProtocolViolation(f"undecodable server frame: {exc}"))
            return
        for frame in frames:
            self._on_frame(frame, now)

    def _on_frame(self, frame: p.ServerFrame, now: float) -> None:
        match frame:
            case p.MessageFrame():
                self._on_message(frame)
            case p.ReplyFrame():
                self._on_reply(frame)
            case p.ErrorFrame():
                self._on_error(frame)
            case p.PingFrame():
                self._to_send.append(p.encode_pong(frame.ts))
            case p.PongFrame():
                self.rtt = max(0.0, now - frame.ts)
                self._events.append(RoundTrip(self.rtt))
            case p.GapFrame():
                self._on_gap(frame)
            case p.WelcomeFrame():
                self._on_welcome(frame, now)

    def _on_welcome(self, frame: p.WelcomeFrame, now: float) -> None:
        if self.state not in _HANDSHAKING:
            self._events.append(ProtocolViolation("unexpected welcome"))
            return
        self.counters.connections += 1
        if not frame.resumed and self.session_id is not None:
            # The old session is gone on the server. Its rooms are rejoined by the
            # server from our hello; its inbox is lost, and we say so.
            old_inbox = p.inbox_stream(self.session_id)
            lost = self.streams.get(old_inbox)
            if lost is not None:
                self._report_gap(
                    old_inbox, lost.ns, None, lost.epoch, lost.offset, "session_unknown"
                )
                self._set_stream(old_inbox, None)
            for stream in self._unlisted_rooms:
                self._drop_room(stream, "not_rejoined")
        self.max_frame_bytes = frame.limits.max_frame_bytes
        for entry in self.outbox:
            if entry.size > self.max_frame_bytes:
                self._settle(entry.id)
                self._events.append(
                    Failed(
                        entry.id,
                        entry.kind,
                        p.ErrorCode.TOO_LARGE,
                        f"{entry.size} bytes; the server accepts at most {self.max_frame_bytes}",
                    )
                )
        self.state = ConnectionState.CONNECTED
        self.session_id = frame.session
        self.token = frame.token
        self.outbox.save_session(self.session_id, self.token, self.rooms)
        inbox = frame.inbox
        if inbox is not None and inbox.stream not in self.streams:
            self._set_stream(
                inbox.stream, HandledPosition(inbox.epoch, inbox.offset, p.DEFAULT_NAMESPACE, None)
            )
        self._window.server_allows(frame.limits.max_in_flight)
        # Pings timed from our hello, as the server's silence clock is (PROTOCOL §9):
        # timed from welcome, a slow handshake would let the server ping us first.
        self.heartbeat.opened(
            frame.heartbeat.interval, frame.heartbeat.timeout, now, first_ping_from=self._hello_at
        )
        self._timer_stale = True
        self._events.append(Welcomed(frame.session, frame.resumed, frame.limits))
        self._pump()

    def _on_reply(self, frame: p.ReplyFrame) -> None:
        entry = self._settle(frame.id)
        if entry is None:
            self._pump()  # answer to a message we gave up on: its slot is free now
            return
        if entry.kind == "join":
            self._tracked_early.pop(frame.id, None)
            self._on_joined(entry, frame.data)
        elif entry.kind == "leave":
            self._on_left(entry)
        self._events.append(Replied(frame.id, entry.kind, frame.data))
        self._pump()

    def _on_joined(self, entry: OutboxEntry, data: Any) -> None:
        join = p.JoinFrame.model_validate_json(entry.text)
        try:
            position = p.StreamPosition.model_validate(data)
        except ValidationError:
            self._events.append(ProtocolViolation(f"bad join reply: {data!r}"))
            return
        self.rooms[(join.ns, join.room)] = position.stream
        self.outbox.save_session(self.session_id, self.token, self.rooms)
        stream, epoch, offset = position.stream, position.epoch, position.offset
        known = self.streams.get(stream)
        if known is None or known.epoch != epoch:
            if known is not None:  # joined again into a new epoch: what followed is gone
                self._report_gap(stream, join.ns, join.room, epoch, offset, "epoch_changed")
            self._set_stream(stream, HandledPosition(epoch, offset, join.ns, join.room))

    def _on_left(self, entry: OutboxEntry) -> None:
        leave = p.LeaveFrame.model_validate_json(entry.text)
        stream = self.rooms.pop((leave.ns, leave.room), None)
        if stream is not None:
            self.outbox.save_session(self.session_id, self.token, self.rooms)
            self._set_stream(stream, None)

    def _on_error(self, frame: p.ErrorFrame) -> None:
        if frame.id is None:
            if self.state in _HANDSHAKING:
                fatal = refusal_error(frame.code, frame.message) is not None
                self._events.append(Refused(frame.code, frame.message, fatal, frame.retry_after))
            else:
                self._events.append(ServerNotice(frame.code, frame.message, frame.retry_after))
            return
        if frame.code in _RESEND_LATER and frame.id in self.outbox:
            self._window.later(frame.id, self._now + (frame.retry_after or 1.0))  # not failed
            self.counters.retried += 1
            self._timer_stale = True
            return
        entry = self._settle(frame.id)
        if entry is None:
            self._pump()
            return
        early = self._tracked_early.pop(frame.id, None)
        if early is not None and early not in self.rooms.values():
            self.streams.pop(early, None)  # not joined after all
        self._events.append(Failed(frame.id, entry.kind, frame.code, frame.message, frame.details))
        self._pump()

    def _on_message(self, frame: p.MessageFrame) -> None:
        known = self.streams.get(frame.stream)
        if known is not None and known.epoch == frame.epoch:
            if frame.offset <= known.offset:
                self.counters.duplicates_dropped += 1
                return
            known.offset = frame.offset
        else:
            if known is not None:
                # New epoch without a gap frame: the server lost history. Be loud.
                self._report_gap(
                    frame.stream,
                    frame.ns,
                    frame.room,
                    frame.epoch,
                    frame.offset - 1,
                    "epoch_changed",
                )
            self.streams[frame.stream] = HandledPosition(
                frame.epoch, frame.offset, frame.ns, frame.room
            )
        self._events.append(Delivered(frame))

    def _on_gap(self, frame: p.GapFrame) -> None:
        if frame.reason == "not_rejoined":
            self._drop_room(frame.stream, frame.reason, frame.epoch, frame.offset)
            return
        offset = frame.offset
        known = self.streams.get(frame.stream)
        if known is not None and known.epoch == frame.epoch and known.offset > offset:
            offset = known.offset  # never back within an epoch: that would take duplicates
        # In memory now; persisted by gap_handled(), in order with the deliveries.
        self.streams[frame.stream] = HandledPosition(frame.epoch, offset, frame.ns, frame.room)
        self._report_gap(frame.stream, frame.ns, frame.room, frame.epoch, offset, frame.reason)

    def _drop_room(self, stream: str, reason: str, epoch: str = "", offset: int = 0) -> None:
        """The server did not put the session back in a room: forget it, loudly."""
        position = self.streams.get(stream)
        ns = position.ns if position is not None else p.DEFAULT_NAMESPACE
        room = position.room if position is not None else None
        for key, name in list(self.rooms.items()):
            if name == stream:
                del self.rooms[key]
                ns, room = key
        self.outbox.save_session(self.session_id, self.token, self.rooms)
        self._set_stream(stream, None)
        if position is not None and not epoch:
            epoch, offset = position.epoch, position.offset
        self._report_gap(stream, ns, room, epoch, offset, reason)

    def _report_gap(
        self, stream: str, ns: str, room: str | None, epoch: str, offset: int, reason: str
    ) -> None:
        """Entries of ``stream`` up to (epoch, offset) will never come: tell the app."""
        self.counters.gaps += 1
        self._events.append(GapReported(stream, ns, room, epoch, offset, reason))

    def delivery_handled(self, frame: p.MessageFrame) -> None:
        """The app's handlers are done with ``frame``: its position may be persisted.

        Positions are persisted after handling, not on receipt, so a process
        killed in between is replayed the message again (at least once across
        a kill; exactly once within a process).
        """
        self._persist(frame.stream, frame.epoch, frame.offset, frame.ns, frame.room)

    def gap_handled(self, gap: GapReported) -> None:
        """The app has been told of ``gap``: the position after it may be persisted."""
        self._persist(gap.stream, gap.epoch, gap.offset, gap.ns, gap.room)

    def _persist(self, stream: str, epoch: str, offset: int, ns: str, room: str | None) -> None:
        if type(self.outbox).save_stream is Outbox.save_stream:
            return  # an outbox that keeps nothing (the in-memory one)
        current = self.streams.get(stream)
        if current is None or current.epoch != epoch or current.offset < offset:
            return  # left, or replaced meanwhile: nothing older may overwrite it
        self.outbox.save_stream(stream, HandledPosition(epoch, offset, ns, room))

    def _set_stream(self, name: str, position: HandledPosition | None) -> None:
        """Record (or forget) a stream position, in memory and in the outbox."""
        if position is None:
            self.streams.pop(name, None)
        else:
            self.streams[name] = position
        self.outbox.save_stream(name, position)

    # ------------------------------------------------------------------
    # Time

    def get_timer(self) -> float | None:
        """The next moment ``handle_timer`` has work to do, or None; worked out again only
        after something moved a deadline (most frames and sends do not)."""
        if not self._timer_stale:
            return self._timer
        times = (self.heartbeat.deadline(), self._deadlines.first(), self._window.next_retry())
        self._timer = min((t for t in times if t is not None), default=None)
        self._timer_stale = False
        return self._timer

    def handle_timer(self, now: float) -> None:
        """Expire messages, send a heartbeat, or declare the link dead."""
        self._now = now
        self._timer_stale = True
        while (entry := self._deadlines.pop_due(now)) is not None:
            self._expire(entry)
        self._window.retry_due(now)
        due = self.heartbeat.due(now)
        if due == "dead":
            waited = self.heartbeat.silent_for(now)
            self._events.append(LinkDead(f"no frame from the server for {waited:.1f}s"))
            return
        if due == "ping":
            self._to_send.append(p.encode_ping(now))
        self._pump()

"""Stateful property test: the client core against a model server over a lossy link.

The model
=========

* The client is the real ``ClientSession`` (the sans-I/O core). The app in
  front of it joins the room, then sends emits and publishes (with and without
  an expiry, publishes with and without echo), requests (with and without a
  timeout) and joins again, each message with a unique payload, and records
  every event the session hands it.
* The server is ``ModelServer``: a small pure-Python stand-in for
  ``server_ref`` that speaks the real wire frames (``rtchat_sdk.protocol``).
  It answers ``hello`` with ``welcome`` (resumed when it knows the token),
  processes messages one at a time in arrival order, deduplicates them by id
  (a processed id gets its stored reply again and is not processed again;
  replies up to ``resume.last_reply`` are forgotten), keeps a room stream and
  a per-session inbox with offsets, delivers live to the attached session, and
  after ``hello`` replays each followed stream after the position the client
  presents (with a ``trimmed`` gap frame when its history is bounded and no
  longer reaches back). A session it no longer knows is replaced by a new one,
  put back in the rooms the hello names and replayed from there, as
  ``server_ref`` does. It answers ``ping`` with ``pong``.
* The link is two FIFO queues of frames, client->server and server->client.
  Rules deliver one frame at a time (or a few, or everything in flight), or
  drop the link: both queues are lost and both sides are told. The client
  reconnects (``connection_made``, then ``hello``) when a rule says so.
* Around them: other publishers append to the room, the server writes to the
  client's inbox, the server re-sends recent deliveries (duplicates arriving
  after newer frames), and the clock moves, firing the client's timers at
  their deadlines as the driver's ``call_at`` does (message expiry and request
  timeouts, heartbeat pings, and LinkDead, which drops the link).

What is proven
==============

After every step:

1. Within one server session, every message is processed at most once, in the
   order the client created them (ids strictly increasing), with the kind and
   payload the app gave. The server is never sent a message whose reply it
   was allowed to forget.
2. The app hears at most one outcome per message (``Replied``, ``Failed``,
   ``TimedOut``, or ``Dropped`` by the overflow policy), of the right kind, and
   a reply or error is one the server gave when it processed that message.
3. No frame of a message is written after the app heard its outcome, nor at
   or after its deadline (a request is never sent after its timeout); a frame
   that reaches the server later was on the wire before.
4. No frame is written without a connection, never more than the server's
   ``max_in_flight`` messages are unanswered on a connection (a message leaves
   the count when the app hears its outcome; see ``TimedOutMessagesStayInFlight``
   for the stricter count), and every timer the session asks for moves
   forward once handled.
5. Deliveries handed to the app have strictly increasing offsets per stream
   (no duplicate, no reordering, across reconnects), each byte-for-byte the
   server's entry at that offset; a gap only ever moves the app forward.

After healing (reconnect, then deliver everything until nothing moves):

6. The outbox is empty and every message has exactly one outcome; every
   message not given up (``TimedOut``/``Dropped``) was processed exactly once.
7. The app has every offset the server owes it on every stream it followed
   (the inbox of each session it was welcomed into; the room after its join
   position, minus its own publishes sent without echo), except offsets a
   ``GapReported`` covers: nothing is lost silently.

Variants
========

* ``ClientAndServerOverLossyLink``: unbounded history and outbox.
* ``BoundedHistoryAndOutbox``: trimmed gaps, and a small drop-oldest outbox.
* ``SessionsExpireWhileAway``: the server forgets the session while the client
  is away (session TTL). The dedupe window is the session's life, so 1 and 6
  hold per server session: a message a forgotten session ran but whose reply
  never arrived may run again in the new one (docs/reliability.md), and only
  then; the old inbox is lost and must be reported (``session_unknown``), and
  the room must continue from the client's position with nothing missing.
* ``DriverTimerRunsLate``: input reaches the core past a deadline before the
  driver's timer has fired (found the bug fixed in 9f609a2).
* ``TimedOutMessagesStayInFlight``: the window counts every written message
  until the server answers it, and the server keeps only ``max_in_flight``
  replies (found the bug fixed in cc076d7).

Leaving a room is not modelled.
"""

from __future__ import annotations

import sys
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from rtchat_sdk import protocol as p
from rtchat_sdk.core import (
    ClientSession,
    Delivered,
    Dropped,
    Failed,
    GapReported,
    LinkDead,
    Replied,
    RoundTrip,
    SessionEvent,
    SessionState,
    TimedOut,
    Welcomed,
)
from rtchat_sdk.outbox import Outbox, OverflowPolicy

# A hang guard: a passing run takes seconds, shrinking a failure can take a minute.
pytestmark = pytest.mark.timeout(180)

NS = p.DEFAULT_NAMESPACE
ROOM = "lobby"
ROOM_STREAM = p.room_stream(NS, ROOM)
EPOCH = "epoch-1"
OTHER_PUBLISHER = "someone-else"

HEARTBEAT = p.HeartbeatInfo(interval=5.0, timeout=3.0)
HANDSHAKE_TIMEOUT = 10.0
CLIENT_MAX_IN_FLIGHT = 3
SERVER_MAX_IN_FLIGHT = 2
"""The server's window is the smaller: the client must honour the minimum."""

MessageFrameFromClient = p.EmitFrame | p.RequestFrame | p.PublishFrame | p.JoinFrame | p.LeaveFrame
Outcome = Replied | Failed | TimedOut | Dropped


# --------------------------------------------------------------------------
# The model server


@dataclass(frozen=True, slots=True)
class StreamEntry:
    offset: int
    sender: str | None
    echo: bool
    text: str
    """The encoded ``message`` frame, identical for live delivery and replay."""


@dataclass(slots=True)
class ModelStream:
    name: str
    room: str | None
    entries: list[StreamEntry] = field(default_factory=list)

    @property
    def head(self) -> int:
        return len(self.entries)


@dataclass(slots=True)
class ModelSession:
    id: str
    token: str
    joined_at: dict[str, int] = field(default_factory=dict)
    """Room stream -> the position this session joined it at."""
    processed: set[int] = field(default_factory=set)
    replies: dict[int, str] = field(default_factory=dict)
    """Stored replies: none up to ``resume.last_reply``, at most the newest dedupe size."""
    heads_when_forgotten: dict[str, int] | None = None
    """Set when the server forgot the session: each followed stream's head then."""
    previous: str | None = None
    """The lost session this one replaced (``hello.resume.session``): its publishes are
    this client's own too. (server_ref honours that only in the replay right after the
    restore; a later resume of this session replays them.)"""

    @property
    def inbox(self) -> str:
        return p.inbox_stream(self.id)

    @property
    def forgotten(self) -> bool:
        return self.heads_when_forgotten is not None

    def followed_from(self) -> dict[str, int]:
        """Every stream this session follows -> the position it follows it from."""
        return {self.inbox: 0, **self.joined_at}

    def is_owed(self, entry: StreamEntry) -> bool:
        """Whether this session gets ``entry``: not its client's own publish without echo."""
        return entry.echo or entry.sender not in (self.id, self.previous)


@dataclass(frozen=True, slots=True)
class Processing:
    """One message carried out by the server (never a deduplicated resend)."""

    session: str
    message_id: int
    kind: str
    payload: Any
    answer: str


class ModelServer:
    """What ``server_ref`` does for one client, without asyncio or sockets."""

    def __init__(self, *, history_limit: int | None, dedupe_size: int | None) -> None:
        self.history_limit = history_limit
        self.dedupe_size = dedupe_size
        self.streams: dict[str, ModelStream] = {}
        self.sessions: dict[str, ModelSession] = {}
        """Every session ever made, by id (forgotten ones included)."""
        self.live_sessions: dict[str, ModelSession] = {}
        """Sessions that can be resumed, by token."""
        self.attached: ModelSession | None = None
        self.log: list[Processing] = []
        self.problems: list[str] = []

    # The connection and the sessions -------------------------------------

    def connection_made(self) -> None:
        self.attached = None

    def connection_lost(self) -> None:
        self.attached = None

    def forget_session(self, token: str) -> None:
        """The session's TTL ran out while no connection held it."""
        session = self.live_sessions.pop(token)
        assert session is not self.attached
        session.heads_when_forgotten = {
            name: self.stream(name).head for name in session.followed_from()
        }

    def receive(self, text: str) -> list[str]:
        """Handle one client frame; returns the frames to write back, in order."""
        frame = p.decode_client_frame(text)
        if isinstance(frame, p.HelloFrame):
            return self._hello(frame)
        if isinstance(frame, p.PingFrame):
            return [p.encode(p.PongFrame(ts=frame.ts))]
        if isinstance(frame, p.PongFrame):
            return []
        session = self.attached
        assert session is not None, f"{frame.type} {frame.id} arrived before the welcome"
        return self._message(session, frame)

    # Streams ----------------------------------------------------------------

    def stream(self, name: str, room: str | None = None) -> ModelStream:
        if name not in self.streams:
            self.streams[name] = ModelStream(name, room)
        return self.streams[name]

    def append(
        self, stream: ModelStream, data: Any, *, sender: str | None, echo: bool
    ) -> list[str]:
        """Add an entry to ``stream``; returns its live delivery to the client, if owed."""
        offset = stream.head + 1
        text = p.encode(
            p.MessageFrame(
                stream=stream.name,
                epoch=EPOCH,
                offset=offset,
                ns=NS,
                room=stream.room,
                event="said",
                data=data,
                sender=sender,
            )
        )
        entry = StreamEntry(offset, sender, echo, text)
        stream.entries.append(entry)
        session = self.attached
        if (
            session is not None
            and stream.name in session.followed_from()
            and session.is_owed(entry)
        ):
            return [text]
        return []

    def owed_offsets(self, session: ModelSession) -> dict[str, set[int]]:
        """Per followed stream: every offset this session must deliver or report missing."""
        owed: dict[str, set[int]] = {}
        ended = session.heads_when_forgotten or {}
        for name, start in session.followed_from().items():
            stream = self.stream(name)
            end = ended.get(name, stream.head)
            owed[name] = {e.offset for e in stream.entries[start:end] if session.is_owed(e)}
        return owed

    def _replay(self, session: ModelSession, stream: ModelStream, after: int) -> list[str]:
        """What ``read_since`` gives: a trimmed gap if needed, then the held entries."""
        assert after <= stream.head, f"{stream.name}: client is at {after}, past the end"
        held = stream.head if self.history_limit is None else min(stream.head, self.history_limit)
        oldest = stream.head - held + 1
        frames: list[str] = []
        if after + 1 < oldest:
            after = oldest - 1
            gap = p.GapFrame(
                stream=stream.name,
                ns=NS,
                room=stream.room,
                epoch=EPOCH,
                offset=after,
                reason="trimmed",
            )
            frames.append(p.encode(gap))
        frames += [e.text for e in stream.entries[after:] if session.is_owed(e)]
        return frames

    # Frames -------------------------------------------------------------------

    def _welcome(self, session: ModelSession, *, resumed: bool) -> str:
        return p.encode(
            p.WelcomeFrame(
                protocol=p.PROTOCOL_VERSION,
                session=session.id,
                token=session.token,
                resumed=resumed,
                heartbeat=HEARTBEAT,
                limits=p.Limits(
                    max_frame_bytes=1 << 20,
                    max_in_flight=SERVER_MAX_IN_FLIGHT,
                    history_size=self.history_limit or 1000,
                    history_seconds=300.0,
                    session_ttl=300.0,
                ),
                inbox=p.StreamPosition(
                    stream=session.inbox, epoch=EPOCH, offset=self.stream(session.inbox).head
                ),
            )
        )

    def _hello(self, hello: p.HelloFrame) -> list[str]:
        assert self.attached is None, "a second hello on one connection"
        resume = hello.resume
        session = None if resume is None else self.live_sessions.get(resume.token)
        resumed = session is not None
        if session is None:
            n = len(self.sessions) + 1
            previous = None if resume is None else resume.session
            session = ModelSession(id=f"session-{n}", token=f"token-{n}", previous=previous)
            self.sessions[session.id] = session
            self.live_sessions[session.token] = session
            for named in resume.streams if resume is not None else []:
                if named.room is not None:  # a room the lost session was in: rejoin it
                    assert named.stream == p.room_stream(named.ns or NS, named.room)
                    session.joined_at[named.stream] = named.offset
        elif resume is not None:
            for message_id in [i for i in session.replies if i <= resume.last_reply]:
                del session.replies[message_id]
        self.attached = session
        frames = [self._welcome(session, resumed=resumed)]
        if resume is not None:
            presented = {s.stream: s for s in resume.streams}
            for name, start in session.followed_from().items():
                position = presented.get(name)
                if position is not None:
                    assert position.epoch == EPOCH, f"{name}: presented epoch {position.epoch}"
                    start = position.offset
                frames += self._replay(session, self.stream(name), start)
        return frames

    def _message(self, session: ModelSession, frame: MessageFrameFromClient) -> list[str]:
        if frame.id in session.replies:
            return [session.replies[frame.id]]  # a resend: same answer, not run again
        if frame.id in session.processed:
            self.problems.append(
                f"message {frame.id} resent after its reply was forgotten (last_reply or evicted)"
            )
            error = p.ErrorFrame(id=frame.id, code=p.ErrorCode.DUPLICATE_ID, message="forgotten")
            return [p.encode(error)]
        live, answer = self._process(session, frame)
        session.processed.add(frame.id)
        session.replies[frame.id] = answer
        if self.dedupe_size is not None and len(session.replies) > self.dedupe_size:
            del session.replies[min(session.replies)]
        payload = getattr(frame, "data", None)
        self.log.append(Processing(session.id, frame.id, frame.type, payload, answer))
        return [*live, answer]

    def _process(
        self, session: ModelSession, frame: MessageFrameFromClient
    ) -> tuple[list[str], str]:
        """Carry out one message: (live deliveries it causes, its encoded answer)."""
        if isinstance(frame, p.EmitFrame):
            return [], p.encode(p.ReplyFrame(id=frame.id))
        if isinstance(frame, p.RequestFrame):
            return [], p.encode(p.ReplyFrame(id=frame.id, data={"echo": frame.data}))
        stream = self.stream(p.room_stream(frame.ns, frame.room), frame.room)
        if isinstance(frame, p.JoinFrame):
            session.joined_at.setdefault(stream.name, stream.head)
            position = {"stream": stream.name, "epoch": EPOCH, "offset": stream.head}
            return [], p.encode(p.ReplyFrame(id=frame.id, data=position))
        if isinstance(frame, p.LeaveFrame):
            session.joined_at.pop(stream.name, None)
            return [], p.encode(p.ReplyFrame(id=frame.id))
        if stream.name not in session.joined_at:
            error = p.ErrorFrame(id=frame.id, code=p.ErrorCode.NOT_IN_ROOM, message="join first")
            return [], p.encode(error)
        live = self.append(stream, frame.data, sender=session.id, echo=frame.echo)
        position = {"stream": stream.name, "epoch": EPOCH, "offset": stream.head}
        return live, p.encode(p.ReplyFrame(id=frame.id, data=position))

    def answers_to(self, message_id: int) -> list[p.ServerFrame]:
        """The answers the server gave each time it processed ``message_id``."""
        return [p.decode_server_frame(x.answer) for x in self.log if x.message_id == message_id]


# --------------------------------------------------------------------------
# The client, the app and the link, as one state machine


@dataclass(frozen=True, slots=True)
class SentMessage:
    kind: str
    payload: Any


@dataclass(frozen=True, slots=True)
class FrameOnWire:
    text: str
    message_id: int | None
    seq: int
    """How many frames the client had written when it wrote this one (1-based)."""


def message_id_of(frame: p.ClientFrame) -> int | None:
    if isinstance(frame, MessageFrameFromClient):
        return frame.id
    return None


class ClientAndServerOverLossyLink(RuleBasedStateMachine):
    """The base variant: unbounded history, unbounded outbox, sessions never forgotten."""

    history_limit: ClassVar[int | None] = None
    outbox_limit: ClassVar[int | None] = None
    sessions_expire: ClassVar[bool] = False
    dedupe_size: ClassVar[int | None] = None
    """Replies the server keeps per session (None: all of them)."""
    window_holds_given_up: ClassVar[bool] = False
    """Count a written message in the window until the server answers it, even if the
    app was told it timed out or was dropped (False: until the app hears any outcome)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.server = ModelServer(history_limit=self.history_limit, dedupe_size=self.dedupe_size)
        outbox = (
            Outbox()
            if self.outbox_limit is None
            else Outbox(max_messages=self.outbox_limit, policy=OverflowPolicy.DROP_OLDEST)
        )
        self.client = ClientSession(
            outbox=outbox,
            max_in_flight=CLIENT_MAX_IN_FLIGHT,
            handshake_timeout=HANDSHAKE_TIMEOUT,
            client_name="property-test",
            ping_spread=0.0,
        )
        self.link_up = False
        self.to_server: deque[FrameOnWire] = deque()
        self.to_client: deque[str] = deque()
        self.frames_written = 0
        self.unanswered_on_link: set[int] = set()
        # What the app did and heard.
        self.payloads = 0
        self.sent: dict[int, SentMessage] = {}
        self.outcome: dict[int, Outcome] = {}
        self.settled_at: dict[int, int] = {}
        """Message id -> how many frames were written when the app heard its outcome."""
        self.deadline: dict[int, float] = {}
        """Message id -> when it times out or expires (if it was given one)."""
        self.sessions_welcomed: list[str] = []
        self.app_position: dict[str, int] = {}
        """Per stream: the last offset delivered to the app, or where a gap put it."""
        self.delivered: defaultdict[str, list[int]] = defaultdict(list)
        self.gap_covered: defaultdict[str, set[int]] = defaultdict(set)
        self.inbox_loss_reported: set[str] = set()

    @property
    def welcomed_into(self) -> str | None:
        return self.sessions_welcomed[-1] if self.sessions_welcomed else None

    # ------------------------------------------------------------------
    # The app

    @initialize()
    def app_joins_the_room_and_connects(self) -> None:
        self._app_sent("join", None, self.client.join(NS, ROOM, now=self.now))
        self._link_comes_up()

    @rule(
        kind=st.sampled_from(["emit", "request", "publish", "join"]),
        give_up_after=st.sampled_from([None, None, 1.0, 4.0, 12.0]),
        echo=st.booleans(),
    )
    def app_sends(self, kind: str, give_up_after: float | None, echo: bool) -> None:
        """An emit or publish (with an expiry), a request (with a timeout), or a join again."""
        c, now, data = self.client, self.now, self._new_payload()
        deadline = None if give_up_after is None else now + give_up_after
        if kind == "emit":
            sent = c.emit(NS, "note", data, now=now, expires_in=give_up_after)
        elif kind == "request":
            sent = c.request(NS, "echo", data, now=now, timeout=give_up_after)
        elif kind == "publish":
            sent = c.publish(NS, ROOM, "said", data, now=now, echo=echo, expires_in=give_up_after)
        else:
            self._app_sent("join", None, c.join(NS, ROOM, now=now))
            return
        self._app_sent(kind, data, sent, deadline)

    # ------------------------------------------------------------------
    # The link

    @precondition(lambda self: bool(self.to_server))
    @rule(frames=st.integers(min_value=1, max_value=3))
    def next_frames_reach_the_server(self, frames: int) -> None:
        """Up to ``frames`` frames, one at a time (1 keeps every interleaving reachable)."""
        for _ in range(frames):
            if self.to_server:
                self._deliver_to_server()

    @precondition(lambda self: bool(self.to_client))
    @rule(frames=st.integers(min_value=1, max_value=3))
    def next_frames_reach_the_client(self, frames: int) -> None:
        for _ in range(frames):
            if self.to_client:
                self._deliver_to_client()

    @precondition(lambda self: bool(self.to_server or self.to_client))
    @rule()
    def link_carries_everything_in_flight(self) -> None:
        """A good spell: frames flow both ways, in order, until nothing moves."""
        self._deliver_until_quiet()

    @precondition(lambda self: self.link_up)
    @rule()
    def link_drops_losing_frames_both_ways(self) -> None:
        self._link_drops()

    @precondition(lambda self: not self.link_up)
    @rule()
    def client_reconnects(self) -> None:
        self._link_comes_up()

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 12.0]))
    def time_passes(self, seconds: float) -> None:
        """Fire each of the client's timers at its deadline, as the driver's call_at does."""
        until = self.now + seconds
        while (deadline := self.client.get_timer()) is not None and deadline <= until:
            self.now = max(self.now, deadline)
            self.client.handle_timer(self.now)
            self._collect_from_client()
            later = self.client.get_timer()
            assert later is None or later > self.now, f"timer stuck at {self.now}"
        self.now = until

    # ------------------------------------------------------------------
    # The rest of the world

    @rule(stream=st.sampled_from(["room", "inbox"]))
    def the_world_writes(self, stream: str) -> None:
        """Someone else publishes to the room, or the server writes to the client's inbox."""
        data = {"world": self._new_payload()}
        if stream == "room":
            room = self.server.stream(ROOM_STREAM, ROOM)
            self._server_writes(self.server.append(room, data, sender=OTHER_PUBLISHER, echo=False))
            return
        session = self.server.sessions.get(self.welcomed_into or "")
        if session is not None and not session.forgotten:
            inbox = self.server.stream(session.inbox)
            self._server_writes(self.server.append(inbox, data, sender=None, echo=False))

    @precondition(lambda self: self.server.attached is not None)
    @rule(count=st.integers(min_value=1, max_value=3))
    def server_resends_recent_deliveries(self, count: int) -> None:
        """At-least-once fan-out: entries the client already has, sent again, late."""
        session = self.server.attached
        assert session is not None
        for name, start in session.followed_from().items():
            entries = self.server.stream(name).entries[start:]
            self._server_writes([e.text for e in entries[-count:] if session.is_owed(e)])

    # ------------------------------------------------------------------
    # Invariants

    @invariant()
    def server_ran_each_message_once_per_session_in_send_order(self) -> None:
        ran_in: defaultdict[int, list[str]] = defaultdict(list)
        last_in_session: dict[str, int] = {}
        for done in self.server.log:
            message_id, earlier = done.message_id, ran_in[done.message_id]
            assert not earlier or self.sessions_expire, f"message {message_id} processed twice"
            assert done.session not in earlier, f"message {message_id} processed twice"
            assert all(self.server.sessions[s].forgotten for s in earlier), (
                f"message {message_id} ran again while the session that ran it lives"
            )
            earlier.append(done.session)
            last = last_in_session.get(done.session, 0)
            assert message_id > last, f"message {message_id} processed after message {last}"
            last_in_session[done.session] = message_id
            sent = self.sent[message_id]
            assert (done.kind, done.payload) == (sent.kind, sent.payload)

    @invariant()
    def server_was_never_asked_for_a_forgotten_reply(self) -> None:
        assert not self.server.problems, self.server.problems

    @invariant()
    def outbox_holds_exactly_the_messages_without_an_outcome(self) -> None:
        waiting = {i for i in self.sent if i not in self.outcome}
        assert set(self.client.outbox.ids()) == waiting

    def teardown(self) -> None:
        if sys.exc_info()[1] is not None:
            return  # a step failed: let that failure be the one reported
        self._heal()
        self._check_everything_settled()
        self._note_what_was_exercised()

    # ------------------------------------------------------------------
    # Steps, shared by the rules and the healing

    def _new_payload(self) -> dict[str, int]:
        self.payloads += 1
        return {"n": self.payloads}

    def _app_sent(
        self,
        kind: str,
        payload: Any,
        sent: tuple[int, list[Dropped]],
        deadline: float | None = None,
    ) -> None:
        """Record what the app just gave the client, then collect the client's output."""
        message_id, dropped = sent
        assert message_id not in self.sent, f"id {message_id} given twice"
        self.sent[message_id] = SentMessage(kind, payload)
        if deadline is not None:
            self.deadline[message_id] = deadline
        for evicted in dropped:
            self._app_hears_outcome(evicted)
        self._collect_from_client()

    def _link_comes_up(self) -> None:
        assert not self.to_server, "frames survived the link"
        assert not self.to_client, "frames survived the link"
        self.link_up = True
        self.server.connection_made()
        self.client.connection_made(self.now)
        self._collect_from_client()

    def _link_drops(self) -> None:
        self.link_up = False
        self.to_server.clear()
        self.to_client.clear()
        self.unanswered_on_link.clear()
        self.server.connection_lost()
        self.client.connection_lost(self.now)
        self._collect_from_client()

    def _deliver_to_server(self) -> None:
        frame = self.to_server.popleft()
        if frame.message_id in self.settled_at:
            assert frame.seq <= self.settled_at[frame.message_id], (
                f"message {frame.message_id} was written after its outcome"
            )
        already = len(self.server.log)
        self._server_writes(self.server.receive(frame.text))
        for done in self.server.log[already:]:
            settled = self.outcome.get(done.message_id)
            assert not isinstance(settled, Replied | Failed), (
                f"message {done.message_id} ran again after the app heard {settled}"
            )

    def _deliver_to_client(self) -> None:
        text = self.to_client.popleft()
        frame = p.decode_server_frame(text)
        if isinstance(frame, p.ReplyFrame | p.ErrorFrame) and frame.id is not None:
            self.unanswered_on_link.discard(frame.id)
        self.client.receive_text(text, self.now)
        self._collect_from_client()

    def _server_writes(self, frames: list[str]) -> None:
        assert self.link_up or not frames, "the server wrote with no connection"
        self.to_client.extend(frames)

    def _collect_from_client(self) -> None:
        """Hand the client's events to the app, then put what it wrote on the wire.

        Within one call the core settles (reply, timeout) before it writes what
        that freed, so events are taken first.
        """
        link_dead = False
        for event_ in self.client.events_received():
            link_dead = self._app_hears(event_) or link_dead
        for text in self.client.data_to_send():
            assert self.link_up, f"written with no connection: {text}"
            self.frames_written += 1
            message_id = message_id_of(p.decode_client_frame(text))
            if message_id is not None:
                assert message_id in self.sent, f"message {message_id} the app never sent"
                assert message_id not in self.settled_at, (
                    f"message {message_id} written after {self.outcome[message_id]}"
                )
                deadline = self.deadline.get(message_id, self.now + 1)
                assert self.now < deadline, (
                    f"message {message_id} written at {self.now}, past its deadline {deadline}"
                )
                self.unanswered_on_link.add(message_id)
                assert len(self.unanswered_on_link) <= SERVER_MAX_IN_FLIGHT, (
                    f"in flight past the window: {sorted(self.unanswered_on_link)}"
                )
            self.to_server.append(FrameOnWire(text, message_id, self.frames_written))
        if link_dead:
            self._link_drops()

    def _app_hears(self, happened: SessionEvent) -> bool:
        """Check one event against the model; True when the link must be dropped."""
        match happened:
            case Replied() | Failed() | TimedOut() | Dropped():
                self._app_hears_outcome(happened)
            case Delivered(frame=frame):
                self._app_gets_delivery(frame)
            case GapReported():
                self._app_hears_of_gap(happened)
            case Welcomed():
                self._app_is_welcomed(happened)
            case LinkDead():
                return True
            case RoundTrip():
                pass
            case _:
                raise AssertionError(f"the model server never causes {happened!r}")
        return False

    def _app_hears_outcome(self, outcome: Outcome) -> None:
        message_id = outcome.id
        assert message_id in self.sent, f"{outcome} for a message the app never sent"
        assert message_id not in self.outcome, (
            f"second outcome for message {message_id}: {self.outcome[message_id]}, then {outcome}"
        )
        assert outcome.kind == self.sent[message_id].kind
        self.outcome[message_id] = outcome
        self.settled_at[message_id] = self.frames_written
        if not (self.window_holds_given_up and isinstance(outcome, TimedOut | Dropped)):
            self.unanswered_on_link.discard(message_id)
        answers = self.server.answers_to(message_id)
        if isinstance(outcome, Replied):
            assert any(isinstance(a, p.ReplyFrame) and a.data == outcome.data for a in answers), (
                f"{outcome}, but the server answered {answers}"
            )
        elif isinstance(outcome, Failed):
            assert any(isinstance(a, p.ErrorFrame) and a.code == outcome.code for a in answers), (
                f"{outcome}, but the server answered {answers}"
            )

    def _app_gets_delivery(self, frame: p.MessageFrame) -> None:
        position = self.app_position.get(frame.stream, 0)
        assert frame.offset > position, (
            f"{frame.stream}: offset {frame.offset} handed to the app after {position}"
        )
        entry = self.server.stream(frame.stream).entries[frame.offset - 1]
        assert frame == p.decode_server_frame(entry.text)
        self.app_position[frame.stream] = frame.offset
        self.delivered[frame.stream].append(frame.offset)

    def _app_hears_of_gap(self, gap: GapReported) -> None:
        position = self.app_position.get(gap.stream, 0)
        if gap.reason == "session_unknown":
            # The inbox of the session the server forgot: everything after our position.
            lost = self.server.sessions[self.welcomed_into or ""]
            assert gap.stream == lost.inbox, gap
            assert lost.forgotten, f"{gap}, but session {lost.id} lives"
            assert gap.offset == position, f"{gap}, but the app was at {position}"
            head = self.server.stream(gap.stream).head
            self.gap_covered[gap.stream].update(range(position + 1, head + 1))
            self.inbox_loss_reported.add(gap.stream)
            return
        assert gap.reason == "trimmed", gap
        assert gap.offset > position, f"a gap that moves the app back: {gap} after {position}"
        self.gap_covered[gap.stream].update(range(position + 1, gap.offset + 1))
        self.app_position[gap.stream] = gap.offset

    def _app_is_welcomed(self, welcome: Welcomed) -> None:
        previous = self.welcomed_into
        if previous is None:
            assert not welcome.resumed, welcome
        elif welcome.resumed:
            assert welcome.session == previous, f"{welcome} after {previous}"
        else:
            lost = self.server.sessions[previous]
            assert lost.forgotten, f"{welcome}, but session {previous} lives"
            assert lost.inbox in self.inbox_loss_reported, f"{lost.inbox} lost silently"
        self.sessions_welcomed.append(welcome.session)

    # ------------------------------------------------------------------
    # Healing and the final checks

    def _deliver_until_quiet(self) -> None:
        """Deliver every frame in flight, and what it causes, client to server first."""
        for _ in range(10_000):
            if self.to_server:
                self._deliver_to_server()
            elif self.to_client:
                self._deliver_to_client()
            else:
                return
        raise AssertionError("the link never went quiet")

    def _heal(self) -> None:
        """Reconnect if needed, then deliver everything until nothing moves."""
        if not self.link_up:
            self._link_comes_up()
        self._deliver_until_quiet()
        assert self.link_up, "the link died while healing, with the clock standing still"

    def _check_everything_settled(self) -> None:
        assert self.client.state is SessionState.OPEN
        assert len(self.client.outbox) == 0, f"still queued: {self.client.outbox.ids()}"
        runs: defaultdict[int, int] = defaultdict(int)
        for done in self.server.log:
            runs[done.message_id] += 1
        for message_id in self.sent:
            outcome = self.outcome.get(message_id)
            assert outcome is not None, f"message {message_id} never got an outcome"
            if not isinstance(outcome, TimedOut | Dropped):
                assert runs[message_id] == 1 or (self.sessions_expire and runs[message_id] > 1), (
                    f"{outcome}, but processed {runs[message_id]} times"
                )
        owed: defaultdict[str, set[int]] = defaultdict(set)
        for session_id in self.sessions_welcomed:
            for stream, offsets in self.server.owed_offsets(
                self.server.sessions[session_id]
            ).items():
                owed[stream] |= offsets
        for stream, offsets in owed.items():
            missing = offsets - set(self.delivered[stream]) - self.gap_covered[stream]
            assert not missing, f"{stream}: offsets {sorted(missing)} lost silently"

    def _note_what_was_exercised(self) -> None:
        """Statistics (``--hypothesis-show-statistics``): the hard paths are reached."""
        counters = self.client.counters
        for name in sorted({type(o).__name__ for o in self.outcome.values()}):
            event(f"outcome: {name}")
        runs = [done.message_id for done in self.server.log]
        if any(isinstance(self.outcome[i], TimedOut | Dropped) for i in runs):
            event("given up, yet processed once")
        if len(runs) > len(set(runs)):
            event("message run again by a new session")
        if counters.resent:
            event("messages resent after a reconnect")
        if counters.duplicates_dropped:
            event("duplicate deliveries dropped")
        if any(self.gap_covered.values()):
            event("gap reported")
        if len(set(self.sessions_welcomed)) > 1:
            event("session lost and replaced")
        elif counters.connections > 1:
            event("session resumed")


class BoundedHistoryAndOutbox(ClientAndServerOverLossyLink):
    """History keeps 3 entries per stream (trimmed gaps); the outbox drops the oldest of 5."""

    history_limit = 3
    outbox_limit = 5


class SessionsExpireWhileAway(ClientAndServerOverLossyLink):
    """The server forgets a detached session (its TTL ran out) at any time."""

    sessions_expire = True

    def _may_forget_the_session(self) -> bool:
        token = self.client.token
        session = None if token is None else self.server.live_sessions.get(token)
        # Once the app knows it is in the room: a join whose reply was lost with the
        # session is run again by the new one, from then on (documented).
        knows_room = ROOM_STREAM in self.app_position or any(
            isinstance(o, Replied) and o.kind == "join" for o in self.outcome.values()
        )
        return session is not None and session is not self.server.attached and knows_room

    @precondition(lambda self: self._may_forget_the_session())
    @rule()
    def server_forgets_the_session(self) -> None:
        assert self.client.token is not None
        self.server.forget_session(self.client.token)


class TimedOutMessagesStayInFlight(ClientAndServerOverLossyLink):
    """The window counts what the server has not answered; dedupe keeps ``max_in_flight``.

    ``max_in_flight`` bounds the messages "written but not yet answered", and the
    dedupe window is sized for it (``ServerConfig`` allows ``dedupe_size`` down to
    ``max_in_flight``). A request that timed out after it was written is still
    unanswered on the wire: the server will run it.

    It starts with the window full (join 1 and request 2, with a 1 s timeout,
    written; emit 3 waiting). Before cc076d7 it failed; the minimal example
    hypothesis found::

        state = TimedOutMessagesStayInFlight()
        state.app_joins_the_room_and_connects()
        state.time_passes(seconds=1.0)  # request 2 TimedOut, unanswered: emit 3 written
        # AssertionError: in flight past the window: [1, 2, 3]

    Carried on against server_ref (max_in_flight=2, dedupe_size=2): the server
    runs 1, 2 and 3 and keeps the replies to 2 and 3; the link drops before they
    arrive; join 1 is resent and answered ``duplicate_id``, so the app gets
    ``Failed`` for a join that ran (the server has it in the room).
    """

    dedupe_size = SERVER_MAX_IN_FLIGHT
    window_holds_given_up = True

    @initialize()
    def app_joins_the_room_and_connects(self) -> None:
        """Starts with a full window: join 1 and request 2 (1 s timeout) written, emit 3 waiting."""
        super().app_joins_the_room_and_connects()
        self.app_sends(kind="request", give_up_after=1.0, echo=False)
        self.app_sends(kind="emit", give_up_after=None, echo=False)
        self._deliver_to_server()  # hello
        self._deliver_to_client()  # welcome


class DriverTimerRunsLate(ClientAndServerOverLossyLink):
    """The driver's timer may fire late: frames and sends are handled past a deadline first.

    asyncio runs the I/O callbacks of a loop iteration before the timers that
    fell due in it, and a busy loop (slow handlers, a blocked thread) makes
    every due timer late; the core is given ``now`` with every input. This
    variant found the bug fixed in 9f609a2 (a message written past its
    deadline); its minimal example::

        state = DriverTimerRunsLate()
        state.app_joins_the_room_and_connects()    # join 1 queued, hello written
        state.app_sends(kind="emit", give_up_after=1.0, echo=False)  # emit 2, expires at 1.0
        state.time_passes_before_the_timer_fires(seconds=1.0)   # now 1.0, timer not run yet
        state.link_carries_everything_in_flight()  # welcome handled at 1.0: emit 2 written
        # AssertionError: message 2 written at 1.0, past its deadline 1.0
    """

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 12.0]))
    def time_passes_before_the_timer_fires(self, seconds: float) -> None:
        self.now += seconds


SETTINGS = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    report_multiple_bugs=False,  # shrink one failure well rather than several slowly
    suppress_health_check=[HealthCheck.too_slow],
)

TestClientAndServerOverLossyLink = ClientAndServerOverLossyLink.TestCase
TestClientAndServerOverLossyLink.settings = SETTINGS
TestBoundedHistoryAndOutbox = BoundedHistoryAndOutbox.TestCase
TestBoundedHistoryAndOutbox.settings = SETTINGS
TestSessionsExpireWhileAway = SessionsExpireWhileAway.TestCase
TestSessionsExpireWhileAway.settings = SETTINGS
TestDriverTimerRunsLate = DriverTimerRunsLate.TestCase
TestDriverTimerRunsLate.settings = SETTINGS

TestTimedOutMessagesStayInFlight = TimedOutMessagesStayInFlight.TestCase
TestTimedOutMessagesStayInFlight.settings = SETTINGS

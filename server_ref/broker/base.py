"""The Broker interface: where shared server state lives.

Three kinds of state, and the server knows each only through this interface,
so one node can keep them in memory and several nodes can share them through
Redis:

* streams: history and offsets. ``append`` is one atomic step that numbers
  the entry (epoch, offset), stores it and fans it out; given a key (the
  sender's session and message id) it is idempotent: appending the same key
  again returns the first append's entry and stores nothing. Nothing of the
  caller runs inside it: the entry comes as data (a ``Draft``), so a Lua
  script can do the same. Subscribers of a stream get every appended entry in
  offset order, on every node; ``subscribe`` returns once that holds. The
  publisher's reply and the subscribers' deliveries are not ordered against
  each other: callers must not rely on either coming first;
* resumable sessions: who a token belongs to, which rooms it is in, and which
  node holds its live connection (``owner``), kept for a TTL after its
  connection drops. ``replace`` tells the owning node, wherever it is, that
  another connection took the session over (close code 4006);
* dedupe records: per session, which message ids were processed and the
  replies they got, so a resent message is answered again, not run again;
* presence: per room stream, the sessions in it (``PresenceMember``), each
  entry expiring ``ttl`` seconds after it was last added or refreshed, so a
  node that dies leaves no member behind for longer than that;
* calls between nodes: ``serve_node`` answers the calls addressed to a node,
  ``call_node`` sends one and waits for its answer (a request for a polling
  connection another node holds). A call may be lost (``CallTimeout``): only
  what is safe to ask again goes this way. A node nobody serves is known at
  once (``NodeGone``). At most ``max_calls`` are in flight each way (those made
  and awaited, those being answered); past it a call fails with ``CallsBusy``.

A broker whose store cannot be reached raises ``BrokerUnavailable`` (from
``server_ref.errors``) from any method: the server then answers the message
``unavailable`` (the client resends it later) or, outside a message, closes
the connection with 1013 (the client reconnects and resumes).

Time is the server's: ``start(clock)`` hands the broker the clock the server
uses, so TTLs and history ages agree with the server's own deadlines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic_core import to_json

from rtchat_sdk import protocol as p
from rtchat_sdk.errors import RTChatError

from ..core.stats import Buckets
from ..errors import FrameTooLarge

__all__ = [
    "LATER",
    "MAX_CALLS",
    "Broker",
    "CallFailed",
    "CallHandler",
    "CallTimeout",
    "CallsBusy",
    "Clock",
    "Draft",
    "EntryListener",
    "NodeGone",
    "Page",
    "Replay",
    "RelayStats",
    "ReplacedListener",
    "SessionRecord",
    "StreamEntry",
]

Clock = Callable[[], float]


@dataclass(slots=True)  # not frozen: that triples its cost to build, once per message
class StreamEntry:
    """One appended message: its position, its encoded delivery frame, its origin."""

    stream: str
    epoch: str
    offset: int
    text: str
    sender: str | None
    echo: bool
    at: float


@dataclass(slots=True)  # not frozen: that triples its cost to build, once per message
class Draft:
    """An entry before it is numbered: its delivery frame around the epoch and offset.

    ``render(epoch, offset)`` is string concatenation, so a broker can number
    and store an entry atomically without running caller code (a Redis Lua
    script concatenates the same pieces).
    """

    head: str
    tail: str
    sender: str | None
    echo: bool
    max_bytes: int
    """The delivery frame's size limit: a larger one is refused (``FrameTooLarge``)."""

    @classmethod
    def message(
        cls,
        stream: str,
        *,
        ns: str,
        room: str | None,
        event: str,
        data: object,
        sender: str | None,
        echo: bool,
        max_bytes: int,
    ) -> Draft:
        """The draft of a delivery frame; raises ``ValidationFailed`` for NaN or infinity."""
        head, tail = p.delivery_parts(stream, ns, room, event, data, sender)
        return cls(head, tail, sender, echo, max_bytes)

    def render(self, epoch: str, offset: int) -> str:
        """The delivery frame at (epoch, offset); raises ``FrameTooLarge`` past the limit."""
        text = f'{self.head},"epoch":{to_json(epoch).decode()},"offset":{offset},{self.tail}'
        size = p.wire_size(text)
        if size > self.max_bytes:
            raise FrameTooLarge(
                f"the delivery would be {size} bytes; the limit is {self.max_bytes}"
            )
        return text


@dataclass(frozen=True, slots=True)
class Replay:
    """What ``read_since`` found: the entries after a position, or why not."""

    entries: list[StreamEntry]
    epoch: str
    offset: int
    gap: str | None = None
    """None, 'trimmed' (history no longer reaches back) or 'epoch_changed'."""
    gap_offset: int = 0
    """With a gap: the position the reader stands at after it; entries follow it."""


@dataclass(frozen=True, slots=True)
class Page:
    """What ``history`` found: a page of kept entries, in the order asked for."""

    entries: list[StreamEntry]
    epoch: str
    offset: int
    """The stream's newest offset (0: none)."""
    gap: str | None = None
    """None, 'trimmed' (the page starts later than asked: those entries are gone) or
    'epoch_changed' (``since`` was of another epoch)."""
    more: bool = False
    """Kept entries lie beyond the page in its direction."""


@dataclass(slots=True)
class SessionRecord:
    """The part of a session that outlives its connections."""

    id: str
    token: str
    user: str | None
    rooms: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    """(namespace, room) -> the room stream's (epoch, offset) when joined."""
    previous: list[str] = field(default_factory=list)
    """Ids of lost sessions this one replaced: their publishes are this client's own."""
    owner: str | None = None
    """The node holding the session's live connection, None while detached."""


EntryListener = Callable[[StreamEntry], None]
ReplacedListener = Callable[[str], None]
"""Called with a session id another connection took over."""


LATER: Any = object()
"""What ``Broker.answer_now`` returns for a call that must be awaited."""


class RelayStats(Protocol):
    """A networked broker's fan-out counters, for ``rtchat_pubsub_*`` (the Redis relay)."""

    gap_fills: int
    """Entries handed over from the log because pub/sub skipped or lost them."""
    lag: Buckets
    """Seconds from an entry's append to its hand-over to this node's listeners."""


CallHandler = Callable[[str], Awaitable[str]]
"""Answers one call addressed to a node: the call's payload in, its answer out."""

MAX_CALLS = 10_000
"""Calls in flight per broker, each way, by default (``max_calls``)."""


class CallFailed(RTChatError):
    """A call to another node got no answer; the subclasses say why."""


class NodeGone(CallFailed):
    """No node serves the address called: it is gone (or never was)."""


class CallTimeout(CallFailed, TimeoutError):
    """No answer in time: the call or its answer was lost, or the node is slow or stuck."""


class CallsBusy(CallFailed):
    """``max_calls`` calls are in flight already, on the calling node or on the called one."""


class Broker(ABC):
    """Stream storage and fan-out. Methods are async so a networked store fits."""

    keeps_append_keys: bool = False
    """``append``'s key records last as long as a session's dedupe records (the Redis
    broker: a TTL per key), so a resent publish is answered from them and the server
    need not also remember a publish's reply; a count-bounded store says False."""

    def answer_now(self, method: str, args: tuple[Any, ...]) -> Any:
        """``await self.<method>(*args)``'s result, if this broker has it at once; else ``LATER``.

        Only for what needs no I/O and calls no listener (an in-process store's
        dedupe records), so the hub can take it without a trip through its
        driver; it raises what the method would. The default: ``LATER``, always.
        """
        return LATER

    async def start(self, clock: Clock | None = None) -> None:
        """Connect to whatever backs the broker; ``clock`` is the server's."""

    def health(self) -> str | None:
        """Why the broker cannot be trusted to deliver right now, or None when it can.

        The server's ``/readyz`` answers 503 with this reason. An in-process
        broker always can; a networked one proves it end to end (the Redis
        broker: its pub/sub probes come back in time).
        """
        return None

    def relay_stats(self) -> RelayStats | None:
        """Its fan-out counters, read when metrics are scraped; None: an in-process broker,
        whose entries reach the listeners inside ``append``."""
        return None

    async def close(self) -> None:
        """Release connections; the broker is not used afterwards."""

    # ------------------------------------------------------------------
    # Streams

    @abstractmethod
    async def append(self, stream: str, draft: Draft, key: str | None = None) -> StreamEntry:
        """Number, store and fan out one entry, atomically; idempotent by ``key``.

        Raises ``FrameTooLarge`` (nothing numbered) when the rendered frame is
        over ``draft.max_bytes``.
        """

    @abstractmethod
    async def position(self, stream: str) -> tuple[str, int]:
        """The stream's epoch and the offset of its newest entry (0 if none)."""

    @abstractmethod
    async def read_since(self, stream: str, epoch: str, offset: int) -> Replay:
        """Entries after ``offset`` in ``epoch``; with a gap, what is left after it.

        A different epoch means the reader's position is meaningless here: it
        gets gap 'epoch_changed' at offset 0 and every entry still held.
        """

    @abstractmethod
    async def subscribe(self, stream: str, listener: EntryListener) -> None:
        """Call ``listener`` with every entry appended to ``stream`` once this returns."""

    @abstractmethod
    async def unsubscribe(self, stream: str, listener: EntryListener) -> None:
        """Stop calling ``listener`` for ``stream``."""

    @abstractmethod
    async def history(
        self, stream: str, since: tuple[str, int] | None, limit: int, reverse: bool
    ) -> Page:
        """At most ``limit`` kept entries of ``stream`` (within ``history_size`` and
        ``history_seconds``), for the ``history`` frame (PROTOCOL §7.6).

        Forward: those after ``since``'s offset, oldest first (None: from the
        oldest kept); reverse: those before it, newest first (None: from the
        newest). A ``since`` of another epoch (or past the newest offset) is
        'epoch_changed' and reads as None; one whose next entries are no longer
        kept is 'trimmed' and the page starts at the nearest kept one.
        """

    # ------------------------------------------------------------------
    # Presence

    @abstractmethod
    async def presence_add(
        self, stream: str, member: p.PresenceMember, ttl: float
    ) -> tuple[p.PresenceMember, bool]:
        """Put ``member`` in ``stream``'s presence for ``ttl`` seconds.

        A ``joined_at`` of 0 is stamped by the broker (wall time, which nodes
        share). A session already present keeps its entry's ``joined_at`` (its
        expiry is renewed). Returns the stored entry and whether it is new.
        """

    @abstractmethod
    async def presence_refresh(
        self, members: list[tuple[str, p.PresenceMember]], ttl: float
    ) -> None:
        """Renew each (stream, member) for ``ttl`` seconds, adding any that expired.

        The server calls it for its live sessions every third of ``ttl``.
        """

    @abstractmethod
    async def presence_remove(self, stream: str, session_id: str) -> bool:
        """Take the session out of ``stream``'s presence; whether it was there."""

    @abstractmethod
    async def presence(self, stream: str) -> list[p.PresenceMember]:
        """The unexpired members of ``stream``, oldest ``joined_at`` first."""

    @abstractmethod
    async def presence_stats(self, stream: str) -> tuple[int, int]:
        """(sessions, distinct users) among ``stream``'s unexpired members."""

    # ------------------------------------------------------------------
    # Resumable sessions

    @abstractmethod
    async def save_session(self, record: SessionRecord, ttl: float | None) -> None:
        """Store ``record``; it expires ``ttl`` seconds from now (None: never)."""

    @abstractmethod
    async def load_session(self, token: str) -> SessionRecord | None:
        """The live record for ``token``, or None if unknown or expired."""

    @abstractmethod
    async def delete_session(self, record: SessionRecord) -> None:
        """Forget the session and its dedupe records."""

    @abstractmethod
    async def watch_replaced(self, node: str, listener: ReplacedListener) -> None:
        """Call ``listener`` with each session of ``node`` that ``replace`` takes over."""

    @abstractmethod
    async def unwatch_replaced(self, node: str) -> None:
        """Stop the calls ``watch_replaced`` set up for ``node``."""

    @abstractmethod
    async def replace(self, owner: str, session_id: str) -> None:
        """Tell node ``owner`` that another connection took ``session_id`` over."""

    # ------------------------------------------------------------------
    # Dedupe records

    @abstractmethod
    async def recall_reply(self, session_id: str, message_id: int) -> tuple[bool, str | None]:
        """(was this id already processed?, the reply given, if still held).

        Processed: its reply is held, or it is at or below the highest id whose
        reply was evicted or forgotten (``forget_replies``). Another id was
        never processed, even below the highest processed one: the server
        answered it ``unavailable`` and the client will resend it.
        """

    @abstractmethod
    async def remember_reply(self, session_id: str, message_id: int, reply: str) -> None:
        """Mark ``message_id`` processed with ``reply``; older replies may be evicted."""

    @abstractmethod
    async def forget_replies(self, session_id: str, upto: int) -> None:
        """The client holds every reply up to ``upto``: they need not be kept."""

    # ------------------------------------------------------------------
    # Calls between nodes

    @abstractmethod
    async def serve_node(self, node: str, handler: CallHandler) -> None:
        """Answer the calls addressed to ``node`` with ``handler``, once this returns.

        One handler per node: serving it again replaces the handler. A handler
        that raises answers the call with ``CallFailed``.
        """

    @abstractmethod
    async def unserve_node(self, node: str) -> None:
        """Stop answering the calls addressed to ``node`` (they get ``NodeGone``)."""

    @abstractmethod
    async def call_node(self, node: str, payload: str, timeout: float) -> str:
        """Call ``node`` with ``payload``; its handler's answer.

        Raises ``NodeGone`` at once when no node serves ``node``, ``CallsBusy``
        at the ``max_calls`` limit, ``CallTimeout`` after ``timeout`` seconds
        without an answer (the handler may still run: only idempotent calls
        belong here), ``CallFailed`` when the handler raised, and
        ``BrokerUnavailable`` when the store cannot be reached.
        """

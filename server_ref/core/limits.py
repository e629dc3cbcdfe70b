"""The per-connection and per-address limits of issue 13, sans I/O.

The hub calls these in a few lines each, so the rules live here:

* ``admit``: each client message, on arrival, against the connection's
  token bucket (``rate_per_second``, ``rate_burst``) and its unanswered
  messages (``max_in_flight``). One over either is answered ``rate_limited``
  with ``retry_after`` and is **not processed**; the client resends it, as
  it does after ``unavailable``. Later messages are refused too until it is
  resent, so none overtakes it: the gate keeps the ids it refused (not the
  one ``Session.refusing`` of ``unavailable``, whose refusals all come back
  at once) because its waits are paced and the resends come back one by one.
  One not resent by its ``retry_after`` + ``GIVEN_UP_AFTER`` (5 s) holds the
  later ones back no more: the client gave it up (it expired there).
  ``rate_abuse_limit`` refusals in a row close
  the connection with 4009 RATE_LIMITED: a client that honours
  ``retry_after`` gets at most its window's worth in a row.
* ``bounded_join``: a client's join past ``max_rooms`` is refused with
  ``too_many_rooms``; ``cap_rooms`` applies the same bound to the rooms a
  lost session's hello asks to be put back in.
* ``Addresses`` and ``refusal``: connections per node (``max_connections``)
  and per client address (``max_connections_per_address``), refused with
  ``overloaded`` and 1013.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from rtchat_sdk import protocol as p

from ..errors import HandlerFailure
from .commands import Call, Close, Command, Send

if TYPE_CHECKING:
    from ..broker.base import SessionRecord
    from ..config import ServerConfig
    from .running import Conn
    from .sessions import Session

__all__ = [
    "Addresses",
    "ConnLimits",
    "TokenBucket",
    "admit",
    "bounded_join",
    "cap_rooms",
    "refusal",
]

Join = Callable[["Session", str, str, "p.Since | None"], Generator[Call, Any, tuple[str, int]]]


_EPSILON = 1e-9
"""Tokens lost to rounding (``0.05 * 20`` is not quite 1) that must not refuse a message."""
_ENOUGH = 1.0 - _EPSILON
"""The tokens that let a message through (``take``, every message: computed once)."""


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; a message takes one."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is one."""
        # min() and max() spelt as comparisons, same values (NaN too): this runs for each
        # message, and on CPython 3.11 each of those builtins costs more than the rest.
        elapsed = now - self.last
        if elapsed > 0.0:
            self.last = now
        else:
            elapsed = 0.0
        tokens = self.tokens + elapsed * self.rate
        if not tokens < self.burst:
            tokens = self.burst
        if tokens >= _ENOUGH:  # a resend at exactly ``retry_after`` is on time
            tokens -= 1.0
            self.tokens = tokens if tokens > 0.0 else 0.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate

    def wait(self, now: float, n: int = 1) -> float:
        """The seconds until there are ``n`` tokens, taking none."""
        tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        return max(0.0, n - tokens) / self.rate


class ConnLimits:
    """One connection's limit state: its client address, bucket and refusals in a row."""

    __slots__ = ("address", "bucket", "config", "due", "in_a_row", "owed")

    def __init__(self, config: ServerConfig, now: float, address: str | None = None) -> None:
        self.config = config
        self.address = address
        """The client's address (after trusted proxies), counted in ``Addresses``."""
        self.bucket = TokenBucket(config.rate_per_second, config.rate_burst, now)
        self.in_a_row = 0
        """Messages refused since the last one let through."""
        self.owed: list[int] = []
        """Ids this gate refused and that are not resent yet, in order: no later message
        goes before the first (a compliant client has at most its window here)."""
        self.due: dict[int, float] = {}
        """When each owed id is taken as given up by the client (``GIVEN_UP_AFTER``)."""


GIVEN_UP_AFTER = 5.0
"""Seconds past its ``retry_after`` after which a refused message that was not
resent no longer holds later ones back: the client gave it up (its expiry
passed), and would otherwise have every later message refused until 4009."""


def _answered(text: str) -> Generator[Call, Any, str]:
    """An operation that answers at once (queued, so answers keep their order)."""
    yield from ()
    return text


def admit(
    c: Conn, session: Session, message_id: int, now: float
) -> Generator[Call, Any, str] | None:
    """None to carry the message out; else the operation that answers its refusal.

    ``c.busy`` already counts this message. Order: a message after one this gate
    refused and that is not resent yet is refused too (``owed``), with a wait paced
    by its rank, so the resends come back in id order as the bucket refills.
    """
    limits = c.limits
    config = limits.config
    owed = limits.owed
    retry = 0.0  # below: the tokens for it and for each refused message before it
    if not owed and c.busy <= config.max_in_flight:  # the common case, in fewer steps
        if limits.bucket.take(now) == 0.0:
            limits.in_a_row = 0
            return None
        why = f"over rate_per_second={config.rate_per_second:g} (burst {config.rate_burst})"
    else:
        while owed and message_id > owed[0] and now >= limits.due.get(owed[0], now):
            limits.due.pop(owed.pop(0), None)  # not resent in time: given up by the client
        if owed and message_id > owed[0]:
            why = f"message {owed[0]} is to be resent first"
        elif c.busy > config.max_in_flight:
            why = f"more than max_in_flight={config.max_in_flight} messages unanswered"
            retry = config.unavailable_retry_after
        else:
            if limits.bucket.take(now) == 0.0:
                limits.in_a_row = 0
                if owed and owed[0] == message_id:
                    owed.pop(0)  # resent and let through
                    limits.due.pop(message_id, None)
                return None
            why = f"over rate_per_second={config.rate_per_second:g} (burst {config.rate_burst})"
    at = bisect.bisect_left(owed, message_id)
    if at == len(owed) or owed[at] != message_id:
        owed.insert(at, message_id)
    if not retry:
        retry = max(limits.bucket.wait(now, at + 1), 1.0 / config.rate_per_second)
    limits.due[message_id] = now + retry + GIVEN_UP_AFTER
    limits.in_a_row += 1
    if max(limits.in_a_row, len(owed)) >= config.rate_abuse_limit:
        c.core.close(
            p.CloseCode.RATE_LIMITED, f"{limits.in_a_row} messages in a row over the limits"
        )
    text = p.encode_error(
        p.ErrorCode.RATE_LIMITED, f"not processed: {why}; resend it", message_id, retry_after=retry
    )
    return _answered(text)


def bounded_join(max_rooms: int, join: Join) -> Join:
    """``join``, refusing a room past ``max_rooms`` with ``too_many_rooms`` (rejoining one is
    fine). It wraps only clients' joins: the app's own (``Context.join``) are its call."""

    def joining(
        session: Session, ns: str, room: str, since: p.Since | None = None
    ) -> Generator[Call, Any, tuple[str, int]]:
        rooms = session.record.rooms
        if (ns, room) not in rooms and len(rooms) >= max_rooms:
            raise HandlerFailure(
                p.ErrorCode.TOO_MANY_ROOMS,
                f"already in {len(rooms)} rooms, the limit (max_rooms); leave one first",
                {"max_rooms": max_rooms},
            )
        return (yield from join(session, ns, room, since))

    return joining


def cap_rooms(
    record: SessionRecord, resume: p.ResumeInfo, max_rooms: int
) -> list[p.StreamPosition]:
    """Keep the first ``max_rooms`` rooms restored into a new session; the positions of
    the rest, which the client is told were not rejoined."""
    extra = set(list(record.rooms)[max_rooms:])
    for key in extra:
        del record.rooms[key]
    return [s for s in resume.streams if (s.ns, s.room) in extra]


class Addresses:
    """Connections per client address, for ``max_connections_per_address`` (0: no limit)."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count: dict[str, int] = {}

    def full(self, address: str | None) -> bool:
        return bool(self.limit) and address is not None and self.count.get(address, 0) >= self.limit

    def add(self, address: str | None) -> None:
        if self.limit and address is not None:
            self.count[address] = self.count.get(address, 0) + 1

    def remove(self, address: str | None) -> None:
        if address is None or address not in self.count:
            return
        left = self.count[address] - 1
        if left:
            self.count[address] = left
        else:
            del self.count[address]


def refusal(
    config: ServerConfig, conns: int, addresses: Addresses, conn_id: int, address: str | None
) -> list[Command]:
    """The ``overloaded`` notice and 1013 close of a connection past a connection limit,
    or nothing when it is within them."""
    if conns >= config.max_connections:
        why = f"server is at its limit of {config.max_connections} connections"
    elif addresses.full(address):
        why = f"{addresses.limit} connections from this address, the limit"
    else:
        return []
    retry = config.overload_retry_after
    notice = p.encode_error(p.ErrorCode.OVERLOADED, why, retry_after=retry)
    reason = f"overloaded; retry after {retry}s"
    return [Send(conn_id, [notice]), Close(conn_id, p.CloseCode.TRY_AGAIN_LATER, reason)]

"""Heartbeat deadlines (PROTOCOL §9) for either side: when to ping, when the peer is dead.

A pure object: it is told when a connection came up, when its handshake
completed and when a frame arrived, each with ``now``, and answers what is
due. The rules, the same for client and server but for who pings:

1. Until the handshake completes, the peer is dead ``handshake_timeout``
   after the connection came up.
2. After it, every frame counts as life: the peer is dead after
   ``interval + timeout`` without one.
3. Pings come at most ``interval`` apart, at a random point of its last
   ``spread`` (``ping_delay``), timed from ``first_ping_from`` (the client's
   own hello, which is when the server's silence clock starts). With
   ``ping_always`` (the client) a ping goes out whatever else was sent; without
   it (the server) only after ``interval`` without a frame from the peer — a
   client that pings, as clients must, is not pinged back.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

from .frames import PING_SPREAD, ping_delay

__all__ = ["Heartbeat"]


class Heartbeat:
    """One connection's heartbeat deadlines, as plain numbers on the caller's clock."""

    __slots__ = (
        "_open",
        "_random",
        "dead_at",
        "interval",
        "last_heard",
        "next_ping",
        "ping_always",
        "spread",
        "timeout",
    )

    def __init__(
        self,
        *,
        ping_always: bool,
        spread: float = PING_SPREAD,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.ping_always = ping_always
        self.spread = spread
        self._random = random
        self.interval = 0.0
        self.timeout = 0.0
        self.last_heard = 0.0
        self.next_ping: float | None = None
        self.dead_at: float | None = None
        self._open = False

    def connected(self, now: float, handshake_timeout: float) -> None:
        """A transport is up and the handshake starts (rule 1)."""
        self._open = False
        self.last_heard = now
        self.next_ping = None
        self.dead_at = now + handshake_timeout

    def opened(
        self, interval: float, timeout: float, now: float, *, first_ping_from: float
    ) -> None:
        """The handshake completed with these timings (rules 2 and 3)."""
        self._open = True
        self.interval, self.timeout = interval, timeout
        self.next_ping = first_ping_from + self._delay()
        self.dead_at = now + interval + timeout

    def heard(self, now: float) -> None:
        """A frame arrived from the peer (or we know it is alive)."""
        self.last_heard = now
        if self._open:
            self.dead_at = now + self.interval + self.timeout

    def stopped(self) -> None:
        """No connection, or closing: nothing is due."""
        self._open = False
        self.next_ping = self.dead_at = None

    def deadline(self) -> float | None:
        """The next moment something may be due."""
        ping, dead = self.next_ping, self.dead_at
        if ping is None:
            return dead
        return ping if dead is None or ping < dead else dead

    def due(self, now: float) -> Literal["dead", "ping"] | None:
        """What is due at ``now``: the peer is dead, a ping must go out, or nothing.

        After "dead" nothing more is due until ``connected``; after "ping" the
        next one is scheduled.
        """
        if self.dead_at is not None and now >= self.dead_at:
            self.stopped()
            return "dead"
        if self.next_ping is None or now < self.next_ping:
            return None
        if not self.ping_always and now - self.last_heard < self.interval:
            # Heard from the peer within an interval: the link works both ways,
            # and a ping would only double the work.
            self.next_ping = self.last_heard + self.interval
            return None
        self.next_ping = now + self._delay()
        return "ping"

    def silent_for(self, now: float) -> float:
        return now - self.last_heard

    def _delay(self) -> float:
        return ping_delay(self.interval, self._random(), self.spread)

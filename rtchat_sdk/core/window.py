"""Which outbox entries may go on the wire now, and which expire first.

Two small pure helpers of ``ClientSession``, one job each, no I/O and no
clock (times are arguments). They live here so that the sliding-window rule
of PROTOCOL.md §10.2 is written once, apart from the session's frame
handling, and both work on the session's ``Outbox``: an id still in it is
unanswered, and that is all they ask of it.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque

from ..outbox import Outbox, OutboxEntry

__all__ = ["Deadlines", "Window"]


class Window:
    """The in-flight window (PROTOCOL.md §10.2): the ids, and which may be written next.

    Ids are consecutive and handed out here (``next_id``). A message is
    queued when it enters the outbox, taken when it is written, and counted
    in flight until it is answered or the connection drops. Two bounds, both
    ``limit`` (the lower of ours and the server's): at most ``limit`` in
    flight, and no message ``limit`` or more ids past the oldest one still
    unanswered — the window slides from the oldest, as TCP's does. The second
    keeps every id the client may resend within the newest ``limit`` the
    server has processed, so its dedupe (which keeps at least that many
    replies) still holds the answer, even after messages given up on while on
    the wire were run and their replies lost.
    """

    __slots__ = (
        "_in_flight",
        "_later",
        "_oldest",
        "_outbox",
        "_unsent",
        "limit",
        "max_in_flight",
        "next_id",
    )

    def __init__(self, outbox: Outbox, *, max_in_flight: int, first_id: int) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._outbox = outbox
        self.max_in_flight = max_in_flight
        """Our own bound; ``limit`` is the one in force."""
        self.limit = max_in_flight
        self.next_id = first_id
        """The id the next message gets."""
        self._unsent: deque[int] = deque()  # queued, in id order, not written on this connection
        self._in_flight: set[int] = set()  # written on this connection, not answered
        self._oldest = min(outbox.ids(), default=first_id)
        """No message below this id is still unanswered (see ``lowest_unanswered``)."""
        self._later: list[tuple[float, int]] = []
        """(when, id) of messages to write again later (``unavailable``, ``rate_limited``)."""

    def __len__(self) -> int:
        """How many messages are in flight."""
        return len(self._in_flight)

    def server_allows(self, max_in_flight: int) -> None:
        """The server's bound (from its welcome): the window is the lower of the two."""
        self.limit = min(self.max_in_flight, max_in_flight)

    def queue(self, message_id: int) -> None:
        """Message ``message_id`` (the ``next_id``) entered the outbox: it waits its turn."""
        self.next_id = message_id + 1
        self._unsent.append(message_id)

    def take(self) -> OutboxEntry | None:
        """The next queued entry the window lets out, in flight from now; None if none.

        Ids that left the outbox meanwhile are skipped. The caller that does
        not write the entry after all gives its place back with ``discard``.
        """
        unsent, in_flight, limit = self._unsent, self._in_flight, self.limit
        while unsent and len(in_flight) < limit:
            message_id = unsent[0]
            # _oldest can only lag the lowest unanswered id: below it + limit, no need to look.
            if message_id >= self._oldest + limit and (
                message_id >= self.lowest_unanswered() + limit
            ):
                return None  # waits for the oldest to be answered
            unsent.popleft()
            entry = self._outbox.get(message_id)
            if entry is not None:
                in_flight.add(message_id)
                return entry
        return None

    def discard(self, message_id: int) -> None:
        """``message_id`` is not on the wire any more: answered, or not written after all.

        A message given up on while on the wire is not discarded: the server
        will still run it, and the window must count it until it answers.
        """
        self._in_flight.discard(message_id)

    def later(self, message_id: int, at: float) -> None:
        """The server could not process ``message_id`` now: write it again from ``at`` on.

        It stays the oldest unanswered message, so the window does not slide past it.
        """
        self._in_flight.discard(message_id)
        heapq.heappush(self._later, (at, message_id))

    def next_retry(self) -> float | None:
        """When the first message waiting to be written again is due, or None."""
        return self._later[0][0] if self._later else None

    def retry_due(self, now: float) -> None:
        """Queue again, in id order among the others, each message whose wait is over."""
        later = self._later
        while later and later[0][0] <= now:
            message_id = heapq.heappop(later)[1]
            if message_id in self._outbox and message_id not in self._unsent:
                bisect.insort(self._unsent, message_id)

    def restart(self) -> None:
        """No connection: nothing in flight, and every entry is to be written again."""
        self._in_flight.clear()
        self._later.clear()  # a new connection takes them at once, with the rest
        self._unsent = deque(self._outbox.ids())

    def lowest_unanswered(self) -> int:
        """The lowest id still in the outbox (or ``next_id``): amortised O(1).

        Ids are consecutive and only ever leave the outbox, so a pointer that
        moves forward past the ones that left finds it.
        """
        oldest, outbox, end = self._oldest, self._outbox, self.next_id
        while oldest < end and oldest not in outbox:
            oldest += 1
        self._oldest = oldest
        return oldest


class Deadlines:
    """The outbox entries' deadlines, soonest first: a heap of ``(expires_at, id)``.

    An entry that leaves the outbox before its deadline stays in the heap
    (taking it out would cost O(n)) and is skipped when it reaches the top.
    Once such entries outnumber the live ones the heap is rebuilt without
    them, so they do not pile up behind one long deadline. The entries
    already in the outbox (restored from a file) bring theirs.
    """

    __slots__ = ("_heap", "_outbox")

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._heap = [(e.expires_at, e.id) for e in outbox if e.expires_at is not None]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        """How many deadlines the heap holds, settled ones included."""
        return len(self._heap)

    def add(self, expires_at: float, message_id: int) -> None:
        heap, outbox = self._heap, self._outbox
        if len(heap) > 2 * len(outbox) + 64:
            # Mostly answered messages: drop them now rather than when they reach the top.
            heap[:] = [d for d in heap if d[1] in outbox]
            heapq.heapify(heap)
        heapq.heappush(heap, (expires_at, message_id))

    def first(self) -> float | None:
        """The soonest deadline of an entry still in the outbox, or None."""
        heap, outbox = self._heap, self._outbox
        while heap and heap[0][1] not in outbox:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> OutboxEntry | None:
        """An entry still in the outbox whose deadline is ``now`` or before, or None.

        Its deadline leaves the heap: the caller expires the entry.
        """
        heap, outbox = self._heap, self._outbox
        while heap and heap[0][0] <= now:
            entry = outbox.get(heapq.heappop(heap)[1])
            if entry is not None:
                return entry
        return None

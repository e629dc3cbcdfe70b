"""The in-flight window and the deadline heap on their own (rtchat_sdk/core/window.py).

The session-level behaviour is in test_client_session.py; these pin the two
helpers' contracts with an outbox and nothing else.
"""

from __future__ import annotations

import pytest

from rtchat_sdk.core.window import Deadlines, Window
from rtchat_sdk.outbox import Outbox, OutboxEntry


def queue(outbox: Outbox, window: Window, count: int, expires_at: float | None = None) -> None:
    for _ in range(count):
        message_id = window.next_id
        outbox.add(OutboxEntry(message_id, "emit", f'{{"id":{message_id}}}', expires_at))
        window.queue(message_id)


def take_all(window: Window) -> list[int]:
    taken = []
    while (entry := window.take()) is not None:
        taken.append(entry.id)
    return taken


def test_at_most_limit_in_flight_and_ids_in_order() -> None:
    outbox = Outbox()
    window = Window(outbox, max_in_flight=3, first_id=1)
    queue(outbox, window, 5)
    assert take_all(window) == [1, 2, 3]
    assert len(window) == 3
    outbox.remove(1)
    window.discard(1)
    assert take_all(window) == [4]


def test_the_window_slides_from_the_oldest_unanswered_id() -> None:
    outbox = Outbox()
    window = Window(outbox, max_in_flight=2, first_id=1)
    queue(outbox, window, 4)
    assert take_all(window) == [1, 2]
    outbox.remove(2)
    window.discard(2)  # answered out of order: 3 would be 2 past 1, still unanswered
    assert take_all(window) == []
    assert window.lowest_unanswered() == 1
    outbox.remove(1)
    window.discard(1)
    assert window.lowest_unanswered() == 3
    assert take_all(window) == [3, 4]


def test_the_lower_of_the_two_limits_holds() -> None:
    outbox = Outbox()
    window = Window(outbox, max_in_flight=10, first_id=1)
    window.server_allows(2)
    queue(outbox, window, 3)
    assert take_all(window) == [1, 2]
    window.server_allows(100)
    assert window.limit == 10


def test_restart_writes_everything_unanswered_again_and_skips_what_left() -> None:
    outbox = Outbox()
    window = Window(outbox, max_in_flight=5, first_id=7)
    queue(outbox, window, 3)
    assert take_all(window) == [7, 8, 9]
    outbox.remove(8)  # given up on while on the wire: still counted in flight
    assert len(window) == 3
    window.restart()
    assert len(window) == 0
    assert take_all(window) == [7, 9]
    assert window.next_id == 10


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Window(Outbox(), max_in_flight=0, first_id=1)


def test_deadlines_come_soonest_first_and_skip_settled_entries() -> None:
    outbox = Outbox()
    window = Window(outbox, max_in_flight=5, first_id=1)
    deadlines = Deadlines(outbox)
    for expires_at in (3.0, 1.0, 2.0):
        message_id = window.next_id
        queue(outbox, window, 1, expires_at)
        deadlines.add(expires_at, message_id)
    assert deadlines.first() == 1.0
    outbox.remove(2)  # the one due at 1.0 was answered
    assert deadlines.first() == 2.0
    due = deadlines.pop_due(2.5)
    assert due is not None
    assert due.id == 3
    assert deadlines.pop_due(2.5) is None
    assert deadlines.first() == 3.0


def test_deadlines_of_restored_entries_are_known_from_the_start() -> None:
    outbox = Outbox()
    outbox.add(OutboxEntry(4, "request", '{"id":4}', 9.0))
    outbox.add(OutboxEntry(5, "emit", '{"id":5}', None))
    deadlines = Deadlines(outbox)
    assert deadlines.first() == 9.0
    assert len(deadlines) == 1

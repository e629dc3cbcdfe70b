"""The shared heartbeat deadlines of PROTOCOL §9, on a fake clock."""

from __future__ import annotations

from rtchat_sdk.protocol.heartbeat import Heartbeat


def _beat(*, ping_always: bool) -> Heartbeat:
    return Heartbeat(ping_always=ping_always, spread=0.0)


def test_before_the_handshake_only_the_handshake_timeout_counts() -> None:
    beat = _beat(ping_always=True)
    beat.connected(0.0, handshake_timeout=10.0)
    beat.heard(9.0)  # frames before the handshake completes do not extend it
    assert beat.deadline() == 10.0
    assert beat.due(9.99) is None
    assert beat.due(10.0) == "dead"
    assert beat.deadline() is None  # nothing more until the next connection


def test_the_client_pings_at_most_an_interval_apart_whatever_it_hears() -> None:
    beat = _beat(ping_always=True)
    beat.connected(0.0, handshake_timeout=10.0)
    beat.opened(5.0, 2.0, 1.5, first_ping_from=0.0)  # welcome at 1.5, hello at 0
    assert beat.next_ping == 5.0
    beat.heard(4.0)
    assert beat.due(5.0) == "ping"
    assert beat.next_ping == 10.0


def test_the_server_pings_only_after_an_interval_of_silence() -> None:
    beat = _beat(ping_always=False)
    beat.connected(0.0, handshake_timeout=10.0)
    beat.opened(5.0, 2.0, 0.0, first_ping_from=0.0)
    beat.heard(4.0)  # the client's own ping
    assert beat.due(5.0) is None
    assert beat.next_ping == 9.0  # an interval after the last frame heard
    assert beat.due(9.0) == "ping"


def test_silence_for_interval_plus_timeout_is_death() -> None:
    beat = _beat(ping_always=True)
    beat.connected(0.0, handshake_timeout=10.0)
    beat.opened(5.0, 2.0, 0.0, first_ping_from=0.0)
    beat.heard(3.0)
    assert beat.dead_at == 10.0
    assert beat.due(9.99) in (None, "ping")
    assert beat.due(10.0) == "dead"
    assert beat.silent_for(10.0) == 7.0


def test_stopped_has_nothing_due() -> None:
    beat = _beat(ping_always=True)
    beat.connected(0.0, handshake_timeout=1.0)
    beat.stopped()
    assert beat.deadline() is None
    assert beat.due(100.0) is None

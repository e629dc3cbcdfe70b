"""The server's per-connection sans-I/O core, with a fake clock."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rtchat_sdk import protocol as p
from server_ref.core.connection import ConnectionCore, ConnectionPhase

pytestmark = pytest.mark.timeout(10)

HEARTBEAT = p.HeartbeatInfo(interval=5, timeout=2)


def core(now: float = 0.0, **kw: Any) -> ConnectionCore:
    kw.setdefault("ping_spread", 0.0)  # pings exactly one interval apart, unless a test says
    return ConnectionCore(now, **kw)


def sent(c: ConnectionCore) -> list[dict[str, Any]]:
    return [json.loads(t) for t in c.data_to_send()]


def welcomed(now: float = 0.0, heartbeat: p.HeartbeatInfo = HEARTBEAT, **kw: Any) -> ConnectionCore:
    c = core(now, **kw)
    assert isinstance(c.receive_text('{"type":"hello","protocol":1}', now), p.HelloFrame)
    c.accept(
        p.WelcomeFrame(
            protocol=1,
            session="s",
            token="t",
            heartbeat=heartbeat,
            limits=p.Limits(
                max_frame_bytes=1,
                max_in_flight=1,
                history_size=1,
                history_seconds=1,
                session_ttl=1,
            ),
        ),
        now,
    )
    sent(c)
    return c


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", "bad_json"),
        ("[1, 2]", "bad_frame"),
        ('"a string"', "bad_frame"),
        ('{"no_type": 1}', "bad_frame"),
        ('{"type": "teleport"}', "unknown_type"),
        ('{"type": "request", "id": 3, "event": 5}', "invalid_frame"),
        ('{"type": "emit", "id": "x", "event": "e"}', "invalid_frame"),
        ('{"type": "join", "id": 4, "room": ""}', "invalid_frame"),
        ('{"type": "join", "id": 4, "room": "r", "ns": "no-slash"}', "invalid_frame"),
        ('{"type": "hello", "protocol": 1}', "already_handshaken"),
    ],
)
def test_bad_frames_get_a_named_error_and_the_connection_carries_on(text: str, code: str) -> None:
    c = welcomed()
    assert c.receive_text(text, 1) is None
    [error] = sent(c)
    assert error["type"] == "error"
    assert error["code"] == code
    assert error["message"]
    assert c.phase is ConnectionPhase.OPEN
    assert isinstance(c.receive_text('{"type":"emit","id":1,"event":"e"}', 1), p.EmitFrame)


def test_invalid_frame_error_carries_the_message_id_when_readable() -> None:
    c = welcomed()
    c.receive_text('{"type": "request", "id": 9, "event": 5}', 1)
    [error] = sent(c)
    assert error["id"] == 9
    assert "event" in error["message"]


def test_first_frame_must_be_hello() -> None:
    c = core()
    assert c.receive_text('{"type":"emit","id":1,"event":"e"}', 0) is None
    [error] = sent(c)
    assert error["code"] == "handshake_required"
    assert c.close_code == p.CloseCode.POLICY_VIOLATION


def test_unsupported_protocol_version_is_refused_with_its_close_code() -> None:
    c = core()
    assert c.receive_text('{"type":"hello","protocol":99}', 0) is None
    [error] = sent(c)
    assert error["code"] == "unsupported_protocol"
    assert error["details"] == {"supported": [1]}
    assert c.close_code == p.CloseCode.UNSUPPORTED_PROTOCOL


def test_ping_is_answered_with_pong() -> None:
    c = welcomed()
    assert c.receive_text('{"type":"ping","ts":1.5}', 1) is None
    assert sent(c) == [{"type": "pong", "ts": 1.5}]


def test_heartbeat_pings_and_closes_a_silent_peer() -> None:
    c = welcomed(0)
    assert c.get_timer() == 5
    c.handle_timer(5)
    assert sent(c) == [{"type": "ping", "ts": 5}]
    c.handle_timer(6.9)
    assert c.close_code is None
    c.handle_timer(7)
    assert c.close_code == p.CloseCode.HEARTBEAT_TIMEOUT


def test_pings_are_spread_over_the_last_tenth_of_the_interval() -> None:
    draws = iter([0.0, 0.5, 0.999])
    patient = p.HeartbeatInfo(interval=5, timeout=100)  # a silent peer, not yet dead
    c = welcomed(0, heartbeat=patient, ping_spread=p.PING_SPREAD, random=lambda: next(draws))
    assert c.get_timer() == 5  # draw 0.0: a full interval
    c.handle_timer(5)
    assert [f["type"] for f in sent(c)] == ["ping"]
    assert c.get_timer() == pytest.approx(5 + 5 * 0.95)
    c.handle_timer(9.75)
    assert [f["type"] for f in sent(c)] == ["ping"]
    assert c.get_timer() == pytest.approx(9.75 + 5 * (1 - 0.0999))


def test_a_peer_that_pings_is_not_pinged() -> None:
    c = welcomed(0)
    assert c.receive_text('{"type":"ping","ts":4.8}', 4.8) is None
    assert [f["type"] for f in sent(c)] == ["pong"]
    c.handle_timer(5)
    assert sent(c) == []  # heard from it 0.2 s ago
    assert c.get_timer() == pytest.approx(9.8)  # an interval after its ping
    c.receive_text('{"type":"ping","ts":9.7}', 9.7)
    sent(c)
    c.handle_timer(9.8)
    assert sent(c) == []
    c.handle_timer(14.7)  # silent for a whole interval: now it is pinged
    assert [f["type"] for f in sent(c)] == ["ping"]
    assert c.close_code is None


def test_pings_of_connections_opened_together_fall_apart() -> None:
    cores = [welcomed(0, ping_spread=p.PING_SPREAD) for _ in range(200)]
    firsts = [c.get_timer() for c in cores]
    assert all(t is not None and 4.5 < t <= 5 for t in firsts)
    assert len(set(firsts)) == 200
    assert max(t for t in firsts if t) - min(t for t in firsts if t) > 0.25


def test_any_frame_counts_as_life() -> None:
    c = welcomed(0)
    c.receive_text('{"type":"pong","ts":0}', 6)
    c.handle_timer(7)
    assert c.close_code is None
    assert sent(c) == []  # heard from it at 6: no ping needed
    assert c.get_timer() == 11  # a ping if it stays silent for an interval


def test_keepalive_while_busy() -> None:
    c = welcomed(0)
    c.keepalive(6.5)
    c.handle_timer(7)
    assert c.close_code is None


def test_handshake_timeout() -> None:
    c = core(0, handshake_timeout=3)
    c.handle_timer(3)
    assert c.close_code == p.CloseCode.HANDSHAKE_TIMEOUT


def test_too_many_bad_frames_closes() -> None:
    c = welcomed(max_bad_frames=3)
    for _ in range(2):
        c.receive_text("nope", 1)
    assert c.close_code is None
    c.receive_text("nope", 1)
    assert c.close_code == p.CloseCode.TOO_MANY_BAD_FRAMES
    assert c.receive_text('{"type":"emit","id":1,"event":"e"}', 1) is None

"""``ClientSession.get_timer`` is worked out again only when needed, and is always right.

The session keeps its next deadline between calls and recomputes it only
after something moved one. Here random interleavings of everything that can
move a deadline check it, after every step, against the definition: the
earliest of the next ping, the dead-link deadline and the expiry of every
message still in the outbox.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from rtchat_sdk import protocol as p
from rtchat_sdk.core import ClientSession
from rtchat_sdk.outbox import Outbox

from .helpers import message, reply, welcome


def expected_timer(s: ClientSession) -> float | None:
    beat = s.heartbeat
    candidates = [t for t in (beat.next_ping, beat.dead_at) if t is not None]
    candidates += [e.expires_at for e in s.outbox if e.expires_at is not None]
    return min(candidates) if candidates else None


timeouts = st.sampled_from([None, 0.5, 1.0, 5.0, 30.0, 100.0])
steps = st.one_of(
    st.tuples(st.just("request"), timeouts),
    st.tuples(st.just("emit"), timeouts),
    st.tuples(st.just("reply"), st.integers(0, 20)),
    st.tuples(st.just("error"), st.integers(0, 20)),
    st.tuples(st.just("message"), st.integers(1, 3)),
    st.tuples(st.just("server_ping"), st.none()),
    st.tuples(st.just("ping_pong"), st.none()),
    st.tuples(st.just("wait"), st.sampled_from([0.1, 0.5, 1.0, 3.0, 12.0, 40.0])),
    st.tuples(st.just("timer_early"), st.none()),
    st.tuples(st.just("next_timer_fires"), st.none()),
    st.tuples(st.just("keepalive"), st.none()),
    st.tuples(st.just("reconnect"), st.none()),
)


@settings(max_examples=500, deadline=None)
@given(
    policy=st.sampled_from(["raise", "drop_oldest"]),
    interval=st.sampled_from([2.0, 20.0]),
    script=st.lists(steps, max_size=60),
)
def test_the_kept_timer_is_always_the_earliest_deadline(
    policy: str, interval: float, script: list[tuple[str, Any]]
) -> None:
    s = ClientSession(outbox=Outbox(max_messages=6, policy=policy))
    now = 0.0
    offset = 0

    def connect() -> None:
        s.connection_made(now)
        assert s.get_timer() == expected_timer(s)
        s.receive_text(welcome(interval=interval, timeout=1.0), now)

    connect()
    for step, arg in script:
        if step in ("request", "emit"):
            if s.outbox.fits(1) or policy == "drop_oldest":
                if step == "request":
                    s.request("/", "ev", now, now=now, timeout=arg)
                else:
                    s.emit("/", "ev", now, now=now, expires_in=arg)
        elif step in ("reply", "error"):
            ids = s.outbox.ids()
            if ids:
                target = ids[arg % len(ids)]
                if step == "reply":
                    s.receive_text(reply(target), now)
                else:
                    s.receive_text(p.encode(p.ErrorFrame(id=target, code="x", message="m")), now)
        elif step == "message":
            offset += arg  # sometimes a duplicate is skipped over, never mind
            s.receive_text(message("room:/:r", offset), now)
        elif step == "server_ping":
            s.receive_text(p.encode(p.PingFrame(ts=now)), now)
        elif step == "ping_pong":
            s.ping(now)
            s.receive_text(p.encode(p.PongFrame(ts=now)), now)
        elif step == "wait":
            until = now + arg
            while (deadline := s.get_timer()) is not None and deadline <= until:
                now = max(now, deadline)
                s.handle_timer(now)
                assert s.get_timer() == expected_timer(s)
            now = until
        elif step == "next_timer_fires":
            deadline = s.get_timer()
            if deadline is not None:
                now = max(now, deadline)
                s.handle_timer(now)
        elif step == "timer_early":
            s.handle_timer(now)
        elif step == "keepalive":
            s.keepalive(now)
        elif step == "reconnect":
            s.connection_lost(now)
            assert s.get_timer() == expected_timer(s)
            connect()
        if any(type(e).__name__ == "LinkDead" for e in s.events_received()):
            s.connection_lost(now)
            assert s.get_timer() == expected_timer(s)
            connect()
        s.data_to_send()
        assert s.get_timer() == expected_timer(s)
        assert len(s._deadlines) <= 2 * len(s.outbox) + 65  # answered ones do not pile up


def test_answered_deadlines_do_not_pile_up_behind_a_long_one() -> None:
    s = ClientSession(ping_spread=0.0)
    s.connection_made(0)
    s.receive_text(welcome(), 0)
    s.request("/", "slow", None, now=0, timeout=3600)  # stays unanswered
    for i in range(2, 10_002):
        s.request("/", "fast", None, now=0, timeout=30)
        s.receive_text(reply(i), 0)
    assert len(s._deadlines) <= 2 * len(s.outbox) + 65
    assert s.get_timer() == 20.0  # the next ping

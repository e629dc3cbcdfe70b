"""The limits of issue 13 at their edges, on the real hub with a fake clock (HubNet).

Each limit: exactly at it, allowed; one past it, refused as documented
(PROTOCOL §11). The web transports' part (client addresses, polling) is in
``test_limits_web.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from rtchat_sdk import protocol as p
from rtchat_sdk.backoff import close_error, reconnect_at_once
from rtchat_sdk.core import ClientSession, Replied
from server_ref.config import ServerConfig
from server_ref.core.limits import GIVEN_UP_AFTER, TokenBucket
from tests.helpers import events, frames, open_session, reply
from tests.hubnet import HubNet
from tests.test_hub import request, with_echo

pytestmark = pytest.mark.timeout(10)


def join(i: int, room: str) -> dict[str, Any]:
    return {"type": "join", "id": i, "ns": "/", "room": room}


def answers(net: HubNet, conn: int) -> list[tuple[int, str]]:
    """(id, "reply" or the error code) of each answer written to ``conn`` since the last look."""
    return [(f["id"], f.get("code", f["type"])) for f in net.frames(conn)]


# ----------------------------------------------------------------------
# The token bucket


def test_a_bucket_gives_its_burst_at_once_then_one_token_per_interval() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst: allowed
    assert bucket.take(0.0) == pytest.approx(0.1)  # one past it: wait a tenth of a second
    assert bucket.wait(0.05) == pytest.approx(0.05)
    assert bucket.take(0.1) == 0.0  # the token came
    assert bucket.take(100.0) == 0.0  # a long pause saves up the burst, no more
    assert [bucket.take(100.0) for _ in range(3)][-1] == pytest.approx(0.1)


# ----------------------------------------------------------------------
# Message rate


def rate_net(**limits: Any) -> tuple[HubNet, int, list[Any]]:
    net = HubNet(ServerConfig(**{"rate_per_second": 10.0, "rate_burst": 3, **limits}))
    seen = with_echo(net)
    conn, _ = net.hello()
    return net, conn, seen


def test_a_message_over_the_rate_is_refused_with_retry_after_and_not_processed() -> None:
    net, conn, seen = rate_net()
    for i in (1, 2, 3):
        net.send(conn, request(i, i))  # exactly the burst: processed
    net.send(conn, request(4, 4))  # one past it
    frames = net.frames(conn)
    assert [f["type"] for f in frames[:3]] == ["reply"] * 3
    refused = frames[3]
    assert (refused["id"], refused["code"]) == (4, "rate_limited")
    assert refused["retry_after"] == pytest.approx(0.1)
    assert seen == [1, 2, 3]
    assert conn not in net.closed
    net.send(conn, request(5, 5))  # behind 4: told to wait for two tokens, paced
    (paced,) = net.frames(conn)
    assert (paced["code"], paced["retry_after"]) == ("rate_limited", pytest.approx(0.2))


def test_messages_after_a_refused_one_wait_for_its_resend_so_none_overtakes_it() -> None:
    net, conn, seen = rate_net()
    for i in (1, 2, 3, 4):
        net.send(conn, request(i, i))
    net.frames(conn)
    net.advance(1.0)  # tokens again, but 5 must not go before 4
    net.send(conn, request(5, 5))
    (held,) = net.frames(conn)
    assert (held["id"], held["code"]) == (5, "rate_limited")
    assert "message 4" in held["message"]
    net.send(conn, request(4, 4))  # the resend of the refused one
    net.send(conn, request(5, 5))
    assert answers(net, conn) == [(4, "reply"), (5, "reply")]
    assert seen == [1, 2, 3, 4, 5]


def test_a_refused_message_never_resent_stops_holding_the_later_ones_back() -> None:
    """The client gave it up (its expiry passed while it waited): later messages are
    taken once its retry_after + GIVEN_UP_AFTER has passed, not refused until 4009."""
    net, conn, seen = rate_net()
    for i in (1, 2, 3, 4):
        net.send(conn, request(i, i))
    (*_, refused) = net.frames(conn)
    assert (refused["id"], refused["code"]) == (4, "rate_limited")
    net.advance(refused["retry_after"] + GIVEN_UP_AFTER - 0.01)
    net.send(conn, request(5, 5))
    (held,) = net.frames(conn)
    assert (held["id"], held["code"]) == (5, "rate_limited")  # 4 may still come
    net.advance(0.02)  # past it: 4 is taken as given up
    net.send(conn, request(5, 5))
    assert answers(net, conn) == [(5, "reply")]
    assert seen == [1, 2, 3, 5]
    assert conn not in net.closed


def test_refusals_in_a_row_up_to_the_abuse_limit_then_close_4009() -> None:
    net, conn, _ = rate_net(rate_burst=1, rate_abuse_limit=3, max_in_flight=2, dedupe_size=2)
    net.send(conn, request(1))
    net.send(conn, request(2))  # refused 1 in a row
    net.send(conn, request(3))  # refused 2 in a row: still open
    assert [code for _, code in answers(net, conn)] == ["reply", "rate_limited", "rate_limited"]
    assert conn not in net.closed
    net.send(conn, request(4))  # the limit-th in a row
    assert net.closed[conn] == p.CloseCode.RATE_LIMITED


def test_a_message_let_through_resets_the_refusals_in_a_row() -> None:
    net, conn, _ = rate_net(rate_burst=1, rate_abuse_limit=3, max_in_flight=2, dedupe_size=2)
    net.send(conn, request(1))
    net.send(conn, request(2))
    net.send(conn, request(3))  # two in a row
    net.advance(0.1)
    net.send(conn, request(2))  # the resend, with a token: through
    net.send(conn, request(3))  # no token: one in a row again
    net.send(conn, request(4))  # two
    assert conn not in net.closed


def test_a_message_held_back_by_unavailable_is_not_counted_as_over_the_rate() -> None:
    """Ordering behind ``unavailable`` (the broker) stays ``unavailable``, not ours."""
    net, conn, _ = rate_net()
    session = next(iter(net.hub.sessions.by_id.values()))
    session.refusing = 1  # as ``steps.unavailable_answer`` leaves it
    net.send(conn, request(2))
    assert answers(net, conn) == [(2, "unavailable")]


def test_the_client_keeps_a_rate_limited_message_and_resends_it_after_retry_after() -> None:
    """The same path as ``unavailable`` (PROTOCOL §10.2): not settled, written again."""
    s = ClientSession()
    open_session(s)
    first, _ = s.request("/", "echo", 1, now=0, timeout=30)
    second, _ = s.request("/", "echo", 2, now=0, timeout=30)
    frames(s)
    for message_id in (first, second):
        refusal = p.encode_error(p.ErrorCode.RATE_LIMITED, "slow down", message_id, retry_after=0.5)
        s.receive_text(refusal, 0.1)
    assert events(s) == []
    assert s.counters.retried == 2
    s.handle_timer(0.6)
    assert [f["id"] for f in frames(s)] == [first, second]  # in id order
    s.receive_text(reply(first, 1), 0.7)
    s.receive_text(reply(second, 2), 0.7)
    assert events(s) == [Replied(first, "request", 1), Replied(second, "request", 2)]


def test_a_client_that_waits_retry_after_is_never_closed_and_loses_nothing() -> None:
    """The real client core against the real hub: 300 requests at once, 20 a second
    allowed. Every one is processed once, in id order, and the refusals in a row stay
    under the abuse limit (just over the window), so the connection stays up."""
    config = ServerConfig(
        rate_per_second=20.0, rate_burst=5, max_in_flight=10, dedupe_size=10, rate_abuse_limit=11
    )
    net = HubNet(config)
    seen = with_echo(net)
    client = ClientSession(max_in_flight=10)
    conn = net.open()
    client.connection_made(net.now)
    ids = [client.request("/", "echo", i, now=net.now, timeout=1e6)[0] for i in range(300)]

    def exchange() -> None:
        while True:
            for text in client.data_to_send():
                net.send(conn, text)
            arrived = net.sent[conn]
            if not arrived:
                return
            net.sent[conn] = []
            for text in arrived:
                client.receive_text(text, net.now)

    exchange()
    while len(client.outbox) and net.now < 1_100:
        when = client.get_timer()
        assert when is not None
        net.advance(max(0.0, when - net.now))
        client.handle_timer(net.now)
        exchange()
    assert conn not in net.closed
    assert seen == list(range(300))
    replied = [e.id for e in client.events_received() if isinstance(e, Replied)]
    assert sorted(replied) == ids
    assert client.counters.retried > 0
    assert net.now - 1000.0 == pytest.approx(300 / 20.0, abs=2.0)  # at the rate, not slower


def test_the_client_treats_4009_as_retryable_with_backoff() -> None:
    assert close_error(p.CloseCode.RATE_LIMITED, "", sent=None, max_frame_bytes=1 << 20) is None
    assert not reconnect_at_once(p.CloseCode.RATE_LIMITED)


# ----------------------------------------------------------------------
# Messages in flight


def test_max_in_flight_unanswered_messages_are_taken_and_one_more_is_refused() -> None:
    net = HubNet(ServerConfig(max_in_flight=2))
    with_echo(net)
    conn, _ = net.hello()
    net.auto = False  # the handlers' calls wait: the messages stay unanswered
    net.send(conn, request(1, 1))
    net.send(conn, request(2, 2))  # exactly max_in_flight unanswered: taken
    net.send(conn, request(3, 3))  # one past it
    net.answer_all()
    frames = net.frames(conn)
    assert [(f["id"], f.get("code", f["type"])) for f in frames] == [
        (1, "reply"),
        (2, "reply"),
        (3, "rate_limited"),
    ]
    assert "max_in_flight=2" in frames[2]["message"]
    assert frames[2]["retry_after"] == net.config.unavailable_retry_after
    net.auto = True
    net.send(conn, request(3, 3))  # resent once the others are answered: taken
    assert answers(net, conn) == [(3, "reply")]


# ----------------------------------------------------------------------
# Rooms per session


def test_max_rooms_joins_are_taken_and_one_more_is_refused_too_many_rooms() -> None:
    net = HubNet(ServerConfig(max_rooms=2))
    conn, _ = net.hello()
    net.send(conn, join(1, "a"))
    net.send(conn, join(2, "b"))  # exactly max_rooms
    net.send(conn, join(3, "c"))  # one past it
    net.send(conn, join(4, "a"))  # joining one it is in is fine
    frames = net.frames(conn)
    assert [f.get("code", f["type"]) for f in frames] == [
        "reply",
        "reply",
        "too_many_rooms",
        "reply",
    ]
    assert frames[2]["details"] == {"max_rooms": 2}
    assert conn not in net.closed
    net.send(conn, {"type": "leave", "id": 5, "ns": "/", "room": "b"})
    net.send(conn, join(6, "c"))  # room again after a leave
    assert answers(net, conn) == [(5, "reply"), (6, "reply")]


def test_rooms_restored_into_a_new_session_are_bounded_by_max_rooms_too() -> None:
    net = HubNet(ServerConfig(max_rooms=2))
    streams = [
        {"stream": p.room_stream("/", r), "epoch": "gone", "offset": 0, "ns": "/", "room": r}
        for r in ("a", "b", "c")
    ]
    resume = {"token": "lost", "session": "old", "streams": streams, "last_reply": 0}
    conn = net.open()
    net.send(conn, {"type": "hello", "protocol": p.PROTOCOL_VERSION, "resume": resume})
    frames = net.frames(conn)
    assert frames[0]["resumed"] is False
    gaps = [f for f in frames if f["type"] == "gap"]
    assert [(g["room"], g["reason"]) for g in gaps if g["reason"] == "not_rejoined"] == [
        ("c", "not_rejoined")
    ]
    (session,) = net.hub.sessions.by_id.values()
    assert list(session.record.rooms) == [("/", "a"), ("/", "b")]
    net.send(conn, join(1, "c"))
    assert answers(net, conn) == [(1, "too_many_rooms")]


# ----------------------------------------------------------------------
# Connections per client address


def open_from(net: HubNet, address: str | None) -> int:
    conn = net.hub.connection_opened(net.now, None, address)
    net.run()
    return conn


def test_max_connections_per_address_are_taken_and_one_more_is_told_to_come_back() -> None:
    net = HubNet(ServerConfig(max_connections_per_address=2, overload_retry_after=3.0))
    first = open_from(net, "203.0.113.1")
    open_from(net, "203.0.113.1")  # exactly the limit
    refused = open_from(net, "203.0.113.1")  # one past it
    (notice,) = net.frames(refused)
    assert (notice["code"], notice["retry_after"]) == ("overloaded", 3.0)
    assert net.closed[refused] == p.CloseCode.TRY_AGAIN_LATER
    other = open_from(net, "198.51.100.9")  # another address is not affected
    assert other not in net.closed
    net.close(first)
    again = open_from(net, "203.0.113.1")  # a place freed: taken
    assert again not in net.closed
    assert net.hub.addresses.count == {"203.0.113.1": 2, "198.51.100.9": 1}


def test_connections_the_hub_closes_free_their_address() -> None:
    net = HubNet(ServerConfig(max_connections_per_address=1, handshake_timeout=1.0))
    open_from(net, "203.0.113.1")
    net.advance(1.0)  # no hello: closed by the hub (4003)
    assert net.hub.addresses.count == {}
    assert open_from(net, "203.0.113.1") not in net.closed


def test_by_default_connections_per_address_are_not_limited() -> None:
    net = HubNet()
    conns = [open_from(net, "203.0.113.1") for _ in range(50)]
    assert not any(conn in net.closed for conn in conns)
    assert net.hub.addresses.count == {}  # nothing counted when off


# ----------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rate_abuse_limit": 1_000}, "rate_abuse_limit must be more than max_in_flight"),
        ({"max_connections_per_address": -1}, "max_connections_per_address must be positive"),
        ({"rate_per_second": 0}, "rate_per_second must be positive"),
        ({"max_rooms": 0}, "max_rooms must be positive"),
        ({"trusted_proxies": ("10.0.0.0/33",)}, "trusted proxy '10.0.0.0/33' is not an IP"),
    ],
)
def test_bad_limits_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerConfig(**fields)


def test_trusted_proxies_are_normalized_networks() -> None:
    config = ServerConfig(trusted_proxies=("10.1.2.3/8", "::1", "192.0.2.7"))
    assert config.trusted_proxies == ("10.0.0.0/8", "::1/128", "192.0.2.7/32")

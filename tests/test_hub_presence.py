"""The hub's presence and join-from-a-position rules on a fake clock (PROTOCOL §7.5, §7.6)."""

from __future__ import annotations

from typing import Any

import pytest

from rtchat_sdk import protocol as p
from server_ref.config import ServerConfig
from server_ref.core.commands import BrokerCall
from tests.hubnet import HubNet, run_now

pytestmark = pytest.mark.timeout(30)

LOBBY = p.room_stream("/", "lobby")


def presence_net(**config: Any) -> HubNet:
    net = HubNet(ServerConfig(**config))
    net.namespaces["/"].presence = True
    net.namespaces["/"].presence_events = True
    return net


def members(net: HubNet) -> list[str]:
    return [m.session for m in run_now(net.broker.presence(LOBBY))]


def stream_events(net: HubNet) -> list[tuple[str, Any]]:
    page = run_now(net.broker.history(LOBBY, None, 100, False))
    return [(e.text.split('"event":')[1].split(",")[0].strip('"'), e.offset) for e in page.entries]


def join(net: HubNet, conn: int, message_id: int, **fields: Any) -> dict[str, Any]:
    net.send(conn, {"type": "join", "id": message_id, "room": "lobby", **fields})
    replies = [f for f in net.frames(conn) if f.get("id") == message_id]
    assert replies
    assert replies[0]["type"] == "reply", replies
    return replies[0]


def test_a_dropped_session_leaves_its_rooms_when_the_grace_period_ends() -> None:
    net = presence_net(presence_grace=20)
    conn, welcome = net.hello(client="app/1")
    join(net, conn, 1)
    assert members(net) == [welcome["session"]]
    net.close(conn, p.CloseCode.GOING_AWAY)  # no goodbye
    net.advance(19.9)
    assert members(net) == [welcome["session"]]
    net.advance(0.2)
    assert members(net) == []
    texts = [e.text for e in run_now(net.broker.history(LOBBY, None, 10, False)).entries]
    assert '"event":"$join"' in texts[0]
    assert '"event":"$leave"' in texts[1]
    assert '"reason":"disconnected"' in texts[1]
    assert '"client":"app/1"' in texts[1]


def test_a_resume_within_the_grace_keeps_the_entry_and_announces_nothing() -> None:
    net = presence_net(presence_grace=20)
    conn, welcome = net.hello()
    join(net, conn, 1)
    joined_at = run_now(net.broker.presence(LOBBY))[0].joined_at
    net.close(conn, p.CloseCode.GOING_AWAY)
    net.advance(10)
    resume = {"token": welcome["token"], "session": welcome["session"]}
    _, again = net.hello(resume=resume)
    assert again["resumed"] is True
    net.advance(30)  # past the first grace period: it resumed, so nothing happens
    assert [m.joined_at for m in run_now(net.broker.presence(LOBBY))] == [joined_at]
    assert [event for event, _ in stream_events(net)] == ["$join"]


def test_a_resume_after_the_grace_enters_again() -> None:
    net = presence_net(presence_grace=5, session_ttl=60)
    conn, welcome = net.hello()
    join(net, conn, 1)
    net.close(conn, p.CloseCode.GOING_AWAY)
    net.advance(6)
    assert members(net) == []
    net.hello(resume={"token": welcome["token"], "session": welcome["session"]})
    assert members(net) == [welcome["session"]]
    assert [event for event, _ in stream_events(net)] == ["$join", "$leave", "$join"]


def test_a_session_that_expires_while_present_leaves_with_reason_expired() -> None:
    net = presence_net(presence_grace=100, session_ttl=30)
    conn, _ = net.hello()
    join(net, conn, 1)
    net.close(conn, p.CloseCode.GOING_AWAY)
    net.advance(31)
    assert members(net) == []
    last = run_now(net.broker.history(LOBBY, None, 1, True)).entries[0].text
    assert '"event":"$leave"' in last
    assert '"reason":"expired"' in last


def test_the_node_renews_its_entries_before_the_ttl_runs_out() -> None:
    net = presence_net(presence_ttl=60, heartbeat_interval=1000, heartbeat_timeout=1000)
    conn, welcome = net.hello()
    join(net, conn, 1)
    net.advance(200)  # three TTLs: only renewals keep it
    assert members(net) == [welcome["session"]]
    renewals = [
        c for c in net.calls if isinstance(c, BrokerCall) and c.method == "presence_refresh"
    ]
    assert len(renewals) == 10  # every 20 s
    net.close(conn, p.CloseCode.NORMAL)
    assert members(net) == []


def test_without_events_presence_appends_nothing_to_the_stream() -> None:
    net = presence_net()
    net.namespaces["/"].presence_events = False
    conn, _ = net.hello()
    join(net, conn, 1)
    net.send(conn, {"type": "leave", "id": 2, "room": "lobby"})
    assert run_now(net.broker.position(LOBBY))[1] == 0


def test_a_join_from_a_position_replays_then_releases_the_live_entries_in_order() -> None:
    net = HubNet(auto=False)
    conn = net.open()
    net.send(conn, {"type": "hello", "protocol": p.PROTOCOL_VERSION})
    net.answer_all()
    net.frames(conn)
    for n in range(1, 4):
        net.publish(LOBBY, n)
    epoch = run_now(net.broker.position(LOBBY))[0]
    net.send(
        conn, {"type": "join", "id": 1, "room": "lobby", "since": {"epoch": epoch, "offset": 1}}
    )
    while not any(c.method == "read_since" for c in net.pending if isinstance(c, BrokerCall)):
        net.answer(0)
    net.publish(LOBBY, 4)  # live, while the catch-up is read: held
    net.publish(LOBBY, 5)
    net.answer_all()
    out = net.frames(conn)
    assert [f["offset"] for f in out if f["type"] == "message"] == [2, 3, 4, 5]
    reply = next(f for f in out if f["type"] == "reply")
    assert reply["data"]["offset"] == 3  # the position when joined; 4 and 5 came live


def test_a_join_from_a_trimmed_position_says_so_with_a_gap() -> None:
    net = HubNet(ServerConfig(history_size=2))
    conn, _ = net.hello()
    for n in range(1, 6):
        net.publish(LOBBY, n)
    epoch = run_now(net.broker.position(LOBBY))[0]
    net.send(
        conn, {"type": "join", "id": 1, "room": "lobby", "since": {"epoch": epoch, "offset": 1}}
    )
    out = net.frames(conn)
    assert [(f["type"], f.get("offset")) for f in out] == [
        ("gap", 3),
        ("message", 4),
        ("message", 5),
        ("reply", None),
    ]
    assert out[0]["reason"] == "trimmed"


def test_reads_are_not_remembered_and_presence_is_not_enabled_by_default() -> None:
    net = HubNet()
    conn, _ = net.hello()
    net.send(conn, {"type": "presence", "id": 1, "room": "lobby"})
    net.send(conn, {"type": "history", "id": 2, "room": "lobby"})
    first, second = net.frames(conn)
    assert (first["type"], first["code"]) == ("error", "not_enabled")
    assert second["data"]["entries"] == []
    assert second["data"]["gap"] is None
    remembered = [
        c.args[1] for c in net.calls if isinstance(c, BrokerCall) and c.method == "remember_reply"
    ]
    assert remembered == [1]  # the error is; the history reply is not


def test_a_join_whose_catch_up_failed_is_not_joined_so_its_resend_catches_up() -> None:
    from server_ref.broker import MemoryBroker
    from server_ref.errors import BrokerUnavailable

    class OutOnce(MemoryBroker):
        failed = False

        async def read_since(self, stream: str, epoch: str, offset: int) -> Any:
            if not self.failed:
                self.failed = True
                raise BrokerUnavailable("down for a moment")
            return await super().read_since(stream, epoch, offset)

    net = HubNet(broker=OutOnce(clock=lambda: net.now))
    conn, _ = net.hello()
    for n in range(1, 4):
        net.publish(LOBBY, n)
    epoch = run_now(net.broker.position(LOBBY))[0]
    join_frame = {"type": "join", "id": 1, "room": "lobby", "since": {"epoch": epoch, "offset": 0}}
    net.send(conn, join_frame)
    (refused,) = net.frames(conn)
    assert (refused["type"], refused["code"]) == ("error", "unavailable")
    net.publish(LOBBY, 4)  # not a member: not delivered
    assert net.frames(conn) == []
    net.send(conn, join_frame)  # the client resends it
    out = net.frames(conn)
    assert [f["offset"] for f in out if f["type"] == "message"] == [1, 2, 3, 4]

"""The server hub on its own: a fake clock, the memory broker, calls answered by the test.

No sockets and no asyncio: ``HubNet`` (tests/hubnet.py) carries out the
hub's commands, and with ``auto=False`` the test decides when each call the
hub asked for is answered, to put inputs in between.
"""

from __future__ import annotations

from typing import Any

import pytest

from rtchat_sdk import protocol as p
from server_ref.broker import MemoryBroker, StreamEntry
from server_ref.broker.base import LATER
from server_ref.config import ServerConfig
from server_ref.core.commands import BrokerCall, Handle
from server_ref.errors import BrokerUnavailable
from tests.hubnet import HubNet, run_now

pytestmark = pytest.mark.timeout(10)

ROOM = p.room_stream(p.DEFAULT_NAMESPACE, "r")


def with_echo(net: HubNet) -> list[Any]:
    """Register ``echo``, which records what it was given."""
    seen: list[Any] = []

    @net.namespaces["/"].on("echo")
    def echo(ctx: object, data: Any) -> Any:
        seen.append(data)
        return data

    return seen


def request(i: int, data: Any = None) -> dict[str, Any]:
    return {"type": "request", "id": i, "event": "echo", "data": data}


def test_hello_gets_welcome_and_frames_sent_during_the_hello_wait_for_it() -> None:
    net = HubNet(auto=False)
    with_echo(net)
    conn = net.open()
    net.send(conn, {"type": "hello", "protocol": 1})
    net.send(conn, request(1, "early"))  # before the hello is handled
    assert net.frames(conn) == []
    net.answer_all()
    welcome, reply = net.frames(conn)
    assert welcome["type"] == "welcome"
    assert (reply["type"], reply["id"], reply["data"]) == ("reply", 1, "early")


def test_a_sessions_messages_run_one_at_a_time_in_order() -> None:
    net = HubNet()
    seen = with_echo(net)
    conn, _ = net.hello()
    net.auto = False
    net.send(conn, request(1, "a"))
    net.send(conn, request(2, "b"))
    # Only the first message's handler is asked for; the second waits its turn.
    assert [(type(c).__name__, getattr(c, "data", None)) for c in net.pending] == [("Handle", "a")]
    net.answer_all()
    assert seen == ["a", "b"]
    assert [(f["id"], f["data"]) for f in net.frames(conn)] == [(1, "a"), (2, "b")]


def test_a_session_from_another_node_asks_the_dedupe_records_for_every_message() -> None:
    net = HubNet()
    seen = with_echo(net)
    conn, welcome = net.hello()
    net.send(conn, request(1, "here"))
    assert not any(isinstance(c, BrokerCall) and c.method == "recall_reply" for c in net.calls)
    net.close(conn, p.CloseCode.GOING_AWAY)
    record = net.hub.sessions.by_id[welcome["session"]].record
    record.owner = "another-node"  # as if it had been resumed there since
    conn, _ = net.hello(resume={"token": welcome["token"], "session": welcome["session"]})
    net.send(conn, request(1, "here"))  # resent: answered from the records, not run
    net.send(conn, request(2, "next"))
    recalls = [
        c.args[1] for c in net.calls if isinstance(c, BrokerCall) and c.method == "recall_reply"
    ]
    assert recalls == [1, 2]
    assert seen == ["here", "next"]


def test_a_resent_message_gets_its_first_reply_and_is_not_run_again() -> None:
    net = HubNet()
    seen = with_echo(net)
    conn, _ = net.hello()
    net.send(conn, request(1, "once"))
    net.send(conn, request(1, "once"))
    assert seen == ["once"]
    first, again = net.frames(conn)
    assert first == again


def test_calls_the_broker_answers_at_once_never_reach_the_driver() -> None:
    net = HubNet(answer_now=True)
    seen = with_echo(net)
    conn, welcome = net.hello()
    net.calls.clear()
    net.send(conn, request(1, "once"))
    # remember_reply was taken at once: the driver only ran the handler.
    assert [type(call) for call in net.calls] == [Handle]
    (reply,) = net.frames(conn)
    assert reply == {"type": "reply", "id": 1, "data": "once"}
    # A session from another node asks the dedupe records (at once, too) and gets it again.
    net.hub.sessions.by_id[welcome["session"]].highest = None
    net.send(conn, request(1, "once"))
    assert seen == ["once"]
    assert net.frames(conn) == [reply]
    assert [type(call) for call in net.calls] == [Handle]


def test_sync_handlers_run_inside_the_hub_step_and_async_ones_are_begun_not_run() -> None:
    net = HubNet(answer_now=True, handle_now=True)
    seen = with_echo(net)
    ran: list[Any] = []

    @net.namespaces["/"].on("later")
    async def later(ctx: object, data: Any) -> Any:
        ran.append(data)
        return {"later": data}

    @net.namespaces["/"].on("boom")
    def boom(ctx: object, data: Any) -> Any:
        raise ValueError("no")

    conn, _ = net.hello()
    net.auto = False
    net.calls.clear()
    net.send(conn, request(1, "now"))
    assert net.calls == []  # no call reached the driver: handler and dedupe taken at once
    assert net.frames(conn) == [{"type": "reply", "id": 1, "data": "now"}]
    net.send(conn, {"type": "request", "id": 2, "event": "later", "data": 5})
    (call,) = net.pending
    assert type(call) is Handle
    assert call.started is not None
    assert ran == []  # and not run: the driver awaits it
    net.send(conn, request(3, "queued"))  # behind message 2: one session's messages in order
    assert seen == ["now"]
    assert net.frames(conn) == []
    net.answer_all()
    assert ran == [5]
    assert seen == ["now", "queued"]
    assert net.frames(conn) == [
        {"type": "reply", "id": 2, "data": {"later": 5}},
        {"type": "reply", "id": 3, "data": "queued"},
    ]
    net.send(conn, {"type": "request", "id": 4, "event": "boom"})
    (failed,) = net.frames(conn)
    assert (failed["type"], failed["id"], failed["code"]) == ("error", 4, "handler_error")
    assert failed["message"] == "ValueError: no"


def test_memory_broker_answers_at_once_only_what_a_subclass_does_not_override() -> None:
    broker = MemoryBroker()
    assert broker.answer_now("remember_reply", ("s", 3, "r3")) is None
    assert broker.answer_now("recall_reply", ("s", 3)) == (True, "r3")
    assert broker.answer_now("recall_reply", ("s", 4)) == run_now(broker.recall_reply("s", 4))
    assert broker.answer_now("position", (ROOM,)) == run_now(broker.position(ROOM))
    assert broker.answer_now("append", (ROOM, None)) is LATER  # it calls listeners

    class Own(MemoryBroker):
        async def remember_reply(self, session_id: str, message_id: int, reply: str) -> None:
            raise ConnectionError("awaited, never bypassed")

    assert Own().answer_now("remember_reply", ("s", 1, "r")) is LATER
    assert Own().answer_now("recall_reply", ("s", 1)) == (False, None)


def test_live_entries_during_a_replay_follow_it_without_duplicates() -> None:
    net = HubNet()
    conn, welcome = net.hello()
    net.send(conn, {"type": "join", "id": 1, "ns": "/", "room": "r"})
    (joined,) = net.frames(conn)
    epoch = joined["data"]["epoch"]
    for i in range(3):
        net.publish(ROOM, f"before {i}")
    net.close(conn, p.CloseCode.GOING_AWAY)  # dropped, not a goodbye
    net.auto = False
    resume = {
        "token": welcome["token"],
        "session": welcome["session"],
        "streams": [{"stream": ROOM, "epoch": epoch, "offset": 1, "ns": "/", "room": "r"}],
        "last_reply": 1,
    }
    conn = net.open()
    net.send(conn, {"type": "hello", "protocol": 1, "resume": resume})
    while not any(
        isinstance(c, BrokerCall) and c.method == "read_since" and c.args[0] == ROOM
        for c in net.pending
    ):
        net.answer()
    net.publish(ROOM, "during 0")  # the replay has not read the room yet: covered by it
    net.answer()  # the replay reads the room
    net.publish(ROOM, "during 1")  # after the read, while the replay is not done: held
    net.answer_all()
    net.publish(ROOM, "after")
    frames = net.frames(conn)
    assert frames[0]["type"] == "welcome"
    assert frames[0]["resumed"] is True
    room = [(f["offset"], f["data"]) for f in frames if f.get("stream") == ROOM]
    assert room == [
        (2, "before 1"),
        (3, "before 2"),
        (4, "during 0"),
        (5, "during 1"),
        (6, "after"),
    ]


def test_own_publishes_come_back_only_with_echo() -> None:
    net = HubNet()
    conn, _ = net.hello()
    net.send(conn, {"type": "join", "id": 1, "ns": "/", "room": "r"})
    for i, echo in ((2, False), (3, True)):
        net.send(
            conn,
            {"type": "publish", "id": i, "ns": "/", "room": "r", "event": "m", "echo": echo},
        )
    deliveries = [f["offset"] for f in net.frames(conn) if f["type"] == "message"]
    assert deliveries == [2]


def test_heartbeats_ping_a_silent_peer_then_close_it() -> None:
    config = ServerConfig(heartbeat_interval=10, heartbeat_timeout=5)
    net = HubNet(config)
    conn, _ = net.hello()
    net.advance(10)
    assert [f["type"] for f in net.frames(conn)] == ["ping"]
    assert conn not in net.closed
    net.advance(5)
    assert net.closed[conn] == p.CloseCode.HEARTBEAT_TIMEOUT


def test_a_connection_without_hello_is_closed_at_the_handshake_timeout() -> None:
    net = HubNet(ServerConfig(handshake_timeout=3))
    conn = net.open()
    net.advance(2.9)
    assert conn not in net.closed
    net.advance(0.1)
    assert net.closed[conn] == p.CloseCode.HANDSHAKE_TIMEOUT


def test_a_slow_handler_is_not_taken_for_a_silent_peer() -> None:
    config = ServerConfig(heartbeat_interval=10, heartbeat_timeout=5)
    net = HubNet(config)
    with_echo(net)
    conn, _ = net.hello()
    net.auto = False
    net.send(conn, request(1))
    while not any(isinstance(c, Handle) for c in net.pending):
        net.answer()
    net.advance(60)  # the handler runs all this time
    assert conn not in net.closed
    net.answer_all()
    assert [f["type"] for f in net.frames(conn)][-1] == "reply"


def test_a_detached_session_is_resumable_until_its_ttl() -> None:
    net = HubNet(ServerConfig(session_ttl=30))
    conn, welcome = net.hello()
    net.close(conn, p.CloseCode.GOING_AWAY)
    net.advance(29)
    assert net.hub.session_ids() == [welcome["session"]]
    net.advance(1)
    assert net.hub.session_ids() == []
    resume = {"token": welcome["token"], "session": welcome["session"]}
    net.now += 1
    _, again = net.hello(resume=resume)
    assert again["resumed"] is False
    assert again["session"] != welcome["session"]


def test_goodbye_ends_the_session() -> None:
    net = HubNet()
    conn, welcome = net.hello()
    net.close(conn, p.CloseCode.NORMAL)
    assert net.hub.session_ids() == []
    _, again = net.hello(resume={"token": welcome["token"]})
    assert again["resumed"] is False


def test_a_session_resumed_on_a_new_connection_closes_the_old_one_with_4006() -> None:
    net = HubNet()
    old, welcome = net.hello()
    new, again = net.hello(resume={"token": welcome["token"], "session": welcome["session"]})
    assert again["resumed"] is True
    assert net.closed == {old: p.CloseCode.SESSION_REPLACED}
    net.publish(p.inbox_stream(welcome["session"]), "direct")
    assert [f["data"] for f in net.frames(new) if f["type"] == "message"] == ["direct"]
    assert net.frames(old) == []


def test_a_slow_consumer_is_closed_with_4005_and_sent_nothing_more() -> None:
    net = HubNet()
    conn, _ = net.hello()
    net.send(conn, {"type": "join", "id": 1, "ns": "/", "room": "r"})
    net.frames(conn)
    net.hub.connection_slow(conn, net.now)
    net.run()
    assert net.closed == {conn: p.CloseCode.SLOW_CONSUMER}
    net.publish(ROOM, "late")
    assert net.sent[conn] == []


def test_past_max_connections_a_connection_is_told_to_come_back_later() -> None:
    net = HubNet(ServerConfig(max_connections=1))
    net.hello()
    refused = net.open()
    (notice,) = net.frames(refused)
    assert (notice["type"], notice["code"]) == ("error", "overloaded")
    assert net.closed[refused] == p.CloseCode.TRY_AGAIN_LATER


def test_shutdown_tells_every_connection_and_closes_it_going_away() -> None:
    net = HubNet()
    conn, _ = net.hello()
    net.hub.shutdown(net.now)
    net.run()
    (notice,) = net.frames(conn)
    assert notice["code"] == "shutting_down"
    assert net.closed == {conn: p.CloseCode.GOING_AWAY}
    late = net.open()
    assert net.closed[late] == p.CloseCode.GOING_AWAY


def test_an_unknown_user_is_refused_with_4001() -> None:
    net = HubNet(users={"good": "ann"})
    conn = net.open()
    net.send(conn, {"type": "hello", "protocol": 1, "auth": {"token": "bad"}})
    (refusal,) = net.frames(conn)
    assert refusal["code"] == "unauthorized"
    assert net.closed[conn] == p.CloseCode.UNAUTHORIZED
    ok, welcome = net.hello(auth={"token": "good"})
    assert ok not in net.closed
    assert welcome["resumed"] is False


def test_leaving_a_room_stops_its_deliveries_and_its_subscription() -> None:
    net = HubNet()
    conn, _ = net.hello()
    net.send(conn, {"type": "join", "id": 1, "ns": "/", "room": "r"})
    net.send(conn, {"type": "leave", "id": 2, "ns": "/", "room": "r"})
    net.publish(ROOM, "not for us")
    assert [f["type"] for f in net.frames(conn)] == ["reply", "reply"]
    subscriptions = [
        (c.method, c.args[0])
        for c in net.calls
        if isinstance(c, BrokerCall) and c.method.endswith("subscribe") and c.args[0] == ROOM
    ]
    assert subscriptions == [("subscribe", ROOM), ("unsubscribe", ROOM)]


def test_a_slow_resume_never_replaces_a_newer_connection_of_the_session() -> None:
    """Two hellos resume one session; the older one's handshake ends last. It must
    not close the newer connection with 4006 (the client would stop for good,
    SessionReplaced being fatal): the stale connection is the one closed."""
    net = HubNet()
    with_echo(net)
    first, welcome = net.hello()
    net.close(first, peer_code=None)  # the link died: the session waits to be resumed
    resume = {"token": welcome["token"], "session": welcome["session"], "last_reply": 0}
    net.auto = False
    older = net.open()
    net.send(older, {"type": "hello", "protocol": 1, "resume": resume})
    assert net.pending  # its handshake waits on the broker
    newer = net.open()
    net.send(newer, {"type": "hello", "protocol": 1, "resume": resume})
    stalled = len(net.pending) - 1
    while len(net.pending) > stalled:  # the newer handshake runs to its welcome first
        net.answer(len(net.pending) - 1)
    assert net.frames(newer)[0]["type"] == "welcome"
    net.answer_all()  # then the older one finishes
    assert net.closed.get(older) == p.CloseCode.SESSION_REPLACED
    assert newer not in net.closed
    net.auto = True
    net.send(newer, request(1, "still here"))
    assert [(f["type"], f.get("id")) for f in net.frames(newer)] == [("reply", 1)]


def test_a_live_entry_that_skips_offsets_is_preceded_by_a_gap_frame() -> None:
    """A broker that could not hand over some entries (a long pub/sub outage past
    the history) must not make members see a silent jump."""
    net = HubNet()
    conn, _ = net.hello()
    net.send(conn, {"type": "join", "id": 1, "ns": "/", "room": "r"})
    (joined,) = net.frames(conn)
    epoch = joined["data"]["epoch"]
    net.publish(ROOM, "one")
    assert [f["offset"] for f in net.frames(conn)] == [1]
    text = p.encode(
        p.MessageFrame(stream=ROOM, epoch=epoch, offset=5, room="r", event="m", data="five")
    )
    entry = StreamEntry(ROOM, epoch, 5, text, None, False, net.now)
    net.hub.entry_appended(entry)  # offsets 2-4 never came
    net.run()
    gap, five = net.frames(conn)
    assert (gap["type"], gap["reason"], gap["epoch"], gap["offset"], gap["room"]) == (
        "gap",
        "trimmed",
        epoch,
        4,
        "r",
    )
    assert (five["type"], five["offset"]) == ("message", 5)
    net.hub.entry_appended(StreamEntry(ROOM, epoch, 6, entry.text, None, False, net.now))
    net.run()
    assert [f["type"] for f in net.frames(conn)] == ["message"]  # in order again: no gap


class FlakyBroker(MemoryBroker):
    """A memory broker that can be made unreachable, as a Redis outage would."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise BrokerUnavailable("redis: ConnectionError('down')")

    async def append(self, stream: str, draft: Any, key: str | None = None) -> Any:
        self._check()
        return await super().append(stream, draft, key)

    async def remember_reply(self, session_id: str, message_id: int, reply: str) -> None:
        self._check()
        await super().remember_reply(session_id, message_id, reply)

    async def load_session(self, token: str) -> Any:
        self._check()
        return await super().load_session(token)


def publish(i: int, data: Any) -> dict[str, Any]:
    return {"type": "publish", "id": i, "room": "r", "event": "m", "data": data}


def test_a_broker_outage_answers_unavailable_and_keeps_the_sessions_order() -> None:
    broker = FlakyBroker()
    net = HubNet(broker=broker)
    conn, _ = net.hello()
    net.send(conn, {"type": "join", "id": 1, "ns": "/", "room": "r"})
    net.frames(conn)
    broker.down = True
    net.send(conn, publish(2, "a"))
    broker.down = False  # back: but 3 must not overtake 2
    net.send(conn, publish(3, "b"))
    first, second = net.frames(conn)
    assert (first["id"], first["code"], first["retry_after"]) == (2, "unavailable", 1.0)
    assert (second["id"], second["code"]) == (3, "unavailable")
    assert "message 2 is to be resent first" in second["message"]
    net.send(conn, publish(2, "a"))  # the client resends in id order
    net.send(conn, publish(3, "b"))
    replies = net.frames(conn)
    assert [(f["type"], f["id"], f["data"]["offset"]) for f in replies] == [
        ("reply", 2, 1),
        ("reply", 3, 2),
    ]


def test_a_reply_that_cannot_be_remembered_is_still_sent() -> None:
    broker = FlakyBroker()
    net = HubNet(broker=broker)
    seen = with_echo(net)
    conn, welcome = net.hello()
    broker.down = True
    net.send(conn, request(1, "ran"))
    broker.down = False
    (answer,) = net.frames(conn)
    assert (answer["type"], answer["data"]) == ("reply", "ran")
    assert seen == ["ran"]
    assert net.hub.sessions.by_id[welcome["session"]].highest is None  # ask the records now


def test_a_hello_the_broker_cannot_answer_is_closed_with_1013() -> None:
    broker = FlakyBroker()
    net = HubNet(broker=broker)
    conn, welcome = net.hello()
    net.close(conn, p.CloseCode.GOING_AWAY)
    broker.down = True
    conn = net.open()
    resume = {"token": welcome["token"], "session": welcome["session"]}
    net.send(conn, {"type": "hello", "protocol": 1, "resume": resume})
    assert net.closed[conn] == p.CloseCode.TRY_AGAIN_LATER

"""The client's sans-I/O core, driven by hand with a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from rtchat_sdk import BufferFull, Outbox, OverflowPolicy
from rtchat_sdk import protocol as p
from rtchat_sdk.core import (
    ClientSession,
    ConnectionState,
    Delivered,
    Dropped,
    Failed,
    GapReported,
    LinkDead,
    ProtocolViolation,
    Refused,
    Replied,
    RoundTrip,
    ServerNotice,
    TimedOut,
    Welcomed,
)
from rtchat_sdk.outbox import HandledPosition, OutboxEntry, SavedState
from tests.helpers import events, frames, message, open_session, reply, welcome

pytestmark = pytest.mark.timeout(10)


def test_hello_first_and_nothing_else_before_welcome() -> None:
    s = ClientSession(auth={"user": "ann"})
    s.emit("/", "queued", 1, now=0)
    assert frames(s) == []  # not connected: waits in the outbox
    s.connection_made(0)
    sent = frames(s)
    assert [f["type"] for f in sent] == ["hello"]
    assert sent[0]["protocol"] == p.PROTOCOL_VERSION
    assert sent[0]["auth"] == {"user": "ann"}
    assert sent[0]["resume"] is None
    s.receive_text(welcome(), 0)
    assert [f["type"] for f in frames(s)] == ["emit"]
    (welcomed,) = events(s)
    assert isinstance(welcomed, Welcomed)
    assert (welcomed.session, welcomed.resumed) == ("s1", False)
    assert welcomed.limits is not None  # the driver's long polling follows them
    assert (welcomed.limits.poll_max_frames, welcomed.limits.poll_timeout) == (100, 25.0)


def test_ids_increase_and_replies_correlate_out_of_order() -> None:
    s = ClientSession()
    open_session(s)
    ids = [s.request("/", "e", i, now=0)[0] for i in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    assert [f["id"] for f in frames(s)] == ids
    for i in reversed(ids):
        s.receive_text(reply(i, i * 10), 0)
    got = events(s)
    assert got == [Replied(i, "request", i * 10) for i in reversed(ids)]
    assert len(s.outbox) == 0


def test_error_reply_fails_only_its_message() -> None:
    s = ClientSession()
    open_session(s)
    s.request("/", "a", None, now=0)
    s.request("/", "b", None, now=0)
    s.receive_text(p.encode(p.ErrorFrame(id=2, code="unknown_event", message="no")), 0)
    assert events(s) == [Failed(2, "request", "unknown_event", "no")]
    assert s.outbox.ids() == [1]


def test_unanswered_messages_are_resent_in_order_after_reconnect() -> None:
    s = ClientSession()
    open_session(s)
    for i in range(3):
        s.publish("/", "room", "e", i, now=0)
    assert [f["id"] for f in frames(s)] == [1, 2, 3]
    s.receive_text(reply(1), 0)
    s.connection_lost(1)
    s.emit("/", "while-down", None, now=1)
    assert frames(s) == []
    s.connection_made(2)
    hello = frames(s)[0]
    assert hello["resume"]["token"] == "tok"
    assert hello["resume"]["last_reply"] == 1
    s.receive_text(welcome(resumed=True), 2)
    resent = frames(s)
    assert [f["id"] for f in resent] == [2, 3, 4]
    assert [f["type"] for f in resent] == ["publish", "publish", "emit"]
    assert s.counters.resent == 2


def test_in_flight_window_holds_the_rest_back() -> None:
    s = ClientSession(max_in_flight=2)
    open_session(s)
    for i in range(5):
        s.emit("/", "e", i, now=0)
    assert [f["id"] for f in frames(s)] == [1, 2]
    s.receive_text(reply(1), 0)
    assert [f["id"] for f in frames(s)] == [3]
    assert s.in_flight == 2


def test_the_window_slides_from_the_oldest_unanswered_id() -> None:
    # Answered out of order: 3 would be two ids past 1, which is still unanswered.
    # The server keeps the newest max_in_flight replies, so 1's could be lost.
    s = ClientSession(max_in_flight=2)
    open_session(s)
    for i in range(5):
        s.emit("/", "e", i, now=0)
    assert [f["id"] for f in frames(s)] == [1, 2]
    s.receive_text(reply(2), 0)
    assert frames(s) == []
    assert s.in_flight == 1
    s.receive_text(reply(1), 0)
    assert [f["id"] for f in frames(s)] == [3, 4]


def test_a_message_given_up_on_holds_the_window_across_a_reconnect() -> None:
    # Request 2 timed out on the wire; the server may have run it. After a
    # reconnect, 1 is resent and 3 must wait: the server may hold replies to
    # 1 and 2 and must not evict 1's to make room for 3's.
    s = ClientSession(max_in_flight=2)
    open_session(s)
    s.emit("/", "e", 1, now=0)
    s.request("/", "slow", None, now=0, timeout=1)
    s.emit("/", "e", 3, now=0)
    assert [f["id"] for f in frames(s)] == [1, 2]
    s.handle_timer(1)
    assert frames(s) == []  # 2 gave up, but is on the wire: 3 waits
    s.connection_lost(2)
    s.connection_made(2)
    s.receive_text(welcome(resumed=True), 2)
    sent = frames(s)
    assert [f["type"] for f in sent] == ["hello", "emit"]
    assert sent[0]["resume"]["last_reply"] == 0
    assert sent[1]["id"] == 1
    s.receive_text(reply(1), 2)
    assert [f["id"] for f in frames(s)] == [3]


def test_server_window_caps_the_client_window() -> None:
    s = ClientSession(max_in_flight=100)
    open_session(s, max_in_flight=1)
    s.emit("/", "e", 1, now=0)
    s.emit("/", "e", 2, now=0)
    assert [f["id"] for f in frames(s)] == [1]


def test_request_timeout_leaves_the_outbox_and_is_never_sent() -> None:
    s = ClientSession()
    s.request("/", "slow", None, now=0, timeout=5)
    assert s.get_timer() == 5
    s.handle_timer(4.9)
    assert events(s) == []
    s.handle_timer(5.0)
    assert events(s) == [TimedOut(1, "request")]
    assert s.counters.timed_out == 1
    s.connection_made(6)
    s.receive_text(welcome(), 6)
    assert [f["type"] for f in frames(s)] == ["hello"]
    # A late reply to it is ignored.
    s.receive_text(reply(1, "late"), 7)
    assert [e for e in events(s) if isinstance(e, Replied)] == []


def test_duplicate_deliveries_are_dropped_by_offset() -> None:
    s = ClientSession()
    open_session(s)
    for offset in (1, 2, 2, 1, 3):
        s.receive_text(message("room:/:r", offset, offset), 0)
    delivered = [e.frame.offset for e in events(s) if isinstance(e, Delivered)]
    assert delivered == [1, 2, 3]
    assert s.counters.duplicates_dropped == 2


def test_new_epoch_without_gap_frame_is_reported() -> None:
    s = ClientSession()
    open_session(s)
    s.receive_text(message("room:/:r", 5, epoch="old"), 0)
    s.receive_text(message("room:/:r", 1, epoch="new"), 0)
    got = events(s)
    assert isinstance(got[1], GapReported)
    assert (got[1].reason, got[1].epoch) == ("epoch_changed", "new")
    assert isinstance(got[2], Delivered)
    assert s.streams["room:/:r"].epoch == "new"


def test_gap_frame_moves_the_position_and_is_reported() -> None:
    s = ClientSession()
    open_session(s)
    s.receive_text(message("room:/:r", 1), 0)
    s.receive_text(
        p.encode(p.GapFrame(stream="room:/:r", room="r", epoch="e1", offset=40, reason="trimmed")),
        0,
    )
    s.receive_text(message("room:/:r", 41), 0)
    got = events(s)
    assert isinstance(got[1], GapReported)
    assert got[1].reason == "trimmed"
    assert isinstance(got[2], Delivered)
    assert s.counters.gaps == 1


def test_a_gap_never_moves_the_position_back_within_an_epoch() -> None:
    s = ClientSession()
    open_session(s)
    for offset in (1, 2, 3):
        s.receive_text(message("room:/:r", offset), 0)
    s.receive_text(
        p.encode(p.GapFrame(stream="room:/:r", room="r", epoch="e1", offset=1, reason="trimmed")),
        0,
    )
    s.receive_text(message("room:/:r", 3), 0)  # already delivered: still a duplicate
    got = events(s)
    assert [e.frame.offset for e in got if isinstance(e, Delivered)] == [1, 2, 3]
    (gap,) = [e for e in got if isinstance(e, GapReported)]
    assert (gap.epoch, gap.offset) == ("e1", 3)  # the position kept, persisted once handled
    assert s.streams["room:/:r"].offset == 3
    assert s.counters.duplicates_dropped == 1


def test_joining_again_into_a_new_epoch_is_reported() -> None:
    s = ClientSession()
    open_session(s)
    s.join("/", "r", now=0)
    s.receive_text(reply(1, {"stream": "room:/:r", "epoch": "e1", "offset": 7}), 0)
    s.receive_text(message("room:/:r", 8), 0)
    events(s)
    s.join("/", "r", now=1)  # the server lost the stream meanwhile: a new epoch
    s.receive_text(reply(2, {"stream": "room:/:r", "epoch": "e2", "offset": 3}), 1)
    gaps = [e for e in events(s) if isinstance(e, GapReported)]
    assert [(g.stream, g.reason, g.epoch, g.offset) for g in gaps] == [
        ("room:/:r", "epoch_changed", "e2", 3)
    ]
    assert (s.streams["room:/:r"].epoch, s.streams["room:/:r"].offset) == ("e2", 3)
    assert s.counters.gaps == 1
    s.join("/", "r", now=2)  # the same epoch again: nothing to report
    s.receive_text(reply(3, {"stream": "room:/:r", "epoch": "e2", "offset": 5}), 2)
    assert [e for e in events(s) if isinstance(e, GapReported)] == []


def test_join_reply_sets_the_position_and_resume_presents_it() -> None:
    s = ClientSession()
    open_session(s)
    s.join("/", "r", now=0)
    s.receive_text(reply(1, {"stream": "room:/:r", "epoch": "e1", "offset": 7}), 0)
    s.receive_text(message("room:/:r", 8), 0)
    s.connection_lost(1)
    s.connection_made(1)
    resume = frames(s)[0]["resume"]
    positions = {x["stream"]: (x["epoch"], x["offset"]) for x in resume["streams"]}
    assert positions["room:/:r"] == ("e1", 8)
    assert positions["inbox:s1"] == ("e0", 0)


def test_lost_session_keeps_rooms_reports_the_old_inbox_and_sends_the_outbox() -> None:
    s = ClientSession()
    open_session(s)
    s.join("/chat", "r", now=0)
    s.receive_text(reply(1, {"stream": "room:/chat:r", "epoch": "e1", "offset": 4}), 0)
    s.connection_lost(1)
    s.publish("/chat", "r", "e", "queued", now=1)
    s.connection_made(2)
    hello = frames(s)[0]
    rooms = [x for x in hello["resume"]["streams"] if x["room"] is not None]
    assert rooms == [
        {"stream": "room:/chat:r", "epoch": "e1", "offset": 4, "ns": "/chat", "room": "r"}
    ]
    events(s)
    s.receive_text(welcome(session="s2", token="tok2", resumed=False), 2)
    gaps = [e for e in events(s) if isinstance(e, GapReported)]
    assert [(g.stream, g.reason) for g in gaps] == [("inbox:s1", "session_unknown")]
    assert s.rooms == {("/chat", "r"): "room:/chat:r"}
    assert set(s.streams) == {"room:/chat:r", "inbox:s2"}
    sent = frames(s)
    assert [(f["type"], f["id"]) for f in sent] == [("publish", 2)]
    assert s.token == "tok2"


def test_room_the_server_would_not_rejoin_is_dropped_and_reported() -> None:
    s = ClientSession()
    open_session(s)
    s.join("/", "r", now=0)
    s.receive_text(reply(1, {"stream": "room:/:r", "epoch": "e1", "offset": 0}), 0)
    events(s)
    s.receive_text(
        p.encode(
            p.GapFrame(stream="room:/:r", room="r", epoch="e1", offset=0, reason="not_rejoined")
        ),
        1,
    )
    [gap] = events(s)
    assert isinstance(gap, GapReported)
    assert gap.reason == "not_rejoined"
    assert s.rooms == {}
    assert "room:/:r" not in s.streams


def test_message_larger_than_the_server_limit_is_refused_before_queueing() -> None:
    from rtchat_sdk import MessageTooLarge

    s = ClientSession()
    open_session(s)  # the test welcome announces 1 MiB
    with pytest.raises(MessageTooLarge, match="at most 1048576"):
        s.emit("/", "big", "x" * (1 << 20), now=0)
    assert len(s.outbox) == 0


def test_queued_message_over_a_smaller_announced_limit_fails_at_welcome() -> None:
    s = ClientSession()
    s.emit("/", "big", "x" * 5000, now=0)
    s.emit("/", "small", "x", now=0)
    s.connection_made(0)
    frames(s)
    s.receive_text(welcome().replace('"max_frame_bytes":1048576', '"max_frame_bytes":1000'), 0)
    failed = [e for e in events(s) if isinstance(e, Failed)]
    assert [(e.id, e.code) for e in failed] == [(1, "too_large")]
    assert "at most 1000" in failed[0].message
    assert [f["id"] for f in frames(s)] == [2]


def test_heartbeat_pings_then_declares_the_link_dead() -> None:
    s = ClientSession(ping_spread=0.0)
    open_session(s, interval=2, timeout=1)
    assert s.get_timer() == 2
    s.handle_timer(2)
    ping = frames(s)
    assert ping == [{"type": "ping", "ts": 2}]
    s.receive_text(p.encode(p.PongFrame(ts=2)), 2.25)
    assert events(s) == [RoundTrip(0.25)]
    assert s.rtt == 0.25
    # Silence from 2.25: dead at 2.25 + 2 + 1.
    s.handle_timer(4.25)
    frames(s)
    s.handle_timer(5.24)
    assert events(s) == []
    s.handle_timer(5.25)
    assert isinstance(events(s)[0], LinkDead)


def test_first_ping_is_timed_from_the_hello_not_the_welcome() -> None:
    """PROTOCOL §9: the server's silence clock starts at our hello; a slow
    handshake (welcome 1.5 s later) must not push our first ping past it."""
    s = ClientSession(ping_spread=0.0)
    s.connection_made(0.0)
    assert [f["type"] for f in frames(s)] == ["hello"]
    s.receive_text(welcome(interval=10, timeout=5), 1.5)
    events(s)
    assert s.get_timer() == 10.0  # hello at 0 + interval, not 1.5 + interval
    s.handle_timer(10.0)
    assert frames(s) == [{"type": "ping", "ts": 10.0}]


def test_pings_are_spread_over_the_last_tenth_of_the_interval() -> None:
    draws = iter([0.5, 0.999])
    s = ClientSession(random=lambda: next(draws))
    open_session(s, interval=10, timeout=5)
    assert s.get_timer() == pytest.approx(9.5)
    s.handle_timer(9.5)
    assert frames(s) == [{"type": "ping", "ts": 9.5}]
    s.receive_text(p.encode(p.PongFrame(ts=9.5)), 9.5)
    assert s.get_timer() == pytest.approx(9.5 + 10 * (1 - 0.0999))


def test_server_ping_is_answered() -> None:
    s = ClientSession()
    open_session(s)
    s.receive_text(p.encode(p.PingFrame(ts=42.0)), 1)
    assert frames(s) == [{"type": "pong", "ts": 42.0}]


def test_the_core_state_follows_its_transports() -> None:
    s = ClientSession()
    seen = [s.state]
    steps: list[Callable[[], None]] = [
        lambda: s.connection_made(0),  # hello written, never welcomed: connecting
        lambda: s.receive_text(welcome(), 0),
        lambda: s.connection_lost(1),  # no transport: the driver's wait is its own
        lambda: s.connection_made(2),  # welcomed before: reconnecting
        lambda: s.receive_text(welcome(resumed=True), 2),
        s.close,
    ]
    for step in steps:
        step()
        seen.append(s.state)
    assert seen == [
        ConnectionState.IDLE,
        ConnectionState.CONNECTING,
        ConnectionState.CONNECTED,
        ConnectionState.IDLE,
        ConnectionState.RECONNECTING,
        ConnectionState.CONNECTED,
        ConnectionState.CLOSED,
    ]


def test_only_a_handshake_takes_a_welcome_or_a_refusal() -> None:
    refusal = p.encode(p.ErrorFrame(code="overloaded", message="later", retry_after=2.0))
    s = ClientSession()
    s.receive_text(welcome(), 0)  # no transport yet
    s.receive_text(refusal, 0)
    assert events(s) == [
        ProtocolViolation("unexpected welcome"),
        ServerNotice("overloaded", "later", 2.0),
    ]
    assert s.state is ConnectionState.IDLE
    open_session(s)
    s.connection_lost(1)
    s.connection_made(1)
    s.receive_text(refusal, 1)
    assert events(s) == [Refused("overloaded", "later", False, 2.0)]


def test_one_connection_state_enum_behind_every_import_path() -> None:
    import rtchat_sdk
    import rtchat_sdk.aio
    import rtchat_sdk.aio.connection

    assert rtchat_sdk.ConnectionState is ConnectionState
    assert rtchat_sdk.aio.ConnectionState is ConnectionState
    assert rtchat_sdk.aio.connection.ConnectionState is ConnectionState
    assert [state.value for state in ConnectionState] == [
        "idle",
        "connecting",
        "connected",
        "reconnecting",
        "closed",
    ]


def test_handshake_timeout_declares_the_link_dead() -> None:
    s = ClientSession(handshake_timeout=3)
    s.connection_made(10)
    assert s.get_timer() == 13
    s.handle_timer(13)
    assert isinstance(events(s)[0], LinkDead)


def test_refusal_during_handshake_is_fatal_for_bad_credentials() -> None:
    s = ClientSession()
    s.connection_made(0)
    s.receive_text(p.encode(p.ErrorFrame(code="unauthorized", message="no")), 0)
    assert events(s) == [Refused("unauthorized", "no", True)]


def test_undecodable_server_frame_is_reported_not_raised() -> None:
    s = ClientSession()
    open_session(s)
    s.receive_text("{not json", 0)
    s.receive_text('{"type": "mystery"}', 0)
    got = events(s)
    assert len(got) == 2
    assert all(isinstance(e, ProtocolViolation) for e in got)


def test_outbox_raise_policy_refuses_and_keeps_what_is_queued() -> None:
    s = ClientSession(outbox=Outbox(max_messages=2))
    s.emit("/", "e", 1, now=0)
    s.emit("/", "e", 2, now=0)
    with pytest.raises(BufferFull):
        s.emit("/", "e", 3, now=0)
    assert s.outbox.ids() == [1, 2]


def test_outbox_drop_oldest_reports_what_it_dropped() -> None:
    s = ClientSession(outbox=Outbox(max_messages=2, policy=OverflowPolicy.DROP_OLDEST))
    s.emit("/", "e", 1, now=0)
    s.emit("/", "e", 2, now=0)
    message_id, dropped = s.emit("/", "e", 3, now=0)
    assert dropped == [Dropped(1, "emit")]
    assert s.outbox.ids() == [2, 3]
    assert message_id == 3
    assert s.counters.dropped == 1


def test_outbox_byte_limit() -> None:
    s = ClientSession(outbox=Outbox(max_bytes=200))
    with pytest.raises(BufferFull, match="exceeds the outbox byte limit"):
        s.emit("/", "e", "x" * 500, now=0)
    assert len(s.outbox) == 0


def test_unserialisable_payload_is_a_clear_error_and_queues_nothing() -> None:
    from rtchat_sdk import ValidationFailed

    s = ClientSession()
    with pytest.raises(ValidationFailed, match="cannot encode"):
        s.emit("/", "e", object(), now=0)
    assert len(s.outbox) == 0
    assert s.emit("/", "e", 1, now=0)[0] == 1  # the failed id was not consumed


def test_last_reply_is_below_the_oldest_unanswered() -> None:
    s = ClientSession()
    open_session(s)
    for i in range(4):
        s.emit("/", "e", i, now=0)
    s.receive_text(reply(1), 0)
    s.receive_text(reply(3), 0)
    assert s.last_reply == 1
    s.receive_text(reply(2), 0)
    s.receive_text(reply(4), 0)
    assert s.last_reply == 4


class RecordingOutbox(Outbox):
    """An outbox that remembers what the session asked it to persist."""

    def __init__(self, saved: SavedState | None = None) -> None:
        super().__init__()
        self.saved = saved
        self.positions: list[tuple[str, int | None]] = []

    def load_state(self) -> SavedState | None:
        return self.saved

    def save_stream(self, stream: str, position: HandledPosition | None) -> None:
        self.positions.append((stream, None if position is None else position.offset))


def test_positions_are_persisted_after_handling_not_on_receipt() -> None:
    box = RecordingOutbox()
    s = ClientSession(outbox=box)
    open_session(s)
    box.positions.clear()
    s.receive_text(message("room:/:r", 1), 0)
    s.receive_text(message("room:/:r", 2), 0)
    delivered = [e.frame for e in events(s) if isinstance(e, Delivered)]
    assert box.positions == []  # received, not yet handled
    s.delivery_handled(delivered[0])
    assert box.positions == [("room:/:r", 1)]
    s.delivery_handled(delivered[1])
    assert box.positions == [("room:/:r", 1), ("room:/:r", 2)]


def test_restored_entries_keep_their_expiry() -> None:
    box = RecordingOutbox(SavedState("s1", "tok", 8, {}, {}))
    box.add(OutboxEntry(7, "emit", '{"type":"emit","id":7,"event":"e"}', expires_at=50.0))
    s = ClientSession(outbox=box)
    assert s.get_timer() == 50.0
    s.handle_timer(50.0)
    assert events(s) == [TimedOut(7, "emit")]
    s.connection_made(51)
    s.receive_text(welcome(resumed=True), 51)
    assert [f["type"] for f in frames(s)] == ["hello"]  # the expired entry is not sent


def test_gap_positions_are_persisted_when_handled_in_order() -> None:
    box = RecordingOutbox()
    s = ClientSession(outbox=box)
    open_session(s)
    box.positions.clear()
    s.receive_text(message("room:/:r", 1), 0)
    s.receive_text(
        p.encode(p.GapFrame(stream="room:/:r", room="r", epoch="e1", offset=9, reason="trimmed")),
        0,
    )
    delivered, gap = events(s)
    assert box.positions == []
    assert isinstance(delivered, Delivered)
    assert isinstance(gap, GapReported)
    s.delivery_handled(delivered.frame)
    s.gap_handled(gap)
    assert box.positions == [("room:/:r", 1), ("room:/:r", 9)]


def test_non_ascii_payloads_are_measured_in_bytes() -> None:
    from rtchat_sdk import MessageTooLarge

    s = ClientSession()
    open_session(s)
    with pytest.raises(MessageTooLarge):
        s.emit("/", "e", "é" * 600_000, now=0)  # 600,000 characters, 1.2 MB


def test_resume_names_the_previous_session_and_caps_the_stream_list() -> None:
    s = ClientSession()
    open_session(s)
    for i in range(p.MAX_RESUME_STREAMS + 1):
        s.streams[f"room:/:r{i}"] = HandledPosition("e", 0, "/", f"r{i}")
        s.rooms[("/", f"r{i}")] = f"room:/:r{i}"
    s.connection_lost(1)
    s.connection_made(1)
    resume = frames(s)[0]["resume"]
    assert resume["session"] == "s1"
    assert len(resume["streams"]) == p.MAX_RESUME_STREAMS
    assert all(x["room"] is not None for x in resume["streams"])  # rooms before the inbox
    events(s)
    s.receive_text(welcome(session="s2", resumed=False), 1)
    reasons = sorted(e.reason for e in events(s) if isinstance(e, GapReported))
    assert reasons == ["not_rejoined", "session_unknown"]  # one room past the cap; old inbox
    assert len(s.rooms) == p.MAX_RESUME_STREAMS


def test_overdue_message_is_not_written_even_before_the_timer_fires() -> None:
    s = ClientSession()
    s.connection_made(0)
    frames(s)
    s.emit("/", "e", 1, now=0, expires_in=1.0)
    # The driver's timer is late: the welcome is handled at the deadline first.
    s.receive_text(welcome(), 1.0)
    assert frames(s) == []
    assert TimedOut(1, "emit") in events(s)
    assert len(s.outbox) == 0


def unavailable(message_id: int, retry_after: float | None) -> str:
    return p.encode_error(
        p.ErrorCode.UNAVAILABLE,
        "not processed: broker down; resend it",
        message_id,
        retry_after=retry_after,
    )


def test_an_unavailable_answer_keeps_the_message_and_resends_it_after_retry_after() -> None:
    s = ClientSession()
    open_session(s)
    first, _ = s.publish("/", "r", "m", 1, now=0)
    second, _ = s.request("/", "e", 2, now=0, timeout=30)
    third, _ = s.emit("/", "e", 3, now=0)
    assert [f["id"] for f in frames(s)] == [first, second, third]
    s.receive_text(unavailable(first, 2.0), 0.1)
    s.receive_text(unavailable(second, 2.0), 0.2)
    s.receive_text(reply(third), 0.3)  # processed: settled as usual
    assert events(s) == [Replied(third, "emit", None)]  # no failure: they wait
    assert len(s.outbox) == 2
    assert s.counters.retried == 2
    assert s.last_reply == 0  # the oldest is unanswered: the window does not slide past it
    assert s.get_timer() == pytest.approx(2.1)
    s.handle_timer(2.0)
    assert frames(s) == []  # not yet
    s.handle_timer(2.1)
    assert [f["id"] for f in frames(s)] == [first]
    s.handle_timer(s.get_timer() or 0)
    assert [f["id"] for f in frames(s)] == [second]
    s.receive_text(reply(first, {"stream": "room:/:r", "epoch": "e", "offset": 1}), 2.3)
    s.receive_text(reply(second, "ok"), 2.3)
    assert [type(e) for e in events(s)] == [Replied, Replied]
    assert len(s.outbox) == 0


def test_unavailable_messages_go_out_at_once_on_a_new_connection_and_keep_their_expiry() -> None:
    s = ClientSession()
    open_session(s)
    kept, _ = s.request("/", "e", 1, now=0, timeout=10)
    expiring, _ = s.request("/", "e", 2, now=0, timeout=1)
    frames(s)
    s.receive_text(unavailable(kept, None), 0.1)  # no retry_after: one second
    s.receive_text(unavailable(expiring, 5.0), 0.1)
    s.handle_timer(1.0)  # the second one's own deadline passes while it waits
    assert [type(e) for e in events(s)] == [TimedOut]
    assert frames(s) == []
    s.connection_lost(1.05)
    s.connection_made(1.05)
    s.receive_text(welcome(resumed=True), 1.05)
    assert [f["type"] for f in frames(s)][1:] == ["request"]  # after the hello: the kept one
    s.handle_timer(1.2)  # its old wait is over: not written twice
    assert frames(s) == []

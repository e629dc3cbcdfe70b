"""Reconnect and resume through a fault-injecting proxy."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest

from rtchat_sdk import (
    Client,
    ClientClosed,
    ConnectionState,
    FatalConnectionError,
    GapReported,
    GaveUp,
    ReconnectPolicy,
    RemoteError,
    Unauthorized,
)
from server_ref import Context, MemoryBroker, Server, ServerConfig
from tests.conftest import make_server
from tests.faultproxy import FaultProxy
from tests.helpers import Inbox

pytestmark = pytest.mark.timeout(30)

FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.2)


@pytest.fixture
async def proxy(server: Server) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(server.port) as p:
        yield p


async def wait_state(client: Client, state: ConnectionState) -> None:
    """Wait until the client is in ``state`` (returns at once if it is)."""
    reached = asyncio.Event()
    client.on_state_change(lambda s: reached.set() if s is state else None)
    if client.state is not state:
        await asyncio.wait_for(reached.wait(), 10)


async def take_offline(client: Client, proxy: FaultProxy) -> None:
    """Cut the client's link and keep it out until ``proxy.refuse(False)``."""
    proxy.refuse(True)
    proxy.drop()
    await wait_state(client, ConnectionState.RECONNECTING)


async def wait_reconnected(client: Client) -> None:
    """Wait until the client has lost its connection and got a new one."""
    before = client.counters["connections"]
    changed = asyncio.Event()
    client.on_state_change(lambda s: changed.set())
    async with asyncio.timeout(10):
        while not (
            client.counters["connections"] > before and client.state is ConnectionState.CONNECTED
        ):
            changed.clear()
            await changed.wait()


Dial = Callable[[str], Client]
"""Makes the client under test for a URL (WebSocket here; long polling in
``test_polling_reliability.py``, which runs the same scenarios)."""


def websocket(url: str) -> Client:
    return Client(url, reconnect=FAST)


async def dropped_link_replays_what_was_missed(
    server: Server, proxy: FaultProxy, dial: Dial
) -> Client:
    """The receiver's link is cut and kept down while 5 messages go out; it resumes."""
    async with Client(server.url) as sender, dial(proxy.url) as receiver:
        inbox = Inbox(receiver)
        await sender.join("r")
        await receiver.join("r")
        session = receiver.session_id
        await sender.publish("r", "m", 0)
        await inbox.wait_for(1)
        await take_offline(receiver, proxy)
        for i in range(1, 6):
            await sender.publish("r", "m", i)  # the receiver is away
        proxy.refuse(False)
        await wait_state(receiver, ConnectionState.CONNECTED)
        await sender.publish("r", "m", 6)
        assert await inbox.settle(server) == list(range(7))
        assert receiver.session_id == session
        assert receiver.counters["gaps"] == 0
        assert receiver.counters["reconnects"] >= 1
    return receiver


async def test_dropped_link_resumes_and_replays_what_was_missed(
    server: Server, proxy: FaultProxy
) -> None:
    await dropped_link_replays_what_was_missed(server, proxy, websocket)


async def sent_while_down_goes_in_order(server: Server, proxy: FaultProxy, dial: Dial) -> None:
    """20 publishes made while the link is down wait in the outbox, then go in order."""
    async with Client(server.url) as watcher, dial(proxy.url) as sender:
        inbox = Inbox(watcher)
        await watcher.join("r")
        await sender.join("r")
        await take_offline(sender, proxy)
        sends = [asyncio.ensure_future(sender.publish("r", "m", i)) for i in range(20)]
        await asyncio.sleep(0)  # let them queue
        assert sender.outbox_size == 20
        proxy.refuse(False)
        offsets = await asyncio.gather(*sends)
        assert offsets == list(range(1, 21))
        assert await inbox.settle(server) == list(range(20))


async def test_messages_sent_while_down_wait_in_the_outbox_and_go_in_order(
    server: Server, proxy: FaultProxy
) -> None:
    await sent_while_down_goes_in_order(server, proxy, websocket)


async def cut_request_runs_once(server: Server, proxy: FaultProxy, dial: Dial) -> Client:
    """A request is processed, then the link drops before its reply: it runs once."""
    calls: list[int] = []
    started = asyncio.Event()
    release = asyncio.Event()

    @server.on("count")
    async def count(ctx: Context, n: int) -> int:
        calls.append(n)
        started.set()
        await release.wait()
        return n * 2

    async with dial(proxy.url) as client:
        pending = asyncio.ensure_future(client.request("count", 21))
        await asyncio.wait_for(started.wait(), 5)
        proxy.drop()  # the request was processed, its reply will be lost
        release.set()
        assert await pending == 42
        assert calls == [21]
    return client


async def test_request_resent_after_a_cut_runs_once(server: Server, proxy: FaultProxy) -> None:
    client = await cut_request_runs_once(server, proxy, websocket)
    assert client.counters["resent"] == 1  # a new connection: the outbox wrote it again


class _Record(logging.Handler):
    """Appends ``what`` to ``events`` for each record whose message contains ``needle``."""

    def __init__(self, events: list[str], needle: str, what: str) -> None:
        super().__init__(logging.WARNING)
        self.events, self.needle, self.what = events, needle, what

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.events.append(self.what)


async def test_half_open_link_is_declared_dead_by_the_heartbeat_then_resumed() -> None:
    interval, timeout = 0.2, 0.3
    srv = make_server(ServerConfig(heartbeat_interval=interval, heartbeat_timeout=timeout))
    await srv.start("127.0.0.1", 0)
    events: list[str] = []
    declared_dead = _Record(events, "declared dead", "declared dead")
    logging.getLogger("rtchat_sdk").addHandler(declared_dead)
    try:
        async with (
            Client(srv.url) as sender,
            FaultProxy(srv.port) as proxy,
            Client(proxy.url, reconnect=FAST, clock=time.monotonic) as client,  # read below too
        ):
            inbox = Inbox(client)
            await sender.join("r")
            await client.join("r")
            session = client.session_id
            lost_at: list[float] = []

            def on_state(state: ConnectionState) -> None:
                events.append(state.value)
                if state is ConnectionState.RECONNECTING:
                    lost_at.append(time.monotonic())

            client.on_state_change(on_state)
            heard_at = time.monotonic()
            await client.ping()  # the pong is a frame from the server heard after heard_at
            proxy.blackhole(True)  # TCP stays up: only the heartbeats can tell
            await sender.publish("r", "m", "during")  # lost in the blackhole
            await wait_state(client, ConnectionState.RECONNECTING)
            # Declared dead by the client's own heartbeat deadline (the server's
            # close frame is swallowed, its TCP still up), and not before that
            # deadline: interval + timeout of silence after the last frame heard.
            assert events == ["declared dead", "reconnecting"]
            assert lost_at[0] - heard_at >= interval + timeout
            proxy.end_blackhole()
            await wait_state(client, ConnectionState.CONNECTED)
            assert events == ["declared dead", "reconnecting", "connected"]
            await sender.publish("r", "m", "after")
            assert await inbox.settle(srv) == ["during", "after"]  # replayed, then live
            assert client.session_id == session  # resumed, not a new session
            assert await client.request("echo", "back") == "back"
    finally:
        logging.getLogger("rtchat_sdk").removeHandler(declared_dead)
        await srv.close()


async def test_trimmed_history_is_reported_as_a_gap() -> None:
    srv = make_server(ServerConfig(history_size=3))
    await srv.start("127.0.0.1", 0)
    try:
        async with (
            FaultProxy(srv.port) as proxy,
            Client(srv.url) as sender,
            Client(proxy.url, reconnect=FAST) as receiver,
        ):
            inbox = Inbox(receiver)
            gaps: list[GapReported] = []
            receiver.on_gap(gaps.append)
            await sender.join("r")
            await receiver.join("r")
            await take_offline(receiver, proxy)
            for i in range(10):
                await sender.publish("r", "m", i)
            proxy.refuse(False)
            await wait_state(receiver, ConnectionState.CONNECTED)
            assert await inbox.settle(srv) == [7, 8, 9]
            assert [(g.stream, g.reason, g.offset) for g in gaps] == [("room:/:r", "trimmed", 7)]
    finally:
        await srv.close()


async def test_server_restart_reports_lost_streams_and_replays_the_new_epoch() -> None:
    first = make_server()
    await first.start("127.0.0.1", 0)
    port = first.port
    gaps: list[GapReported] = []
    async with FaultProxy(port) as proxy, Client(proxy.url, reconnect=FAST) as client:
        client.on_gap(gaps.append)
        inbox = Inbox(client)
        await client.join("r")
        proxy.refuse(True)  # keep the client away until the new server has traffic
        await first.close()
        second = make_server()
        await second.start("127.0.0.1", port)
        try:
            async with Client(second.url) as other:
                await other.join("r")
                await other.publish("r", "m", "while you were away")
                proxy.refuse(False)
                await wait_reconnected(client)
                await other.publish("r", "m", "live")
                assert await inbox.settle(second) == ["while you were away", "live"]
            assert sorted((g.stream.split(":")[0], g.reason) for g in gaps) == [
                ("inbox", "session_unknown"),
                ("room", "epoch_changed"),
            ]
            room_gap = next(g for g in gaps if g.room == "r")
            assert room_gap.offset == 0  # replay covered the whole new epoch
        finally:
            await second.close()


class FakeClock:
    """The broker's clock, moved by hand to expire sessions without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_expired_session_rejoins_rooms_and_replays_from_history() -> None:
    clock = FakeClock()
    srv = Server(broker=MemoryBroker(clock=clock))
    await srv.start("127.0.0.1", 0)
    try:
        async with (
            FaultProxy(srv.port) as proxy,
            Client(srv.url) as sender,
            Client(proxy.url, reconnect=FAST) as receiver,
        ):
            gaps: list[GapReported] = []
            receiver.on_gap(gaps.append)
            inbox = Inbox(receiver)
            await sender.join("r")
            await receiver.join("r")
            await receiver.publish("r", "m", "mine")  # must not come back to it
            old_session = receiver.session_id
            await take_offline(receiver, proxy)
            await sender.publish("r", "m", 1)
            clock.now += srv.config.session_ttl  # the session expires in the broker
            proxy.refuse(False)
            await wait_reconnected(receiver)
            await sender.publish("r", "m", 2)
            assert await inbox.settle(srv) == [1, 2]
            assert receiver.session_id != old_session
            assert [(g.room, g.reason) for g in gaps] == [(None, "session_unknown")]
    finally:
        await srv.close()


async def test_room_refused_on_rejoin_is_reported() -> None:
    clock = FakeClock()
    srv = Server(broker=MemoryBroker(clock=clock))
    allowed = {"r": True}

    @srv.namespace("/").authorize_join
    def check(ctx: Context, room: str) -> bool:
        return allowed.get(room, False)

    await srv.start("127.0.0.1", 0)
    try:
        async with FaultProxy(srv.port) as proxy, Client(proxy.url, reconnect=FAST) as client:
            gaps: list[GapReported] = []
            client.on_gap(gaps.append)
            await client.join("r")
            await take_offline(client, proxy)
            allowed["r"] = False
            clock.now += srv.config.session_ttl
            proxy.refuse(False)
            await wait_reconnected(client)
            assert ("r", "not_rejoined") in [(g.room, g.reason) for g in gaps]
            with pytest.raises(RemoteError, match="not_in_room"):
                await client.publish("r", "m", 1)
    finally:
        await srv.close()


async def test_bad_credentials_are_fatal_and_not_retried() -> None:
    srv = Server(authenticate=lambda auth: "ann" if auth == {"password": "ok"} else None)
    await srv.start("127.0.0.1", 0)
    try:
        client = Client(srv.url, auth={"password": "wrong"}, retry_first_connect=True)
        with pytest.raises(Unauthorized):
            await client.connect()
        assert client.state is ConnectionState.CLOSED
        assert client.counters["reconnects"] == 0
        async with Client(srv.url, auth={"password": "ok"}) as good:
            assert good.state is ConnectionState.CONNECTED
    finally:
        await srv.close()


async def test_resume_token_is_bound_to_its_user() -> None:
    users = iter(["ann", "mallory"])
    srv = Server(authenticate=lambda auth: next(users))
    await srv.start("127.0.0.1", 0)
    try:
        async with FaultProxy(srv.port) as proxy, Client(proxy.url, reconnect=FAST) as client:
            first_session = client.session_id
            proxy.drop()
            await wait_reconnected(client)
            # The second connection authenticates as someone else: no resume.
            assert client.session_id != first_session
    finally:
        await srv.close()


async def test_next_url_is_tried_when_one_fails(server: Server) -> None:
    async with FaultProxy(server.port) as dead:
        dead.refuse(True)
        client = Client([dead.url, server.url], reconnect=FAST, retry_first_connect=True)
        async with client:
            assert await client.request("echo", 1) == 1


async def test_gives_up_after_max_attempts() -> None:
    async with FaultProxy(1) as dead:
        dead.refuse(True)
        policy = ReconnectPolicy(initial_delay=0.01, max_delay=0.02, max_attempts=3)
        client = Client(dead.url, reconnect=policy, retry_first_connect=True)
        with pytest.raises(GaveUp, match="3 attempt"):
            await client.connect()
        assert dead.stats.refused == 3


async def test_close_keeps_the_session_resumable_only_while_messages_are_unanswered(
    server: Server, proxy: FaultProxy
) -> None:
    async with Client(server.url) as done:
        finished = done.session_id
    assert finished not in server.session_ids()  # said goodbye with nothing pending

    client = Client(proxy.url, reconnect=FAST)
    await client.connect()
    pending_id = client.session_id
    proxy.blackhole(True)  # the emit below will get no answer
    pending = asyncio.ensure_future(client.emit("echo", 1))
    await asyncio.sleep(0)
    assert client.outbox_size == 1
    proxy.blackhole(False)
    await client.close()
    with pytest.raises(ClientClosed):
        await pending
    assert pending_id in server.session_ids()  # kept for a persistent outbox's next run


async def test_join_check_that_raises_during_a_restore_refuses_only_that_room() -> None:
    clock = FakeClock()
    srv = Server(broker=MemoryBroker(clock=clock))
    broken = {"on": False}

    @srv.namespace("/").authorize_join
    def check(ctx: Context, room: str) -> bool:
        if broken["on"] and room == "bad":
            raise RuntimeError("join check bug")
        return True

    await srv.start("127.0.0.1", 0)
    try:
        async with FaultProxy(srv.port) as proxy, Client(proxy.url, reconnect=FAST) as client:
            gaps: list[GapReported] = []
            client.on_gap(gaps.append)
            await client.join("bad")
            await client.join("good")
            await take_offline(client, proxy)
            broken["on"] = True
            clock.now += srv.config.session_ttl
            proxy.refuse(False)
            await wait_reconnected(client)
            await client.publish("good", "m", 1)
            assert [(g.room, g.reason) for g in gaps if g.room] == [("bad", "not_rejoined")]
    finally:
        await srv.close()


async def test_delivery_larger_than_the_frame_limit_is_refused_as_too_large() -> None:
    srv = make_server(ServerConfig(max_frame_bytes=1000))
    await srv.start("127.0.0.1", 0)
    try:
        async with Client(srv.url) as client:
            await client.join("r")
            with pytest.raises(RemoteError) as info:
                await client.publish("r", "m", "x" * 880)  # the frame fits, its delivery not
            assert info.value.code == "too_large"
            assert await client.publish("r", "m", "small") == 1  # nothing was numbered
    finally:
        await srv.close()


async def test_a_frame_over_the_clients_own_limit_is_fatal_not_a_loop() -> None:
    srv = make_server()
    await srv.start("127.0.0.1", 0)
    try:
        async with Client(srv.url) as sender:
            small = Client(srv.url, max_frame_bytes=2000, reconnect=FAST)
            await small.connect()
            closed = asyncio.Event()
            small.on_state_change(lambda s: closed.set() if s is ConnectionState.CLOSED else None)
            await small.join("r")
            await sender.join("r")
            await sender.publish("r", "m", "x" * 5000)
            await asyncio.wait_for(closed.wait(), 10)
            assert isinstance(small.closed_reason, FatalConnectionError)
            assert small.closed_reason.code == "message_too_big"
            assert small.counters["reconnects"] == 0
    finally:
        await srv.close()


async def test_overloaded_server_sends_clients_away_for_retry_after() -> None:
    srv = make_server(ServerConfig(max_connections=1, overload_retry_after=0.3))
    await srv.start("127.0.0.1", 0)
    try:
        first = Client(srv.url)
        await first.connect()
        loop = asyncio.get_running_loop()
        attempts: list[float] = []
        retried = asyncio.Event()

        def on_attempt(attempt: int, url: str) -> None:
            attempts.append(loop.time())
            if len(attempts) == 2:  # refused once, retried after the hint
                retried.set()

        second = Client(srv.url, reconnect=FAST, retry_first_connect=True)
        second.on_attempt(on_attempt)
        connecting = asyncio.ensure_future(second.connect())
        await asyncio.wait_for(retried.wait(), 10)
        assert attempts[1] - attempts[0] >= 0.3
        await first.close()
        await asyncio.wait_for(connecting, 10)
        assert await second.request("echo", "in") == "in"
        await second.close()
    finally:
        await srv.close()


async def test_own_publishes_of_a_lost_session_never_come_back_on_later_resumes() -> None:
    clock = FakeClock()
    srv = Server(broker=MemoryBroker(clock=clock))
    await srv.start("127.0.0.1", 0)
    try:
        async with (
            FaultProxy(srv.port) as proxy,
            Client(srv.url) as sender,
            Client(proxy.url, reconnect=FAST) as receiver,
        ):
            inbox = Inbox(receiver)
            await sender.join("r")
            await receiver.join("r")
            await receiver.publish("r", "m", "mine")
            for expire in (True, False):  # a lost session, then an ordinary resume
                await take_offline(receiver, proxy)
                if expire:
                    clock.now += srv.config.session_ttl
                proxy.refuse(False)
                await wait_reconnected(receiver)
            await sender.publish("r", "m", "theirs")
            # A replayed "mine" would arrive before the live "theirs" or the sentinel.
            assert await inbox.settle(srv) == ["theirs"]
    finally:
        await srv.close()

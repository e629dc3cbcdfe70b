"""Presence and history end to end (PROTOCOL §7.5, §7.6), on one node and on two.

Each scenario runs on two nodes sharing a broker: one ``MemoryBroker`` shared
in-process (``memory``), or a ``RedisBroker`` each on one Redis prefix
(``redis``); the one-node cases use the first node only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from rtchat_sdk import Client, Delivery, NotEnabled
from rtchat_sdk import protocol as p
from rtchat_sdk.backoff import ReconnectPolicy
from rtchat_sdk.errors import Forbidden
from rtchat_sdk.events import MemberJoined, MemberLeft
from server_ref import MemoryBroker, Server, ServerConfig
from server_ref.broker.base import Broker
from tests.faultproxy import FaultProxy
from tests.redis_support import cleanup, new_prefix, require_redis

pytestmark = pytest.mark.timeout(60)

FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.2)
Nodes = Callable[..., Awaitable[list[Server]]]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[Nodes]:
    """``await nodes(count, **config)``: started nodes sharing one broker, with presence
    and presence events on in ``/``; all closed at the end."""
    started: list[Server] = []
    url = prefix = ""
    if request.param == "redis":
        url, prefix = await require_redis(), new_prefix()

    async def start(count: int = 2, **config: Any) -> list[Server]:
        made = []
        size = config.get("history_size", 1_000)
        shared = MemoryBroker(history_size=size)  # the nodes' one in-process broker
        for _ in range(count):
            broker: Broker = shared
            if request.param == "redis":
                from server_ref.broker.redis import RedisBroker

                broker = RedisBroker(url, prefix=prefix, history_size=size)
            server = Server(ServerConfig(**config), broker=broker)
            server.namespace("/", presence=True, presence_events=True)
            server.namespace("/quiet")  # no presence
            await server.start("127.0.0.1", 0)
            started.append(server)
            made.append(server)
        return made

    try:
        yield start
    finally:
        for server in started:
            await server.close()
        if url:
            await cleanup(url, prefix)


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(url: str, user: str | None = None, **kwargs: Any) -> Client:
        kwargs.setdefault("reconnect", FAST)
        client = Client(url, auth={"user": user} if user else None, **kwargs)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            await client.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until ``check()`` holds, asking again every 50 ms; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 (broker state: no event to wait on)
            await asyncio.sleep(0.05)


def sessions_of(members: list[p.PresenceMember]) -> set[str]:
    return {m.session for m in members}


async def test_presence_follows_joins_leaves_and_goodbyes_across_nodes(
    nodes: Nodes, clients: Callable[..., Client]
) -> None:
    a, b = await nodes(2)
    alice, bob = clients(a.url, "alice"), clients(b.url, "bob")
    bob_again = clients(b.url, "bob")
    await alice.connect()
    await bob.connect()
    await bob_again.connect()
    await alice.join("lobby")
    await bob.join("lobby")
    members = await alice.presence("lobby")
    assert [m.session for m in members] == [alice.session_id, bob.session_id]  # oldest first
    assert [(m.user, m.client) for m in members] == [
        ("alice", "rtchat-python"),
        ("bob", "rtchat-python"),
    ]
    assert members[0].joined_at <= members[1].joined_at
    await bob_again.join("lobby")
    stats = await bob.presence_stats("lobby")
    assert (stats.sessions, stats.users) == (3, 2)
    assert await a.presence("/", "lobby") == await bob.presence("lobby")  # the server's view

    await bob.leave("lobby")
    assert sessions_of(await alice.presence("lobby")) == {alice.session_id, bob_again.session_id}
    await bob_again.close()  # a goodbye: out at once, no grace period
    assert sessions_of(await alice.presence("lobby")) == {alice.session_id}
    assert (await alice.presence_stats("lobby")).sessions == 1


async def test_join_and_leave_events_reach_the_others_in_stream_order(
    nodes: Nodes, clients: Callable[..., Client]
) -> None:
    a, b = await nodes(2)
    watcher, guest = clients(a.url, "watcher"), clients(b.url, "guest")
    seen: list[tuple[str, str | None, int]] = []
    done = asyncio.Event()

    @watcher.on("*")
    def record(data: Any, meta: Delivery) -> None:
        seen.append((meta.event, data.get("session") if isinstance(data, dict) else None, 0))
        if meta.event == "$leave":
            done.set()

    joined: list[MemberJoined] = []
    left: list[MemberLeft] = []
    watcher.on_join(lambda member, meta: joined.append(member))
    watcher.on_leave(lambda member, meta: left.append(member))
    own: list[str] = []
    guest.on("*")(lambda data, meta: own.append(meta.event))
    await watcher.connect()
    await guest.connect()
    await watcher.join("lobby")
    await guest.join("lobby")
    await guest.publish("lobby", "chat", {"text": "hi"})
    await guest.leave("lobby")
    await asyncio.wait_for(done.wait(), 10)
    assert [event for event, _, _ in seen] == ["$join", "chat", "$leave"]
    assert [m.session for m in joined] == [guest.session_id]
    assert joined[0].user == "guest"
    assert joined[0].joined_at > 0
    assert [(m.session, m.reason) for m in left] == [(guest.session_id, "left")]
    assert left[0].joined_at == joined[0].joined_at
    assert own == []  # never its own join or leave (the echo rule)


async def test_a_dropped_session_stays_present_through_a_resume_and_leaves_after_the_grace(
    nodes: Nodes, clients: Callable[..., Client]
) -> None:
    (a,) = await nodes(1, presence_grace=1.0)
    watcher = clients(a.url, "watcher")
    await watcher.connect()
    await watcher.join("lobby")
    async with FaultProxy(a.port) as proxy:
        flaky = clients(proxy.url, "flaky")
        await flaky.connect()
        await flaky.join("lobby")
        before = {m.session: m.joined_at for m in await watcher.presence("lobby")}
        assert flaky.session_id in before
        reconnected = asyncio.Event()
        flaky.on_state_change(lambda s: reconnected.set() if s.name == "CONNECTED" else None)
        proxy.drop()  # no goodbye: it may resume
        await asyncio.wait_for(reconnected.wait(), 10)
        after = {m.session: m.joined_at for m in await watcher.presence("lobby")}
        assert after == before  # kept its entry: the same session, the same joined_at
        left: list[MemberLeft] = []
        watcher.on_leave(lambda member, meta: left.append(member))
        proxy.refuse(True)
        proxy.drop()  # gone for good: out after the grace period

        async def gone() -> bool:
            return flaky.session_id not in sessions_of(await watcher.presence("lobby"))

        await eventually(gone)
        await eventually(lambda: _true(bool(left)))
        assert [(m.session, m.reason) for m in left] == [(flaky.session_id, "disconnected")]


async def _true(value: bool) -> bool:
    return value


async def test_presence_off_in_a_namespace_is_not_enabled(
    nodes: Nodes, clients: Callable[..., Client]
) -> None:
    (a,) = await nodes(1)
    client = clients(a.url)
    await client.connect()
    quiet = client.namespace("/quiet")
    await quiet.join("room")
    with pytest.raises(NotEnabled):
        await quiet.presence("room")
    with pytest.raises(NotEnabled):
        await quiet.presence_stats("room")
    assert (await quiet.history("room")).entries == []  # history needs no presence
    with pytest.raises(ValueError, match="keeps no presence"):
        await a.presence("/quiet", "room")


async def test_the_server_s_own_event_names_are_not_for_publishing(
    nodes: Nodes, clients: Callable[..., Client]
) -> None:
    (a,) = await nodes(1)
    client = clients(a.url)
    await client.connect()
    await client.join("lobby")
    with pytest.raises(Forbidden):
        await client.publish("lobby", "$join", {"session": "someone else"})
    with pytest.raises(ValueError, match="server's own"):
        await a.publish("lobby", "$leave")
    assert (await client.history("lobby")).offset == 1  # its own $join only


async def test_history_pages_forward_reverse_trimmed_and_from_another_epoch(
    nodes: Nodes, clients: Callable[..., Client]
) -> None:
    (a,) = await nodes(1, history_size=5)
    client = clients(a.url)
    await client.connect()
    await client.namespace("/quiet").join("r")
    quiet = client.namespace("/quiet")
    for n in range(1, 9):
        await quiet.publish("r", "n", n)
    newest = await quiet.history("r")
    assert (newest.offset, newest.gap, newest.more) == (8, None, False)
    assert [e.data for e in newest.entries] == [4, 5, 6, 7, 8]  # the 5 kept
    assert [e.offset for e in newest.entries] == [4, 5, 6, 7, 8]
    last2 = await quiet.history("r", limit=2, reverse=True)
    assert ([e.data for e in last2.entries], last2.more) == ([8, 7], True)
    older = await quiet.history("r", since=p.Since(epoch=last2.epoch, offset=7), reverse=True)
    assert [e.data for e in older.entries] == [6, 5, 4]
    assert older.gap == "trimmed"  # 1 to 3 existed, and are gone
    since2 = await quiet.history("r", since=p.Since(epoch=newest.epoch, offset=2), limit=2)
    assert (since2.gap, since2.trimmed, [e.data for e in since2.entries]) == (
        "trimmed",
        True,
        [4, 5],
    )
    assert since2.more
    after6 = await quiet.history("r", since=p.Since(epoch=newest.epoch, offset=6))
    assert ([e.data for e in after6.entries], after6.gap, after6.more) == ([7, 8], None, False)
    other = await quiet.history("r", since=p.Since(epoch="gone", offset=3), limit=1)
    assert (other.gap, [e.data for e in other.entries]) == ("epoch_changed", [4])
    server_view = await a.history("/quiet", "r", limit=2, reverse=True)
    assert server_view.entries == last2.entries
    with pytest.raises(ValueError, match="limit must be"):
        await quiet.history("r", limit=0)


async def test_history_reply_is_cut_to_the_frame_size_and_says_more(
    nodes: Nodes, clients: Callable[..., Client]
) -> None:
    (a,) = await nodes(1, max_frame_bytes=4096)
    client = clients(a.url, max_frame_bytes=4096)
    await client.connect()
    quiet = client.namespace("/quiet")
    await quiet.join("r")
    for n in range(10):
        await quiet.publish("r", "big", "x" * 1000 + str(n))
    page = await quiet.history("r", limit=10)
    assert 1 <= len(page.entries) < 10
    assert page.more
    assert [e.offset for e in page.entries] == list(range(1, len(page.entries) + 1))


async def test_history_then_live_misses_nothing_and_repeats_nothing_under_publishing(
    nodes: Nodes, clients: Callable[..., Client]
) -> None:
    a, b = await nodes(2)
    publisher, reader = clients(a.url), clients(b.url)
    await publisher.connect()
    await reader.connect()
    quiet_pub = publisher.namespace("/quiet")
    await quiet_pub.join("feed")
    total = 300
    for n in range(1, 61):
        await quiet_pub.publish("feed", "n", n)
    live: list[int] = []
    finished = asyncio.Event()
    quiet_read = reader.namespace("/quiet")

    @quiet_read.on("n")
    def got(n: int) -> None:
        live.append(n)
        if n == total:
            finished.set()

    async def keep_publishing() -> None:
        for n in range(61, total + 1):
            await quiet_pub.publish("feed", "n", n)

    publishing = asyncio.create_task(keep_publishing())
    try:
        page = await quiet_read.history("feed", limit=50, reverse=True)
        await quiet_read.join("feed", since=page.position)
        await asyncio.wait_for(finished.wait(), 20)
    finally:
        await publishing
    shown = [e.data for e in reversed(page.entries)]
    assert shown == list(range(page.offset - 49, page.offset + 1))
    assert shown + live == list(range(page.offset - 49, total + 1))  # nothing missed or twice


@pytest.mark.redis
async def test_the_members_of_a_killed_node_are_gone_within_the_presence_ttl(
    clients: Callable[..., Client],
) -> None:
    """A node SIGKILLed leaves no ghost: nobody renews its entries, they expire at the TTL."""
    from server_ref.broker.redis import RedisBroker
    from tests.test_server_cli import spawn_server

    url, prefix = await require_redis(), new_prefix()
    ttl = 1.5
    doomed = await spawn_server(
        "--redis", url, "--redis-prefix", prefix, "--presence", "--presence-ttl", str(ttl)
    )
    observer = Server(ServerConfig(presence_ttl=ttl), broker=RedisBroker(url, prefix=prefix))
    observer.namespace("/", presence=True)
    await observer.start("127.0.0.1", 0)
    try:
        stays = clients(observer.url, "stays")
        await stays.connect()
        await stays.join("lobby")
        victim = clients(f"ws://127.0.0.1:{doomed.port}", "victim", reconnect=False)
        await victim.connect()
        await victim.join("lobby")
        members = await observer.presence("/", "lobby")
        assert [m.user for m in members] == ["stays", "victim"]
        # Renewed by its node while it lives: still there after more than one TTL.
        await asyncio.sleep(ttl * 1.5)  # a span of time under test, not a wait for luck
        assert [m.user for m in await observer.presence("/", "lobby")] == ["stays", "victim"]
        doomed.proc.kill()  # SIGKILL: no goodbye, no cleanup
        await doomed.kill()
        killed_at = asyncio.get_running_loop().time()

        async def only_survivor() -> bool:
            return [m.user for m in await observer.presence("/", "lobby")] == ["stays"]

        await eventually(only_survivor, timeout=ttl + 5)
        assert asyncio.get_running_loop().time() - killed_at <= ttl + 5
        stats = await observer.presence_stats("/", "lobby")
        assert (stats.sessions, stats.users) == (1, 1)
    finally:
        await doomed.kill()
        await observer.close()
        await cleanup(url, prefix)

"""Redis trouble under traffic: a killed pub/sub connection, a wedged one, Redis itself gone.

Each test runs its own ``redis-server`` (``OwnRedis``), never the shared one.
Nodes are in-process ``Server``s, each with its own ``RedisBroker`` and fast
probes, so a wedge is noticed within a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from rtchat_sdk import Client, GapReported, ReconnectPolicy
from server_ref import Server
from server_ref.broker import Draft, StreamEntry
from server_ref.broker.redis import RedisBroker
from tests.faultproxy import FaultProxy
from tests.helpers import Inbox, free_port, http_get
from tests.redis_support import OwnRedis

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

PROBES = {"probe_interval": 0.1, "probe_timeout": 0.5}


@pytest.fixture
async def own_redis() -> AsyncIterator[OwnRedis]:
    redis = OwnRedis(free_port())
    await redis.start()
    try:
        yield redis
    finally:
        await redis.stop()


async def start_node(url: str) -> Server:
    server = Server(broker=RedisBroker(url, **PROBES))  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    return server


def relay(server: Server) -> Any:
    broker = server.broker
    assert isinstance(broker, RedisBroker)
    return broker._relay


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a state the server reaches on its own timers (probes, reconnects)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 (server state with no event to await)
            await asyncio.sleep(0.02)


async def test_a_killed_pubsub_connection_loses_nothing_and_reports_not_ready_meanwhile(
    own_redis: OwnRedis,
) -> None:
    node_a, node_b = await start_node(own_redis.url), await start_node(own_redis.url)
    admin = Redis.from_url(own_redis.url)
    try:
        async with Client(node_a.url) as client:
            received = Inbox(client)
            await client.join("r")
            total = 600
            for i in range(total):
                await node_b.publish("r", "m", i)
                if i == total // 3:
                    killed = await admin.client_kill_filter(_type="pubsub")  # CLIENT KILL TYPE
                    assert killed >= 2  # both nodes' subscriptions
            assert await received.wait_for(total) == list(range(total))
            await until(lambda: node_a.not_ready() is None)
        reasons = [reason for _, reason in relay(node_a).history]
        assert relay(node_a).reconnects >= 1
        assert any(r is not None and "lost" in r for r in reasons), reasons
        assert reasons[-1] is None
    finally:
        await admin.aclose()
        await node_a.close()
        await node_b.close()


async def test_a_wedged_pubsub_is_noticed_reported_and_healed_without_loss(
    own_redis: OwnRedis,
) -> None:
    proxy = FaultProxy(own_redis.port)
    await proxy.start()
    node_a = await start_node(f"redis://127.0.0.1:{proxy.port}/0")
    node_b = await start_node(own_redis.url)
    try:
        async with Client(node_a.url) as client:
            received = Inbox(client)
            await client.join("r")
            await node_b.publish("r", "m", 0)
            await received.wait_for(1)
            proxy.blackhole(True)  # TCP stays up; nothing passes: a wedged link
            for i in range(1, 51):
                await node_b.publish("r", "m", i)
            await until(lambda: node_a.not_ready() is not None)
            status, body = await http_get(node_a.url, "/readyz")
            assert status == 503
            assert any(word in body["reason"] for word in ("probe", "lost", "unavailable")), body
            assert await http_get(node_a.url, "/healthz") == (200, {"status": "live"})
            proxy.end_blackhole()
            await until(lambda: node_a.not_ready() is None)
            assert await http_get(node_a.url, "/readyz") == (200, {"status": "ready"})
            assert await received.wait_for(51) == list(range(51))
    finally:
        await node_a.close()
        await node_b.close()
        await proxy.close()


async def test_redis_killed_and_restarted_empty_loses_no_acked_publish_silently(
    own_redis: OwnRedis,
) -> None:
    """Redis dies for 3 s under traffic and comes back without its data (a new epoch).

    Every publish ends (acknowledged, or with an error) within its timeout;
    every acknowledged publish is handled by the other client or lies behind
    a gap it was told of; the nodes report not ready meanwhile, then recover.
    """
    node_a, node_b = await start_node(own_redis.url), await start_node(own_redis.url)
    fast = ReconnectPolicy(initial_delay=0.05, max_delay=0.5)
    clients = {
        name: Client(node.url, reconnect=fast, request_timeout=20.0, connect_timeout=2.0)
        for name, node in (("ann", node_a), ("bob", node_b))
    }
    handled: dict[str, list[tuple[str, int]]] = {name: [] for name in clients}
    gaps: dict[str, list[GapReported]] = {name: [] for name in clients}
    acked: dict[str, set[int]] = {name: set() for name in clients}
    failed: dict[str, list[BaseException]] = {name: [] for name in clients}
    total, window = 150, 5
    try:

        def recorder(name: str) -> Callable[[dict[str, Any]], None]:
            return lambda data: handled[name].append((data["from"], data["n"]))

        for name, client in clients.items():
            client.on("m")(recorder(name))
            client.on_gap(gaps[name].append)
            await client.connect()
            await client.join("r")

        async def publish_all(name: str) -> None:
            free = asyncio.Semaphore(window)

            async def one(n: int) -> None:
                try:
                    await clients[name].publish("r", "m", {"from": name, "n": n})
                    acked[name].add(n)
                except Exception as exc:  # an error is an answer too: never a hang
                    failed[name].append(exc)
                finally:
                    free.release()

            tasks = []
            for n in range(total):
                await free.acquire()
                tasks.append(asyncio.ensure_future(one(n)))
            await asyncio.gather(*tasks)

        traffic = asyncio.gather(*(publish_all(name) for name in clients))
        await until(lambda: min(len(a) for a in acked.values()) >= total // 3)
        await own_redis.stop()
        await until(lambda: node_a.not_ready() is not None and node_b.not_ready() is not None)
        await asyncio.sleep(3)  # the outage itself
        await own_redis.start()
        async with asyncio.timeout(40):
            await traffic  # every publish ended: none hangs past its timeout
        await until(lambda: node_a.not_ready() is None and node_b.not_ready() is None)
        # Everything acknowledged after the restart reaches the other side.
        for name, client in clients.items():
            await client.publish("r", "m", {"from": name, "n": -1})
        await until(lambda: ("bob", -1) in handled["ann"] and ("ann", -1) in handled["bob"])
    finally:
        for client in clients.values():
            await client.close()
        await node_a.close()
        await node_b.close()

    for name in clients:
        other = next(o for o in clients if o != name)
        got = [n for sender, n in handled[name] if sender == other and n >= 0]
        missing = acked[other] - set(got)
        room_gaps = [g for g in gaps[name] if g.stream == "room:/:r"]
        if missing:  # lost with Redis's data: only behind a gap the client was told of
            assert room_gaps, f"{name} silently missed {sorted(missing)}"
        assert {g.reason for g in room_gaps} <= {"epoch_changed", "session_unknown", "trimmed"}
        assert len(got) == len(set(got)) or room_gaps, f"{name} handled duplicates silently"
    # Resent from the outbox once Redis was back: all acknowledged, none failed.
    assert failed == {name: [] for name in clients}
    assert all(len(a) == total for a in acked.values())


async def test_a_stream_found_behind_what_was_relayed_starts_a_new_epoch(
    own_redis: OwnRedis,
) -> None:
    """Redis failed over to a replica that lacked the newest entries: offsets 4 and 5
    would be numbered again. The node notices on reconnecting and starts a new epoch,
    so its listener gets the next entry, as a new epoch, instead of dropping it."""
    broker = RedisBroker(own_redis.url, **PROBES)  # type: ignore[arg-type]
    await broker.start()
    admin = Redis.from_url(own_redis.url, decode_responses=True)
    try:
        seen: list[StreamEntry] = []
        got = asyncio.Event()

        def listener(entry: StreamEntry) -> None:
            seen.append(entry)
            got.set()

        await broker.subscribe("a", listener)
        draft = Draft.message(
            "a", ns="/", room="a", event="m", data=1, sender=None, echo=False, max_bytes=1 << 16
        )
        for _ in range(5):
            await broker.append("a", draft)
        await until(lambda: len(seen) == 5)
        meta, log = broker._stream_keys("a")
        await admin.hset(meta, "offset", 3)  # what the lagging replica had
        await admin.xdel(log, "4-0", "5-0")
        assert await admin.client_kill_filter(_type="pubsub") >= 1
        await until(lambda: broker._relay is not None and broker._relay.reconnects >= 1)
        entry = await broker.append("a", draft)
        await until(lambda: len(seen) == 6)
        assert (seen[-1].epoch, seen[-1].offset) == (entry.epoch, 1)
        assert entry.epoch != seen[0].epoch
    finally:
        await admin.aclose()
        await broker.close()

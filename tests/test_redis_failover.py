"""Two ``rtchat-server`` processes on one Redis: they behave as one server.

Clients on each node exchange 2,000 messages each. Then one node is
SIGKILLed mid-traffic: its clients were given both URLs, fail over to the
other node and resume their sessions there (sessions, positions and dedupe
records live in Redis), so nothing is lost, nothing is handled twice, no gap
is reported. The killed node is then restarted and serves again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from rtchat_sdk import Client, Delivery, GapReported, ReconnectPolicy
from tests.helpers import free_port
from tests.redis_support import cleanup, exchange, new_prefix, require_redis
from tests.test_server_kill import ServerProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90)]

TOTAL = 200
"""Messages each client publishes."""
BEFORE_KILL = 60
WINDOW = 10
FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.3)


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[IO[bytes]]:
    with open(tmp_path / "servers.log", "wb") as log:
        yield log


class Peer:
    def __init__(self, name: str, urls: list[str]) -> None:
        self.name = name
        self.client = Client(urls, reconnect=FAST, connect_timeout=2.0, request_timeout=30.0)
        self.handled: list[tuple[str, int, int]] = []
        """(sender, seq, offset) of each delivery handled, in order."""
        self.gaps: list[GapReported] = []
        self.acked = 0
        self.changed = asyncio.Event()
        self.client.on("m")(self._on)
        self.client.on_gap(self.gaps.append)

    def _on(self, data: dict[str, Any], meta: Delivery) -> None:
        self.handled.append((data["from"], data["seq"], meta.offset))
        self.changed.set()

    async def until(self, done: Any) -> None:
        while not done():
            self.changed.clear()
            await self.changed.wait()

    async def publish_all(self) -> None:
        free = asyncio.Semaphore(WINDOW)

        async def one(seq: int) -> None:
            try:
                await self.client.publish("r", "m", {"from": self.name, "seq": seq})
                self.acked += 1
                self.changed.set()
            finally:
                free.release()

        tasks = []
        for seq in range(TOTAL):
            await free.acquire()
            tasks.append(asyncio.ensure_future(one(seq)))
        await asyncio.gather(*tasks)


async def test_a_node_killed_mid_traffic_its_clients_resume_on_the_other_losing_nothing(
    server_log: IO[bytes],
) -> None:
    url = await require_redis()
    prefix = new_prefix()
    flags = ("--redis", url, "--redis-prefix", prefix, "--heartbeat-interval", "1")
    node_a = ServerProcess(free_port(), server_log, *flags)
    node_b = ServerProcess(free_port(), server_log, *flags)
    peers = [
        Peer("ann", [node_a.url, node_b.url]),
        Peer("cat", [node_a.url, node_b.url]),
        Peer("bob", [node_b.url, node_a.url]),
    ]
    late: Client | None = None
    try:
        await node_a.start()
        await node_b.start()
        for peer in peers:
            await peer.client.connect()
            await peer.client.join("r")
        sessions = {peer.name: peer.client.session_id for peer in peers}
        traffic = asyncio.gather(*(peer.publish_all() for peer in peers))
        async with asyncio.timeout(30):
            for peer in peers:
                await peer.until(lambda peer=peer: peer.acked >= BEFORE_KILL)
        await node_a.kill()  # SIGKILL: no goodbye, in-flight messages unanswered
        async with asyncio.timeout(60):
            await traffic
            for peer in peers:
                others = 2 * TOTAL
                await peer.until(lambda peer=peer, n=others: len(peer.handled) >= n)
        # The killed node comes back and serves the same room.
        await node_a.start()
        late = Client(node_a.url)
        await late.connect()
        await late.join("r")
        got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        @late.on("m")
        def first(data: Any) -> None:
            if not got.done():
                got.set_result(data)

        await peers[2].client.publish("r", "m", {"from": "bob", "seq": TOTAL})
        assert await asyncio.wait_for(got, 10) == {"from": "bob", "seq": TOTAL}
    finally:
        if late is not None:
            await late.close()
        for peer in peers:
            await peer.client.close()
        await node_a.kill()
        await node_b.kill()
        await cleanup(url, prefix)

    for peer in peers[:2]:  # node A's clients moved to node B
        assert peer.client.counters["reconnects"] >= 1, peer.client.counters
    for peer in peers:
        assert peer.client.session_id == sessions[peer.name], f"{peer.name} did not resume"
        assert peer.gaps == [], f"{peer.name} was told of gaps: {peer.gaps}"
        expected = {(o.name, seq) for o in peers if o is not peer for seq in range(TOTAL)}
        pairs = [(sender, seq) for sender, seq, _ in peer.handled if seq < TOTAL]
        assert len(pairs) == len(set(pairs)), f"{peer.name} handled a message twice"
        assert set(pairs) == expected, f"{peer.name} missed {sorted(expected - set(pairs))[:5]}"
        offsets = [offset for _, seq, offset in peer.handled if seq < TOTAL]
        assert offsets == sorted(offsets), f"{peer.name} handled out of order"


async def test_clients_on_two_node_processes_exchange_2000_messages_each_once_in_order(
    server_log: IO[bytes],
) -> None:
    url = await require_redis()
    prefix = new_prefix()
    flags = ("--redis", url, "--redis-prefix", prefix)
    node_a = ServerProcess(free_port(), server_log, *flags)
    node_b = ServerProcess(free_port(), server_log, *flags)
    try:
        await node_a.start()
        await node_b.start()
        async with Client(node_a.url) as alice, Client(node_b.url) as bob:
            await exchange(alice, bob, 2_000, timeout=60)
    finally:
        await node_a.kill()
        await node_b.kill()
        await cleanup(url, prefix)

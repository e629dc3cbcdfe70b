"""HTTP long polling across nodes with no sticky sessions (PROTOCOL.md §1.1).

Two nodes share one Redis (a key prefix of the test's own); each is a
``Server`` with its own ``RedisBroker``, served by the ASGI app under uvicorn
(real HTTP). In front of them, ``tests.poll_balancer``: a real HTTP balancer
that sends each request to the next node in turn (per request, not per TCP
connection), so every other request of a client lands on the node that does
not hold its polling connection and is forwarded to the one that does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from rtchat_sdk import Client, ReconnectPolicy
from server_ref import Context, Server, ServerConfig
from server_ref.asgi import RtchatApp, create_app
from server_ref.broker.redis import RedisBroker
from tests.helpers import free_port
from tests.poll_balancer import Balancer
from tests.redis_support import Collected, cleanup, exchange, new_prefix, require_redis
from tests.test_asgi import serving
from tests.test_server_kill import ServerProcess

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

HELLO = {"type": "hello", "protocol": 1}
PING = {"type": "ping"}
FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.3)
CONFIG = ServerConfig(poll_timeout=1.0)


@dataclass
class Node:
    server: Server
    broker: RedisBroker
    app: RtchatApp
    url: str
    """http://127.0.0.1:<port>"""
    bumps: list[int]
    """What its ``bump`` handler answered: one entry per run."""

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://")

    def owns(self, sid: str) -> bool:
        return sid.startswith(self.server.node + ".")


@dataclass
class Cluster:
    nodes: list[Node]
    lb: Balancer
    url: str
    """The balancer's http:// URL."""

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://")

    def owner(self, sid: str) -> Node:
        return next(node for node in self.nodes if node.owns(sid))

    def other(self, node: Node) -> Node:
        return next(n for n in self.nodes if n is not node)

    def polling_owner(self) -> Node:
        """The one node holding a polling connection."""
        (node,) = [n for n in self.nodes if n.app.polling.connections]
        return node


def node(url: str, prefix: str, **limits: Any) -> Node:
    broker = RedisBroker(url, prefix=prefix, **limits)
    server = Server(CONFIG, broker=broker)
    bumps: list[int] = []

    @server.on("echo")
    def echo(ctx: Context, data: Any) -> Any:
        return data

    @server.on("bump")
    def bump(ctx: Context) -> int:
        bumps.append(len(bumps) + 1)
        return bumps[-1]

    return Node(server, broker, create_app(server), "", bumps)


@contextlib.asynccontextmanager
async def cluster(**limits: Any) -> AsyncIterator[Cluster]:
    """Two nodes on one Redis prefix behind the round-robin balancer."""
    url = await require_redis()
    prefix = new_prefix()
    try:
        async with contextlib.AsyncExitStack() as stack:
            nodes = [node(url, prefix, **limits) for _ in range(2)]
            for n in nodes:
                n.url = await stack.enter_async_context(serving(n.app))
            lb = await stack.enter_async_context(Balancer([node.url for node in nodes]))
            yield Cluster(nodes, lb, await stack.enter_async_context(serving(lb)))
    finally:
        await cleanup(url, prefix)


def polling(c: Cluster) -> Client:
    """A Python client polling through the balancer."""
    return Client(c.ws, transports=("polling",), reconnect=FAST)


class RawPoller:
    """A polling connection driven by hand through one base URL, per PROTOCOL.md §1.1."""

    def __init__(self, http: httpx.AsyncClient, sid: str) -> None:
        self.http = http
        self.sid = sid
        self.ack = 0

    async def get(self, base: str, ack: int | None = None) -> httpx.Response:
        params = {"sid": self.sid, "ack": str(self.ack if ack is None else ack)}
        return await self.http.get(f"{base}/poll", params=params)

    async def poll(self, base: str, ack: int | None = None) -> dict[str, Any]:
        response = await self.get(base, ack)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        self.ack = answer["cursor"]
        return answer

    async def post(self, base: str, *frames: dict[str, Any]) -> httpx.Response:
        return await self.http.post(
            f"{base}/poll", params={"sid": self.sid}, content=json.dumps(list(frames))
        )


async def open_raw(http: httpx.AsyncClient, base: str) -> RawPoller:
    response = await http.post(f"{base}/poll", content=json.dumps([HELLO]))
    assert response.status_code == 200, response.text
    return RawPoller(http, response.json()["sid"])


async def until_held(app: RtchatApp, sid: str) -> None:
    async with asyncio.timeout(5):
        while not app.polling.connections[sid].holding:  # noqa: ASYNC110 (no event to await)
            await asyncio.sleep(0.005)


def dropping_answers(node: Node, carries: Callable[[str], bool]) -> asyncio.Event:
    """Lose, in Redis, the first answer ``node`` sends another node that ``carries``
    (the publish is made to look done, as pub/sub loses a message); set once lost."""
    redis = node.broker.redis
    publish = redis.publish
    lost = asyncio.Event()

    async def lossy(channel: str, message: str) -> int:
        if not lost.is_set() and ":answer:" in channel and carries(message):
            lost.set()
            return 1
        result: int = await publish(channel, message)
        return result

    redis.publish = lossy  # type: ignore[method-assign,assignment]
    return lost


# ----------------------------------------------------------------------


async def test_raw_requests_per_the_protocol_may_land_on_either_node() -> None:
    async with cluster() as c, httpx.AsyncClient(timeout=10) as http:
        a, b = c.nodes
        conn = await open_raw(http, a.url)
        assert a.owns(conn.sid)
        assert len(conn.sid.split(".", 1)[1]) >= 22  # ≥128 random bits (6 a character)
        welcome = await conn.poll(b.url)  # forwarded to a
        assert [f["type"] for f in welcome["frames"]] == ["welcome"]
        response = await conn.post(b.url, {"type": "request", "id": 1, "event": "echo", "data": 7})
        assert (response.status_code, response.json()) == (200, {"ok": True})
        first = await conn.poll(b.url)
        assert [(f["type"], f.get("data")) for f in first["frames"]] == [("reply", 7)]
        # Its answer lost: the same batch again, from either node, unchanged.
        assert await conn.poll(a.url, ack=first["cursor"] - 1) == first
        assert await conn.poll(b.url, ack=first["cursor"] - 1) == first
        # A held poll forwarded, woken by a frame posted through the other node.
        held = asyncio.ensure_future(conn.poll(b.url))
        await until_held(a.app, conn.sid)
        await conn.post(a.url, {"type": "request", "id": 2, "event": "echo", "data": 8})
        assert [f.get("data") for f in (await held)["frames"]] == [8]
        assert (await conn.get(b.url, ack=-5)).status_code == 400  # a's answer, carried
        response = await http.delete(f"{b.url}/poll", params={"sid": conn.sid})
        assert (response.status_code, response.json()) == (200, {"ok": True})
        for base in (a.url, b.url):
            gone = await conn.get(base)
            assert (gone.status_code, gone.json()) == (404, {"error": "unknown_session"})
        nobody = RawPoller(http, "0123456789abcdef.unknown")
        assert (await nobody.get(b.url)).status_code == 404  # no node serves it: at once


async def test_a_polling_client_behind_the_balancer_gets_everything_once_in_order() -> None:
    async with cluster() as c, polling(c) as alice:
        assert await alice.request("echo", {"n": 1}, timeout=5) == {"n": 1}
        owner = c.polling_owner()
        async with Client(c.other(owner).ws) as bob:  # WebSocket, on the other node
            await exchange(alice, bob, 300)
        (sid,) = owner.app.polling.connections
        hops = [hop for hop in c.lb.hops.items if hop.sid == sid]
        assert {hop.backend for hop in hops} == {0, 1}  # both nodes took its requests
        assert {hop.status for hop in hops} == {200}
        assert alice.counters["reconnects"] == 0


@pytest.mark.parametrize("lost", ["poll", "post"])
async def test_a_forwarded_answer_lost_in_redis_is_asked_again_and_nothing_is_lost(
    lost: str,
) -> None:
    async with cluster() as c:
        for node in c.nodes:  # a lost answer is given up on soon
            node.app.polling.nodes.margin = node.app.polling.nodes.timeout = 0.5
        async with polling(c) as alice:
            await alice.request("echo", None, timeout=5)
            owner = c.polling_owner()
            if lost == "poll":
                gone = dropping_answers(owner, lambda message: '"frames":[{' in message)
            else:
                gone = dropping_answers(owner, lambda message: '{"ok": true}' in message)
            async with Client(c.other(owner).ws) as bob:
                await exchange(alice, bob, 100)
                replies = [await alice.request("bump", timeout=10) for _ in range(3)]
                async with asyncio.timeout(20):
                    while not gone.is_set():  # until a forwarded request's answer was lost
                        replies.append(await alice.request("bump", timeout=10))
                    replies.append(await alice.request("bump", timeout=10))
                await exchange(alice, bob, 100)
            bumps = owner.bumps + c.other(owner).bumps
            assert replies == list(range(1, len(replies) + 1)) == bumps  # each ran once
            (sid,) = owner.app.polling.connections
            assert 504 in c.lb.statuses(sid)  # the forwarding node gave up, the client asked again
            assert alice.counters["reconnects"] == 0


async def test_forwarded_requests_in_flight_are_bounded_by_max_calls() -> None:
    async with cluster(max_calls=1) as c, httpx.AsyncClient(timeout=10) as http:
        a, b = c.nodes
        conn = await open_raw(http, a.url)
        other = await open_raw(http, a.url)
        await conn.poll(a.url)  # the welcome
        held = asyncio.ensure_future(conn.poll(b.url))  # b's one call in flight, held on a
        await until_held(a.app, conn.sid)
        for refused in (await conn.post(b.url, PING), await other.get(b.url)):
            assert (refused.status_code, refused.json()) == (503, {"error": "overloaded"})
        assert a.bumps == []
        local = await conn.post(a.url, {"type": "request", "id": 1, "event": "bump"})
        assert local.status_code == 200  # a's own requests are not calls
        assert [f.get("data") for f in (await held)["frames"]] == [1]
        accepted = await conn.post(b.url, {"type": "request", "id": 2, "event": "bump"})
        assert (accepted.status_code, accepted.json()) == (200, {"ok": True})
        assert a.bumps == [1, 2]


async def test_a_client_keeps_everything_with_one_forward_in_flight_per_node() -> None:
    """At the limit, the refused requests (503) are asked again, and nothing is lost."""
    async with cluster(max_calls=1) as c, polling(c) as alice:
        await alice.request("echo", None, timeout=5)
        async with Client(c.other(c.polling_owner()).ws) as bob:
            await exchange(alice, bob, 200)
        assert alice.counters["reconnects"] == 0


@pytest.fixture
def nodes_log(tmp_path: Path) -> Iterator[IO[bytes]]:
    """Where the node processes write their stderr (kept with the test's tmp_path)."""
    with open(tmp_path / "nodes.log", "wb") as log:
        yield log


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_the_owner_killed_the_client_resumes_on_the_other_node_without_loss(
    nodes_log: IO[bytes],
) -> None:
    """Two ``rtchat-server --asgi --redis`` processes; the one holding the polling
    connection is SIGKILLed mid-traffic. The other node finds no one serving the dead
    one's calls (404 at once), the client opens a polling connection there and resumes."""
    url = await require_redis()
    prefix = new_prefix()
    ports = [free_port(), free_port()]
    args = ("--asgi", "--redis", url, "--redis-prefix", prefix, "--poll-timeout", "1")
    procs = [ServerProcess(port, nodes_log, *args) for port in ports]
    try:
        for proc in procs:
            await proc.start()
        backends = [f"http://127.0.0.1:{port}" for port in ports]
        async with (
            Balancer(backends) as lb,
            serving(lb) as lb_url,
            Client(
                lb_url.replace("http://", "ws://"), transports=("polling",), reconnect=FAST
            ) as alice,
        ):
            await alice.request("echo", None, timeout=5)
            (opened,) = [h for h in lb.hops.items if h.method == "POST" and not h.sid]
            survivor = procs[1 - opened.backend]
            async with Client(survivor.url) as bob:
                got_alice: Collected[int] = Collected()
                got_bob: Collected[int] = Collected()
                alice.on("m")(got_alice)
                bob.on("m")(got_bob)
                await alice.join("r")
                await bob.join("r")
                for i in range(50):
                    await bob.publish("r", "m", i)
                await got_alice.until(lambda items: len(items) == 50, timeout=10)
                await procs[opened.backend].kill()
                await asyncio.gather(
                    *(bob.publish("r", "m", i) for i in range(50, 100)),
                    *(alice.publish("r", "m", 1000 + i) for i in range(50)),
                )
                await got_alice.until(lambda items: len(items) == 100, timeout=30)
                await got_bob.until(lambda items: len(items) == 50, timeout=30)
            assert got_alice.items == list(range(100))
            assert got_bob.items == [1000 + i for i in range(50)]
            assert alice.counters["reconnects"] >= 1
            assert alice.counters["gaps"] == 0
            assert 404 in [hop.status for hop in lb.hops.items if hop.sid]
    finally:
        for proc in procs:
            await proc.kill()
        await cleanup(url, prefix)

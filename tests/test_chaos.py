"""The chaos test: heavy traffic through fault-injecting proxies, then an audit.

Three clients, each behind its own ``FaultProxy``, join one room. Each
publishes ``MESSAGES`` numbered messages and makes ``REQUESTS`` requests to a
server handler that counts its calls, all concurrently, while a fault
injector driven by ``random.Random(SEED)`` drops links, blackholes them
until the heartbeats notice, slows them down, and cuts them in the middle of
a frame. At the end every delivery guarantee is audited:

* every client handled every other client's messages exactly once, in each
  sender's order, and never its own (echo is off), with no gap reported;
* every request got exactly one reply, the right one, and the server ran the
  handler exactly once per request.

The publishes are a steady stream over ``TRAFFIC_SECONDS`` that does not
wait for the faults (only the last one waits until ``MIN_FAULTS`` have been
injected), so a client that comes back has a long replay to take in while
live messages keep arriving, and its resent publishes interleave with the
others' live ones. The server's sockets and the proxies' links get small
buffers, as over a real network, so such a replay has to wait in the server's
write buffer while live messages arrive (loopback's megabytes of buffer space
would swallow it whole, and hide any ordering race there).

One proxy per client (rather than one shared proxy) lets a fault hit one
client while the others carry on, so the server has to replay to one member
what the others got live, and resent publishes from one client interleave
with live traffic from the others. Some faults hit every proxy at once.
Faults are dealt in shuffled rounds of every (kind, client) pair, so every
client is blackholed, dropped and cut while traffic runs, whatever the seed;
the audit checks that each one did lose links and resend what it held.

The seed is ``SEED`` unless ``RTCHAT_CHAOS_SEED`` is set; it is printed with
the summary and on failure, so a failing run can be replayed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from rtchat_sdk import Client, ConnectionState, Delivery, GapReported, ReconnectPolicy
from server_ref import Context, Server, ServerConfig
from server_ref.transports.websocket import WebSocketListener
from tests.conftest import make_server
from tests.faultproxy import FaultProxy

SEED = int(os.environ.get("RTCHAT_CHAOS_SEED", "1337"))
NAMES = ("ann", "bob", "cat")
ROOM = "chaos"
MESSAGES = 2_000
"""Publishes per client."""
REQUESTS = 200
"""Requests per client (one after every MESSAGES // REQUESTS publishes)."""
PUBLISH_WINDOW = 150
"""Publishes in flight per client."""
REQUEST_WINDOW = 50
"""Requests in flight per client."""
MIN_FAULTS = 24
"""Faults injected while traffic runs, at least (the last publish waits for them):
more than a round of every (kind, client) pair, 12 faults, and the slow
aftermath some blackholes get (at most one delay each, 3 in a round)."""
TRAFFIC_SECONDS = 12.0
"""How long each client spreads its publishes over, at the least."""
KINDS = ("drop", "blackhole", "delay", "cut")
SERVER_SEND_BUFFER = 8 * 1024
"""Kernel send buffer of the server's sockets (see ``narrow_send_buffers``)."""
LINK_BUFFER = 16 * 1024
"""Receive buffer of each proxy's connection to the server: with the above, a
replay of more than some 50 KB backs up in the server's own write buffer."""

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 0.5
DETECTION = HEARTBEAT_INTERVAL + HEARTBEAT_TIMEOUT
"""A silent link is declared dead by the client within this many seconds."""

FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.5, stable_after=2.0)


@dataclass
class Faults:
    """The injector's record, and a way for the traffic to wait for it."""

    counts: Counter[str] = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, kind: str, what: str) -> None:
        self.counts[kind] += 1
        self.log.append(what)
        self.changed.set()

    async def reached(self, count: int) -> None:
        while self.total < count:
            self.changed.clear()
            await self.changed.wait()


@dataclass
class Peer:
    """One client of the test and everything it saw."""

    name: str
    proxy: FaultProxy
    client: Client
    got: dict[str, list[int]] = field(default_factory=dict)
    own: list[int] = field(default_factory=list)
    deliveries: list[tuple[str, int, str, int]] = field(default_factory=list)
    """(epoch, offset, sender, seq) of every chat message handled, in order."""
    done_from: set[str] = field(default_factory=set)
    gaps: list[GapReported] = field(default_factory=list)
    replies: dict[int, list[Any]] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)
    """seq -> the stream offset its publish was acknowledged with."""
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_chat(self, data: Any, meta: Delivery) -> None:
        sender, seq = data["from"], data["seq"]
        self.deliveries.append((meta.epoch, meta.offset, sender, seq))
        if sender == self.name:
            self.own.append(seq)
        else:
            self.got.setdefault(sender, []).append(seq)

    def on_done(self, data: Any) -> None:
        self.done_from.add(data)
        self.changed.set()


class Window:
    """Start coroutines in call order with at most ``size`` of them unfinished."""

    def __init__(self, size: int) -> None:
        self._free = asyncio.Semaphore(size)
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, make: Callable[[], Awaitable[None]]) -> None:
        await self._free.acquire()

        async def run() -> None:
            try:
                await make()
            finally:
                self._free.release()

        # Tasks run their first step in creation order, so the client calls
        # publish() (which takes the next message id) in the order of ``start``.
        task = asyncio.ensure_future(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*self.tasks)


async def traffic(peer: Peer, faults: Faults) -> None:
    """Publish MESSAGES numbered messages and make REQUESTS requests, concurrently."""
    client = peer.client
    publishes, requests = Window(PUBLISH_WINDOW), Window(REQUEST_WINDOW)
    every = MESSAGES // REQUESTS

    async def publish(seq: int) -> None:
        peer.offsets[seq] = await client.publish(ROOM, "chat", {"from": peer.name, "seq": seq})

    async def request(seq: int) -> None:
        reply = await client.request("count", {"from": peer.name, "seq": seq})
        peer.replies.setdefault(seq, []).append(reply)

    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        for seq in range(MESSAGES):
            # The load's shape (no check depends on it): a steady stream that
            # does not wait for the faults, so a client coming back has a long
            # replay to receive while live messages keep coming.
            await asyncio.sleep(max(0.0, start + seq * TRAFFIC_SECONDS / MESSAGES - loop.time()))
            if seq == MESSAGES - 1:  # and the faults all land while traffic runs
                await faults.reached(MIN_FAULTS)
            await publishes.start(functools.partial(publish, seq))
            if seq % every == 0:
                await requests.start(functools.partial(request, seq // every))
        await asyncio.gather(publishes.drain(), requests.drain())
    except Exception as exc:
        peer.errors.append(f"{type(exc).__name__}: {exc}")
        raise


async def inject(rng: random.Random, proxies: list[FaultProxy], faults: Faults) -> None:
    """Inject faults at random intervals until cancelled (at least MIN_FAULTS)."""

    async def slow_down(targets: list[FaultProxy], where: str) -> None:
        per_chunk, hold = rng.uniform(0.01, 0.15), rng.uniform(0.3, 1.5)
        for proxy in targets:
            proxy.delay(per_chunk)
        faults.record("delay", f"delay@{where}({per_chunk:.3f}s x {hold:.2f}s)")
        try:
            await asyncio.sleep(hold)
        finally:
            for proxy in targets:
                proxy.delay(0)

    deck: list[tuple[str, int]] = []
    while True:
        await asyncio.sleep(rng.uniform(0.05, 0.25))
        if not deck:  # deal every (kind, client) in shuffled rounds: a guaranteed mix
            deck = [(kind, i) for kind in KINDS for i in range(len(proxies))]
            rng.shuffle(deck)
        kind, index = deck.pop()
        targets = proxies if rng.random() < 0.2 else [proxies[index]]
        where = "all" if len(targets) > 1 else str(index)
        if kind in ("drop", "cut") and not any(proxy.links for proxy in targets):
            deck.append((kind, index))  # nothing to break right now (reconnecting): later
            continue
        if kind == "drop":
            n = sum(proxy.drop() for proxy in targets)
            faults.record(kind, f"drop@{where}({n})")
        elif kind == "cut":
            for proxy in targets:
                proxy.cut_mid_frame()
            faults.record(kind, f"cut@{where}")
        elif kind == "blackhole":
            # Held past the heartbeats' deadline, so the client notices. Links
            # still up when it ends (in their handshake, say) are dropped by
            # end_blackhole(): resuming them would leave a hole inside a TCP
            # stream, which no real network makes.
            hold = rng.uniform(DETECTION + 0.3, DETECTION + 1.0)
            for proxy in targets:
                proxy.blackhole(True)
            faults.record(kind, f"blackhole@{where}({hold:.2f}s)")
            try:
                await asyncio.sleep(hold)
            finally:
                for proxy in targets:
                    proxy.end_blackhole()
            if rng.random() < 0.5:
                # The link comes back slow: the client resumes, and its long
                # replay backs up in the server's send buffer while live
                # messages keep arriving.
                await slow_down(targets, where)
        else:
            await slow_down(targets, where)


def explain(peers: list[Peer], receiver: Peer, sender_name: str) -> str:
    """Describe how ``receiver``'s view of ``sender_name``'s messages went wrong."""
    sender = next(p for p in peers if p.name == sender_name)
    seqs = receiver.got.get(sender_name, [])
    at, found = next((i, s) for i, s in enumerate([*seqs, None]) if s != i)
    lines = [
        f"{receiver.name} handled {len(seqs)} messages from {sender_name} "
        f"({len(set(seqs))} distinct); #{at} is {found} instead of {at}",
    ]
    missing = sorted(set(range(MESSAGES)) - set(seqs))
    if missing:
        offsets = [sender.offsets.get(seq) for seq in missing]
        lines.append(
            f"missing seqs {missing[0]}..{missing[-1]} ({len(missing)}), offsets {offsets[:5]}.."
        )
        first = offsets[0]
        if first is not None:
            # Where, in handling order, the receiver went past that offset.
            handled = receiver.deliveries
            i = next((i for i, d in enumerate(handled) if d[1] > first), len(handled))
            lines.append(f"handled around offset {first}: {handled[max(0, i - 3) : i + 3]}")
    return "\n".join(lines)


def narrow_send_buffers(server: Server) -> None:
    """Give the server's connections a small kernel send buffer.

    Over loopback a socket accepts megabytes before its writer has to wait,
    more than any replay in this test, so the server would never find a
    client's link full. A real link holds far less (its bandwidth-delay
    product): then a replay to a slow client waits in the server's own
    buffer while live messages arrive, which is where ordering bugs live.
    Accepted sockets inherit the listening socket's buffer size.
    """
    listener = server._listener
    assert isinstance(listener, WebSocketListener)
    for sock in listener.sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SEND_BUFFER)


def chaos_server(calls: Counter[tuple[str, int]]) -> Server:
    server = make_server(
        ServerConfig(
            heartbeat_interval=HEARTBEAT_INTERVAL,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            history_size=20_000,
        )
    )

    @server.on("count")
    def count(ctx: Context, data: Any) -> Any:
        calls[(data["from"], data["seq"])] += 1
        return {"from": data["from"], "seq": data["seq"], "user": ctx.user}

    return server


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_chaos_nothing_lost_duplicated_or_reordered(transport: str) -> None:
    print(f"\nchaos seed: {SEED} (set RTCHAT_CHAOS_SEED={SEED} to replay this run)")
    rng = random.Random(SEED)
    calls: Counter[tuple[str, int]] = Counter()
    server = chaos_server(calls)
    await server.start("127.0.0.1", 0)
    narrow_send_buffers(server)
    proxies: list[FaultProxy] = []
    peers: list[Peer] = []
    faults = Faults()
    started = time.monotonic()
    try:
        for name in NAMES:
            proxy = await FaultProxy(server.port, read_buffer=LINK_BUFFER).start()
            proxies.append(proxy)
            client = Client(
                proxy.url,
                auth={"user": name},
                transports=(transport,),
                reconnect=FAST,
                connect_timeout=2.0,
                request_timeout=60.0,
            )
            peer = Peer(name, proxy, client)
            client.on("chat")(peer.on_chat)
            client.on("done")(peer.on_done)
            client.on_gap(peer.gaps.append)
            peers.append(peer)
            await client.connect()
            await client.join(ROOM)

        injector = asyncio.ensure_future(inject(rng, proxies, faults))
        try:
            async with asyncio.timeout(90):
                await asyncio.gather(*(traffic(peer, faults) for peer in peers))
        finally:
            injector.cancel()
            await asyncio.gather(injector, return_exceptions=True)
            for proxy in proxies:  # heal everything
                proxy.end_blackhole()
                proxy.delay(0)
                proxy.refuse(False)
        traffic_done = time.monotonic()

        # Barrier: the stream is ordered, so once a client has handled every
        # other client's "done" it has handled everything they published before.
        for peer in peers:
            await peer.client.publish(ROOM, "done", peer.name)
        async with asyncio.timeout(30):
            for peer in peers:
                others = set(NAMES) - {peer.name}
                while not others <= peer.done_from:
                    peer.changed.clear()
                    await peer.changed.wait()
        elapsed = time.monotonic() - started

        summary = [
            f"chaos seed {SEED}: traffic {traffic_done - started:.1f}s, total {elapsed:.1f}s",
            "injected: "
            + ", ".join(f"{kind}={faults.counts[kind]}" for kind in KINDS)
            + f" (total {faults.total})",
            "faults: " + " ".join(faults.log),
        ]
        for peer in peers:
            c = peer.client.counters
            delivered = sum(len(seqs) for seqs in peer.got.values())
            summary.append(
                f"{peer.name}: delivered={delivered} duplicates_dropped={c['duplicates_dropped']} "
                f"sent={c['sent']} resent={c['resent']} reconnects={c['reconnects']} "
                f"connections={c['connections']} gaps={c['gaps']} "
                f"proxy(accepted={peer.proxy.stats.accepted}, "
                f"holed_drops={peer.proxy.stats.holed_drops})"
            )
        summary.append(f"server handler calls: {sum(calls.values())}")
        print("\n".join(summary))

        assert faults.total >= MIN_FAULTS
        assert all(faults.counts[kind] > 0 for kind in KINDS), faults.counts
        for peer in peers:
            # The faults hit this client's traffic in flight; else the audit proves little.
            c = peer.client.counters
            assert c["reconnects"] > 0, (peer.name, c)
            assert c["resent"] > 0, (peer.name, c)
            assert peer.proxy.stats.accepted > 1, (peer.name, peer.proxy.stats)
            assert not peer.errors, (peer.name, peer.errors)
            assert peer.gaps == [], (peer.name, peer.gaps)
            assert peer.own == [], f"{peer.name} received {len(peer.own)} of its own messages"
            for other in NAMES:
                if other == peer.name:
                    continue
                seqs = peer.got.get(other, [])
                assert seqs == list(range(MESSAGES)), explain(peers, peer, other)
            assert sorted(peer.replies) == list(range(REQUESTS))
            for seq, replies in peer.replies.items():
                assert replies == [{"from": peer.name, "seq": seq, "user": peer.name}]
            assert peer.client.state is ConnectionState.CONNECTED
        expected_calls = {(name, seq) for name in NAMES for seq in range(REQUESTS)}
        assert set(calls) == expected_calls
        ran_twice = {key: n for key, n in calls.items() if n != 1}
        assert ran_twice == {}, f"handler ran more than once: {ran_twice}"
    except BaseException:
        print(f"chaos test failed with seed {SEED}: RTCHAT_CHAOS_SEED={SEED} replays it")
        raise
    finally:
        for peer in peers:
            await peer.client.close()
        for proxy in proxies:
            await proxy.close()
        await server.close()

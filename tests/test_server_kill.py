"""A real process kill: the server dies mid-traffic (SIGKILL) and comes back.

The reference server keeps everything in memory, so a restart loses its
sessions, its streams' history and its dedupe records. What must still hold:

* the clients reconnect (with backoff) and are told, per stream, what they
  cannot recover (``on_gap`` with ``session_unknown`` or ``epoch_changed``);
* nothing acknowledged is lost silently: each publish acknowledged by the old
  server was handled by every other client, or lies past the position at
  which that client was told of the gap;
* what was in flight at the kill (in the outbox, unacknowledged) is resent
  to the new server, acknowledged by it, and then delivered; an in-flight
  request is answered by the new server.

The server is first frozen with SIGSTOP, so that the messages sent after it
are certainly in flight (never processed) when the SIGKILL lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import pytest

from rtchat_sdk import Client, ConnectionState, Delivery, GapReported, ReconnectPolicy
from tests.faultproxy import FaultProxy
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("ann", "bob", "cat")
"""They publish, and receive each other's messages."""
OFFLINE = "dan"
"""A listener that is offline from before the kill until after the restart."""
ROOM = "r"
ROOM_STREAM = f"room:/:{ROOM}"
TOTAL = 300
"""Messages each client publishes over the whole test (before and after the kill)."""
BEFORE_KILL = 60
"""The kill comes once every client has this many publishes acknowledged."""
LATE = 5
"""Publishes each client makes while the server is frozen, just before the kill."""
WINDOW = 10
"""Publishes in flight per client."""

FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.3)


class ServerProcess:
    """``python -m server_ref`` on a fixed port, started and killed on demand."""

    def __init__(self, port: int, log: IO[bytes], *args: str) -> None:
        self.port = port
        self.log = log
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server_ref",
            "--port",
            str(self.port),
            *self.args,
            "--log-level",
            "WARNING",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.log,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(15):
            line = await self.proc.stdout.readline()
        assert b"listening" in line, line

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self) -> int:
        """Wait for the process to exit on its own; returns its exit code."""
        proc, self.proc = self.proc, None
        assert proc is not None
        return await proc.wait()

    async def kill(self) -> None:
        """SIGKILL (also ends a stopped process) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[IO[bytes]]:
    """Where the server subprocesses write their stderr (kept with the test's tmp_path)."""
    with open(tmp_path / "server.log", "wb") as log:
        yield log


class Handled(NamedTuple):
    event: str
    epoch: str
    offset: int
    sender: str
    seq: int


@dataclass
class Peer:
    name: str
    client: Client
    handled: list[Handled] = field(default_factory=list)
    """Every delivery handled, in order."""
    done_from: set[str] = field(default_factory=set)
    gaps: list[GapReported] = field(default_factory=list)
    acks: dict[tuple[str, int], tuple[int, str | None]] = field(default_factory=dict)
    """(event, seq) -> (offset, session id of the connection that got the ack)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_any(self, data: Any, meta: Delivery) -> None:
        if meta.event == "done":
            self.done_from.add(data)
        else:
            self.handled.append(
                Handled(meta.event, meta.epoch, meta.offset, data["from"], data["seq"])
            )
        self.changed.set()

    async def publish(self, event: str, seq: int) -> None:
        offset = await self.client.publish(ROOM, event, {"from": self.name, "seq": seq})
        # The reply was handled on the connection whose session is current now:
        # the task resumes before any later welcome can be processed.
        self.acks[(event, seq)] = (offset, self.client.session_id)
        self.changed.set()

    async def wait_until(self, predicate: Any) -> None:
        while not predicate():
            self.changed.clear()
            await self.changed.wait()


async def publish_all(peer: Peer) -> None:
    """TOTAL chat messages, at most WINDOW in flight, taking ids in seq order."""
    free = asyncio.Semaphore(WINDOW)
    tasks: list[asyncio.Task[None]] = []

    async def one(seq: int) -> None:
        try:
            await peer.publish("chat", seq)
        finally:
            free.release()

    for seq in range(TOTAL):
        await free.acquire()
        tasks.append(asyncio.ensure_future(one(seq)))
    await asyncio.gather(*tasks)


async def wait_state(client: Client, state: ConnectionState) -> None:
    reached = asyncio.Event()
    client.on_state_change(lambda s: reached.set() if s is state else None)
    if client.state is not state:
        await reached.wait()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_sigkill_mid_traffic_gaps_are_reported_and_nothing_acked_is_lost_silently(
    transport: str,
    server_log: IO[bytes],
) -> None:
    server = ServerProcess(
        free_port(), server_log, "--heartbeat-interval", "0.5", "--heartbeat-timeout", "0.5"
    )
    proxy = FaultProxy(server.port)
    peers: list[Peer] = []  # they publish, and receive
    receivers: list[Peer] = []  # the peers, and an offline listener
    try:
        await server.start()
        await proxy.start()
        for name in (*NAMES, OFFLINE):
            client = Client(
                proxy.url if name == OFFLINE else server.url,
                auth={"user": name},
                transports=(transport,),
                reconnect=FAST,
                connect_timeout=1.0,
                request_timeout=30.0,
            )
            peer = Peer(name, client)
            client.on("*")(peer.on_any)
            client.on_gap(peer.gaps.append)
            await client.connect()
            await client.join(ROOM)
            receivers.append(peer)
        peers = receivers[: len(NAMES)]
        offline = receivers[-1]
        old_sessions = {peer.name: peer.client.session_id for peer in receivers}

        traffic = [asyncio.ensure_future(publish_all(peer)) for peer in peers]
        async with asyncio.timeout(20):
            for peer in peers:
                await peer.wait_until(lambda peer=peer: len(peer.acks) >= BEFORE_KILL // 3)
            # One listener goes offline: what is acked from now on reaches only the
            # others, then dies with the server; its gap must cover it.
            proxy.refuse(True)
            proxy.drop()
            await wait_state(offline.client, ConnectionState.RECONNECTING)
            for peer in peers:
                await peer.wait_until(lambda peer=peer: len(peer.acks) >= BEFORE_KILL)

        # Freeze the server: whatever is sent from now on is never processed by it.
        server.signal(signal.SIGSTOP)
        late: list[asyncio.Task[None]] = []
        requests: dict[str, asyncio.Task[Any]] = {}
        for peer in peers:
            sent = peer.client.counters["sent"]
            late += [asyncio.ensure_future(peer.publish("late", i)) for i in range(LATE)]
            requests[peer.name] = asyncio.ensure_future(
                peer.client.request("echo", {"from": peer.name, "in_flight": True})
            )
            # Tasks take their first step in creation order, and publish() and
            # request() put their message in the outbox and hand it to the writer
            # (the connection is still open) in that first step.
            await asyncio.sleep(0)
            assert peer.client.counters["sent"] >= sent + LATE + 1
        resent_before = {peer.name: peer.client.counters["resent"] for peer in peers}
        acked_before_kill = {peer.name: dict(peer.acks) for peer in peers}
        await server.kill()
        await server.start()  # same port; the clients find it with backoff
        proxy.refuse(False)

        async with asyncio.timeout(30):
            await asyncio.gather(*traffic, *late)
            replies = {name: await task for name, task in requests.items()}
            for peer in peers:
                await peer.client.publish(ROOM, "done", peer.name)
            for peer in receivers:
                others = set(NAMES) - {peer.name}
                await peer.wait_until(lambda peer=peer, o=others: o <= peer.done_from)
    finally:
        for peer in receivers:
            await peer.client.close()
        await proxy.close()
        await server.kill()

    by_name = {peer.name: peer for peer in peers}
    report = []
    for peer in receivers:
        name, old = peer.name, old_sessions[peer.name]
        assert peer.client.session_id != old, "a memory server cannot resume a session"
        # Told explicitly: the old inbox and the room stream.
        reasons = {(g.stream, g.reason) for g in peer.gaps}
        assert (f"inbox:{old}", "session_unknown") in reasons, peer.gaps
        room_gaps = [g for g in peer.gaps if g.stream == ROOM_STREAM]
        assert len(room_gaps) == 1, room_gaps
        assert room_gaps[0].reason in ("session_unknown", "epoch_changed"), room_gaps
        assert all(g.stream in (ROOM_STREAM, f"inbox:{old}") for g in peer.gaps), peer.gaps

        # What this client handled: the old epoch, then the new one; in each, every
        # offset at most once and each sender's messages in order.
        epochs = list(dict.fromkeys(h.epoch for h in peer.handled))
        assert len(epochs) == 2, f"{name} saw epochs {epochs}"
        new_epoch = epochs[1]
        first_new = next(i for i, h in enumerate(peer.handled) if h.epoch == new_epoch)
        assert all(h.epoch == new_epoch for h in peer.handled[first_new:]), "epochs interleave"
        for epoch in epochs:
            in_epoch = [h for h in peer.handled if h.epoch == epoch]
            offsets = [h.offset for h in in_epoch]
            assert offsets == sorted(set(offsets)), f"{name}: duplicates or disorder in {epoch}"
            for event, sender in {(h.event, h.sender) for h in in_epoch}:
                seqs = [h.seq for h in in_epoch if (h.event, h.sender) == (event, sender)]
                assert seqs == sorted(set(seqs)), f"{name}: {sender}'s {event} out of order"
        assert all(h.sender != name for h in peer.handled), f"{name} got its own message"
        old_handled = {h.offset: (h.event, h.sender, h.seq) for h in peer.handled[:first_new]}
        new_handled = {h.offset: (h.event, h.sender, h.seq) for h in peer.handled[first_new:]}
        reached = max(old_handled)  # where this client stood when the old server died
        # A message handled in both epochs was processed by the old server, whose
        # reply was lost with it, then resent and processed again by the new one
        # (the dedupe records died with the old server; the gap is the notice).
        twice = set(old_handled.values()) & set(new_handled.values())
        for event, sender, seq in twice:
            assert by_name[sender].acks[(event, seq)][1] != old_sessions[sender]

        past_gap = 0
        for other in set(NAMES) - {name}:
            for (event, seq), (offset, session) in by_name[other].acks.items():
                what = (event, other, seq)
                if session == old_sessions[other]:
                    # Acked by the old server: handled, or past the reported gap.
                    if offset <= reached:
                        assert old_handled.get(offset) == what, (
                            f"{name} silently missed {what} at old offset {offset}"
                        )
                    else:
                        past_gap += 1
                else:
                    # Acked by the new server: must be delivered.
                    assert new_handled.get(offset) == what, (
                        f"{name} never handled {what}, acked by the new server at {offset}"
                    )
        if peer is offline:
            # Each publisher had at least BEFORE_KILL - BEFORE_KILL // 3 publishes
            # acked while this one was away, all but WINDOW of them sent after.
            missed = len(NAMES) * (BEFORE_KILL - BEFORE_KILL // 3 - WINDOW)
            assert past_gap >= missed, f"{name} was away, yet missed only {past_gap}"
        c = peer.client.counters
        report.append(
            f"{name}: handled {len(peer.handled) - len(new_handled)} old + {len(new_handled)} new,"
            f" {past_gap} acked-but-lost past the gap, {len(twice)} in both epochs;"
            f" gaps {sorted(reasons)}; resent={c['resent']} reconnects={c['reconnects']}"
        )
    print("\n" + "\n".join(report))

    for peer in peers:
        name, old = peer.name, old_sessions[peer.name]
        # Every publish was acknowledged; those made while the server was frozen
        # by the new server, after being resent. So was the in-flight request.
        assert set(peer.acks) == {("chat", i) for i in range(TOTAL)} | {
            ("late", i) for i in range(LATE)
        }
        for i in range(LATE):
            assert peer.acks[("late", i)][1] != old, f"{name}'s late #{i} acked by the old server"
        for key in acked_before_kill[name]:
            assert peer.acks[key][1] == old
        assert replies[name] == {"from": name, "in_flight": True}
        assert peer.client.counters["resent"] > resent_before[name]

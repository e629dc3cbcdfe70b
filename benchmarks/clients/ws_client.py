"""The raw websockets baseline's side of every scenario.

What an application on bare websockets would write: JSON messages with an
id, a reader task per connection, a window for pipelining, and, for the
reconnect storm, the same loop and ``backoff()`` delays as websockets' own
``async for ws in connect(...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.client import backoff
from websockets.exceptions import ConnectionClosed

from benchmarks.clients.fanout import FanoutTracker
from benchmarks.clients.harness import (
    Measured,
    StormRecord,
    Tally,
    payload,
    probe,
    run_scenario,
    sequential,
)
from benchmarks.common import Meter

__all__ = ["run"]

ROOM = "bench"

Compression = Literal["deflate"] | None


def _compression(params: dict[str, Any]) -> Compression:
    return "deflate" if params.get("compression") == "deflate" else None


async def _open(url: str, path: str, params: dict[str, Any], **kwargs: Any) -> ClientConnection:
    return await connect(
        url + path, compression=_compression(params), open_timeout=30, proxy=None, **kwargs
    )


async def _seq(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    async with await _open(url, "/echo", params) as ws:

        async def request(i: int) -> object:
            await ws.send(json.dumps({"id": i, "d": payload(i)}))
            reply = json.loads(await ws.recv())
            assert reply["id"] == i
            return reply["d"]

        return await sequential(request, params, server_pid)


async def _pipelined(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    """A sender kept ``window`` ahead of a reader task that counts the echoes."""
    window = asyncio.Semaphore(int(params["window"]))
    count = int(params["count"])
    async with await _open(url, "/echo", params) as ws:
        for i in range(int(params["warmup"])):
            await ws.send(json.dumps({"id": i, "d": payload(i)}))
            json.loads(await ws.recv())
        received = 0
        sent = 0
        finished = asyncio.Event()
        sending = True

        async def reader() -> None:
            nonlocal received
            async for message in ws:
                json.loads(message)
                received += 1
                window.release()
                if not sending and received >= sent:
                    finished.set()
                    return

        meter = Meter(server_pid)
        deadline = time.perf_counter() + float(params["seconds"])
        task = asyncio.ensure_future(reader())
        meter.start()
        try:
            while sent < count and time.perf_counter() < deadline:
                await window.acquire()
                await ws.send(json.dumps({"id": sent, "d": payload(sent)}))
                sent += 1
            sending = False
            if received >= sent:
                finished.set()
            await asyncio.wait_for(finished.wait(), float(params.get("timeout", 30)))
            return dict(meter.stop(received, "replies"))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _RoomConn:
    """A /room connection: join, publish, and a reader task for what arrives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def joined(cls, url: str, params: dict[str, Any]) -> _RoomConn:
        ws = await _open(url, "/room", params)
        await ws.send(json.dumps({"t": "join", "id": 0, "room": ROOM}))
        json.loads(await ws.recv())
        return cls(ws)

    def read(
        self,
        on_message: Callable[[Any], Any],
        awaited: bool = False,
        on_close: Callable[..., object] | None = None,
    ) -> None:
        """A reader task: ``on_message`` for each JSON message.

        ``awaited``: ``on_message`` is an ``async def``, awaited in the reader
        (the leanest way to run one). ``on_close``: called with the close code
        and reason if the link goes down under us.
        """

        async def loop() -> None:
            with contextlib.suppress(ConnectionClosed):
                if awaited:
                    async for message in self.ws:
                        await on_message(json.loads(message))
                else:
                    async for message in self.ws:
                        on_message(json.loads(message))
            if on_close is not None:  # not cancelled: the connection ended under us
                on_close(f"close code {self.ws.close_code}", self.ws.close_reason or "")

        self.task = asyncio.ensure_future(loop())

    async def publish(self, seq: int) -> None:
        await self.ws.send(json.dumps({"t": "pub", "id": seq, "room": ROOM, "d": payload(seq)}))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.ws.close()


async def _close(conns: list[_RoomConn]) -> None:
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


def _frame_seq(frame: Any) -> int:
    n: int = frame["d"]["n"]
    return n


async def _fanout(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    """One publisher socket; unthrottled, it sends as fast as ``send()`` returns."""
    tracker = FanoutTracker.from_params(params, server_pid)
    is_async = FanoutTracker.async_handler(params)
    conns: list[_RoomConn] = []
    try:
        for i in range(int(params["receivers"])):
            conn = await _RoomConn.joined(url, params)
            conn.read(tracker.handler(i, is_async, _frame_seq), is_async, tracker.disconnected)
            conns.append(conn)
        publisher = await _RoomConn.joined(url, params)
        conns.append(publisher)
        publisher.read(lambda frame: None)  # acks

        return await tracker.run(
            publisher.publish, float(params["seconds"]), float(params["timeout"])
        )
    finally:
        await _close(conns)


async def _publish(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    receivers = int(params["receivers"])
    window = asyncio.Semaphore(int(params["window"]))
    got = Tally()
    acked = Tally()

    def on_ack(frame: dict[str, Any]) -> None:
        acked.add()
        window.release()

    conns: list[_RoomConn] = []
    try:
        for _ in range(receivers):
            conn = await _RoomConn.joined(url, params)
            conn.read(lambda frame: got.add())
            conns.append(conn)
        publisher = await _RoomConn.joined(url, params)
        conns.append(publisher)
        publisher.read(on_ack)
        warmup = int(params["warmup"])
        timeout = float(params["timeout"])
        for i in range(warmup):
            await window.acquire()
            await publisher.publish(i)
        await acked.reach(warmup, timeout)
        await got.reach(warmup * receivers, timeout)
        got.value = acked.value = 0
        count = int(params["count"])
        meter = Meter(server_pid)
        deadline = time.perf_counter() + float(params["seconds"])
        sent = 0
        meter.start()
        while sent < count and time.perf_counter() < deadline:
            await window.acquire()
            await publisher.publish(sent)
            sent += 1
        await acked.reach(sent, timeout)
        result: dict[str, Any] = dict(meter.stop(acked.value, "publishes"))
        await got.reach(sent * receivers, timeout)
        result["delivered_fraction"] = got.value / (sent * receivers) if sent and receivers else 1.0
        return result
    finally:
        await _close(conns)


class WsHolder:
    """Idle raw connections; with ``reconnect``, websockets' own retry loop and delays."""

    def __init__(self, url: str, params: dict[str, Any]) -> None:
        self.url = url
        self.params = params
        self.reconnect = bool(params.get("reconnect", False))
        heartbeat = params.get("heartbeat")
        self.ping: dict[str, Any] = (
            {"ping_interval": None}
            if heartbeat is None
            else {"ping_interval": float(heartbeat), "ping_timeout": float(heartbeat) * 2}
        )
        self.conns: dict[int, ClientConnection] = {}
        self.records: list[StormRecord] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self._lost = 0

    async def _connect(self) -> ClientConnection:
        return await _open(self.url, "/echo", self.params, **self.ping)

    async def open(self, index: int) -> None:
        ws = await self._connect()
        record = StormRecord()
        self.conns[index] = ws
        self.records.append(record)
        task = asyncio.ensure_future(self._life(index, ws, record))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _life(self, index: int, ws: ClientConnection, record: StormRecord) -> None:
        await ws.wait_closed()
        record.down_at = time.monotonic()
        self._lost += 1
        self.conns.pop(index, None)
        if not self.reconnect:
            return
        delays = None
        while True:  # as websockets' ``async for ws in connect(...)``
            record.attempts += 1
            try:
                ws = await self._connect()
            except Exception:  # refused, timed out, handshake failed: retry
                if delays is None:
                    delays = backoff()
                await asyncio.sleep(next(delays))
                continue
            record.back_at = time.monotonic()
            self.conns[index] = ws
            return

    async def close_all(self) -> None:
        # Cancel the watchers first: closing on purpose is not losing a connection.
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        conns = list(self.conns.values())
        self.conns.clear()
        self.records = []
        for i in range(0, len(conns), 500):
            await asyncio.gather(*(c.close() for c in conns[i : i + 500]), return_exceptions=True)

    def connected(self) -> int:
        return len(self.conns)

    def lost(self) -> int:
        return self._lost

    def storm_records(self) -> list[StormRecord]:
        return self.records


async def _probe(url: str, params: dict[str, Any]) -> dict[str, Any]:
    async with await _open(url, "/echo", params) as ws:

        async def request(i: int) -> object:
            await ws.send(json.dumps({"id": i, "d": payload(i)}))
            return json.loads(await ws.recv())

        return await probe(request, params)


async def run(
    scenario: str, url: str, params: dict[str, Any], server_pid: int
) -> dict[str, Any] | None:
    measured: dict[str, Measured] = {
        "seq": _seq,
        "pipelined": _pipelined,
        "fanout": _fanout,
        "publish": _publish,
        "probe": lambda url, params, _pid: _probe(url, params),
    }
    return await run_scenario(
        scenario, url, params, server_pid, measured, lambda: WsHolder(url, params)
    )

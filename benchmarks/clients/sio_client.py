"""python-socketio's side of every scenario: ``AsyncClient``, websocket transport only.

Sequential requests use ``call()``; pipelining and publishing use ``emit()``
with ack callbacks (cheaper than ``call()``, which waits on a future per
message); the reconnect storm uses the client's own reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import socketio  # type: ignore[import-untyped,import-not-found,unused-ignore]

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


def _http(url: str) -> str:
    return "http" + url[2:] if url.startswith("ws") else url


async def _connected(url: str, **kwargs: Any) -> Any:
    sio = socketio.AsyncClient(handle_sigint=False, **kwargs)
    await sio.connect(_http(url), transports=["websocket"], wait_timeout=30)
    return sio


async def _seq(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    sio = await _connected(url, reconnection=False)
    try:

        async def request(i: int) -> object:
            return await sio.call("echo", payload(i), timeout=30)

        return await sequential(request, params, server_pid)
    finally:
        await sio.disconnect()


async def _pipelined(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    window = asyncio.Semaphore(int(params["window"]))
    count = int(params["count"])
    sio = await _connected(url, reconnection=False)
    try:
        for i in range(int(params["warmup"])):
            await sio.call("echo", payload(i), timeout=30)
        received = Tally()

        def on_ack(data: Any) -> None:
            received.add()
            window.release()

        meter = Meter(server_pid)
        deadline = time.perf_counter() + float(params["seconds"])
        sent = 0
        meter.start()
        while sent < count and time.perf_counter() < deadline:
            await window.acquire()
            await sio.emit("echo", payload(sent), callback=on_ack)
            sent += 1
        await received.reach(sent, float(params.get("timeout", 30)))
        return dict(meter.stop(received.value, "replies"))
    finally:
        await sio.disconnect()


async def _receivers(
    url: str, n: int, handler: Callable[[int], Any], on_disconnect: Any = None
) -> list[Any]:
    """``n`` clients in the room; client ``i`` calls ``handler(i)`` for each message."""
    clients: list[Any] = []
    for i in range(n):
        sio = await _connected(url, reconnection=False)
        sio.on("msg", handler(i))
        if on_disconnect is not None:
            sio.on("disconnect", on_disconnect)
        await sio.call("join", ROOM, timeout=30)
        clients.append(sio)
    return clients


async def _close(clients: list[Any]) -> None:
    await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)


def _ignore(*args: Any) -> None:
    return None


async def _fanout(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    """``emit()`` with an ack callback nobody waits for; unthrottled, as fast as it returns."""
    tracker = FanoutTracker.from_params(params, server_pid)
    is_async = FanoutTracker.async_handler(params)

    async def on_disconnect(*reason: Any) -> None:
        tracker.disconnected(*reason)

    clients = await _receivers(
        url, int(params["receivers"]), lambda i: tracker.handler(i, is_async), on_disconnect
    )
    try:
        publisher = await _connected(url, reconnection=False)
        clients.append(publisher)

        async def publish(seq: int) -> object:
            return await publisher.emit(
                "publish", {"room": ROOM, "d": payload(seq)}, callback=_ignore
            )

        return await tracker.run(publish, float(params["seconds"]), float(params["timeout"]))
    finally:
        await _close(clients)


async def _publish(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    receivers = int(params["receivers"])
    window = asyncio.Semaphore(int(params["window"]))
    got = Tally()
    acked = Tally()

    def on_ack(data: Any) -> None:
        acked.add()
        window.release()

    clients = await _receivers(url, receivers, lambda i: lambda data: got.add())
    try:
        publisher = await _connected(url, reconnection=False)
        clients.append(publisher)
        warmup = int(params["warmup"])
        timeout = float(params["timeout"])
        for i in range(warmup):
            await publisher.call("publish", {"room": ROOM, "d": payload(i)}, timeout=30)
        await got.reach(warmup * receivers, timeout)
        got.value = 0
        count = int(params["count"])
        meter = Meter(server_pid)
        deadline = time.perf_counter() + float(params["seconds"])
        sent = 0
        meter.start()
        while sent < count and time.perf_counter() < deadline:
            await window.acquire()
            await publisher.emit("publish", {"room": ROOM, "d": payload(sent)}, callback=on_ack)
            sent += 1
        await acked.reach(sent, timeout)
        result: dict[str, Any] = dict(meter.stop(acked.value, "publishes"))
        await got.reach(sent * receivers, timeout)
        result["delivered_fraction"] = got.value / (sent * receivers) if sent and receivers else 1.0
        return result
    finally:
        await _close(clients)


class _AttemptCounter:
    """A logger for one client that counts its reconnection attempts."""

    def __init__(self, record: StormRecord) -> None:
        self.record = record

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if msg.startswith("Connection failed, new attempt"):
            self.record.attempts += 1

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        return None

    warning = error = exception = debug


class SioHolder:
    """Idle socketio clients; with ``reconnect``, the client's own reconnection."""

    def __init__(self, url: str, params: dict[str, Any]) -> None:
        self.url = url
        self.reconnect = bool(params.get("reconnect", False))
        self.clients: list[Any] = []
        self.records: list[StormRecord] = []
        self._connected = 0
        self._lost = 0
        self._closing = False

    async def open(self, index: int) -> None:
        record = StormRecord()
        sio = socketio.AsyncClient(
            handle_sigint=False, reconnection=self.reconnect, logger=_AttemptCounter(record)
        )

        async def on_connect() -> None:
            self._connected += 1
            if record.down_at is not None and record.back_at is None:
                record.back_at = time.monotonic()

        async def on_disconnect(*reason: Any) -> None:
            self._connected -= 1
            if self._closing:
                return
            self._lost += 1
            if record.down_at is None:
                record.down_at = time.monotonic()

        sio.on("connect", on_connect)
        sio.on("disconnect", on_disconnect)
        try:
            await sio.connect(_http(self.url), transports=["websocket"], wait_timeout=30)
        except BaseException:
            with contextlib.suppress(Exception):
                await sio.disconnect()
            raise
        self.clients.append(sio)
        self.records.append(record)

    async def close_all(self) -> None:
        clients, self.clients = self.clients, []
        self.records = []
        self._closing = True
        try:
            for i in range(0, len(clients), 500):
                await _close(clients[i : i + 500])
        finally:
            self._closing = False

    def connected(self) -> int:
        return self._connected

    def lost(self) -> int:
        return self._lost

    def storm_records(self) -> list[StormRecord]:
        return self.records


async def _probe(url: str, params: dict[str, Any]) -> dict[str, Any]:
    sio = await _connected(url, reconnection=False)
    try:

        async def request(i: int) -> object:
            return await sio.call("echo", payload(i), timeout=30)

        return await probe(request, params)
    finally:
        await sio.disconnect()


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
        scenario, url, params, server_pid, measured, lambda: SioHolder(url, params)
    )

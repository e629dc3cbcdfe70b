"""rtchat's side of every scenario, through the public ``Client`` API only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

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
from rtchat_sdk import Client, ConnectionState, ReconnectPolicy

__all__ = ["run"]

ROOM = "bench"
_settings: dict[str, Any] = {"compression": False}
"""Client options every connection of this process uses (set by ``run``)."""


def _client(url: str, **kwargs: Any) -> Client:
    return Client(url, **_settings, **kwargs)


async def _connected(url: str, **kwargs: Any) -> Client:
    client = _client(url, **kwargs)
    await client.connect()
    return client


async def _seq(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    async with _client(url) as client:

        async def request(i: int) -> object:
            return await client.request("echo", payload(i))

        return await sequential(request, params, server_pid)


async def _pipelined(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    """``window`` tasks, each awaiting its own requests: that many always in flight."""
    window = int(params["window"])
    async with _client(url) as client:
        await asyncio.gather(*(client.request("echo", payload(i)) for i in range(params["warmup"])))
        meter = Meter(server_pid)
        count = int(params["count"])
        deadline = time.perf_counter() + float(params["seconds"])
        done = 0

        async def worker() -> None:
            nonlocal done
            while done < count and time.perf_counter() < deadline:
                await client.request("echo", payload(done))
                done += 1

        meter.start()
        await asyncio.gather(*(worker() for _ in range(window)))
        return dict(meter.stop(done, "replies"))


async def _receivers(url: str, n: int, handler: Callable[[int], Any]) -> list[Client]:
    """``n`` clients in the room; client ``i`` calls ``handler(i)`` for each message."""
    clients: list[Client] = []
    for i in range(n):
        client = await _connected(url)
        client.on("msg")(handler(i))
        await client.join(ROOM)
        clients.append(client)
    return clients


async def _close(clients: list[Client]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def _fanout(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    """Throttled: ``window`` publishes in flight, each waiting for credit from the tracker.
    Unthrottled: ``publish_in_flight`` acknowledged publishes in flight (the client's own
    ``max_in_flight`` default), none waiting for a receiver."""
    tracker = FanoutTracker.from_params(params, server_pid)
    is_async = FanoutTracker.async_handler(params)
    clients = await _receivers(
        url, int(params["receivers"]), lambda i: tracker.handler(i, is_async)
    )
    receivers = list(clients)
    try:
        publisher = await _connected(url)
        clients.append(publisher)
        await publisher.join(ROOM)

        async def publish(seq: int) -> object:
            return await publisher.publish(ROOM, "msg", payload(seq))

        workers = int(params["window"] if tracker.throttled else params["publish_in_flight"])
        result = await tracker.run(
            publish, float(params["seconds"]), float(params["timeout"]), workers
        )
        counters = [c.counters for c in receivers]
        result["disconnects"] = sum(max(0, c.get("connections", 1) - 1) for c in counters)
        result["gaps"] = sum(c.get("gaps", 0) for c in counters)
        return result
    finally:
        await _close(clients)


async def _publish(url: str, params: dict[str, Any], server_pid: int) -> dict[str, Any]:
    """Acked publishes to a room with ``receivers`` members, ``window`` in flight."""
    receivers = int(params["receivers"])
    window = int(params["window"])
    got = Tally()

    def on_message(data: dict[str, Any]) -> None:
        got.add()

    clients = await _receivers(url, receivers, lambda i: on_message)
    try:
        publisher = await _connected(url)
        clients.append(publisher)
        await publisher.join(ROOM)
        warmup = int(params["warmup"])
        timeout = float(params["timeout"])
        for i in range(warmup):
            await publisher.publish(ROOM, "msg", payload(i))
        await got.reach(warmup * receivers, timeout)
        got.value = 0
        meter = Meter(server_pid)
        count = int(params["count"])
        deadline = time.perf_counter() + float(params["seconds"])
        done = 0

        async def worker() -> None:
            nonlocal done
            while done < count and time.perf_counter() < deadline:
                done += 1
                await publisher.publish(ROOM, "msg", payload(done))

        meter.start()
        await asyncio.gather(*(worker() for _ in range(window)))
        result: dict[str, Any] = dict(meter.stop(done, "publishes"))
        await got.reach(done * receivers, timeout)
        result["delivered_fraction"] = got.value / (done * receivers) if done and receivers else 1.0
        return result
    finally:
        await _close(clients)


class RtchatHolder:
    """Idle ``Client`` objects; with ``reconnect``, how each came back after a restart."""

    def __init__(self, url: str, reconnect: bool) -> None:
        self.url = url
        self.reconnect = reconnect
        self.clients: list[Client] = []
        self.records: list[StormRecord] = []
        self._lost = 0
        self._closing = False

    async def open(self, index: int) -> None:
        policy = ReconnectPolicy() if self.reconnect else ReconnectPolicy(enabled=False)
        client = _client(self.url, reconnect=policy, connect_timeout=30.0)
        record = StormRecord()

        def on_state(state: ConnectionState) -> None:
            now = time.monotonic()
            if state in (ConnectionState.RECONNECTING, ConnectionState.CLOSED):
                if record.down_at is None and not self._closing:
                    self._lost += 1
                    record.down_at = now
            elif (
                state is ConnectionState.CONNECTED
                and record.down_at is not None
                and record.back_at is None
            ):
                record.back_at = now
                record.attempts = client.counters["failed_attempts"] + 1  # tries to get back

        await client.connect()
        client.on_state_change(on_state)
        self.clients.append(client)
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
        return sum(1 for c in self.clients if c.state is ConnectionState.CONNECTED)

    def lost(self) -> int:
        return self._lost

    def storm_records(self) -> list[StormRecord]:
        return self.records


async def _probe(url: str, params: dict[str, Any]) -> dict[str, Any]:
    async with _client(url, connect_timeout=30.0) as client:

        async def request(i: int) -> object:
            return await client.request("echo", payload(i))

        return await probe(request, params)


async def run(
    scenario: str, url: str, params: dict[str, Any], server_pid: int
) -> dict[str, Any] | None:
    _settings["compression"] = params.get("compression") == "deflate"
    polling = params.get("transport") == "polling"
    _settings["transports"] = ("polling",) if polling else ("websocket",)
    measured: dict[str, Measured] = {
        "seq": _seq,
        "pipelined": _pipelined,
        "fanout": _fanout,
        "publish": _publish,
        "probe": lambda url, params, _pid: _probe(url, params),
    }
    return await run_scenario(
        scenario,
        url,
        params,
        server_pid,
        measured,
        lambda: RtchatHolder(url, bool(params.get("reconnect", False))),
    )

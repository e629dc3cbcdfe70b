"""The parts of every client program that do not depend on the implementation.

Each implementation module (``rtchat_client``, ``ws_client``, ``sio_client``)
provides small adapters — how to make one request, how to publish, how to
open and close one long-lived connection — and these functions turn them
into the measured scenarios. Every loop is bounded by a count and a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from benchmarks.common import PAYLOAD, Meter, emit, read_commands, summary

__all__ = [
    "Budget",
    "Holder",
    "StormRecord",
    "Tally",
    "Measured",
    "hold",
    "payload",
    "probe",
    "run_scenario",
    "sequential",
]


def payload(n: int) -> dict[str, Any]:
    """The ~100-byte application payload, numbered."""
    return {**PAYLOAD, "n": n}


@dataclass(slots=True)
class Budget:
    """A bounded loop: at most ``count`` operations and ``seconds`` of wall time."""

    count: int
    seconds: float
    deadline: float = 0.0

    def start(self) -> None:
        self.deadline = time.perf_counter() + self.seconds

    def more(self, done: int) -> bool:
        return done < self.count and time.perf_counter() < self.deadline


async def sequential(
    request: Callable[[int], Awaitable[object]], params: dict[str, Any], server_pid: int
) -> dict[str, Any]:
    """One request at a time: round trips per second and their latency."""
    for i in range(int(params["warmup"])):
        await request(i)
    meter = Meter(server_pid)
    budget = Budget(int(params["count"]), float(params["seconds"]))
    latencies: list[float] = []
    done = 0
    clock = time.perf_counter
    budget.start()
    meter.start()
    while budget.more(done):
        t0 = clock()
        await request(done)
        latencies.append(clock() - t0)
        done += 1
    result: dict[str, Any] = dict(meter.stop(done, "round_trips"))
    result["latency_ms"] = {k: v * 1e3 for k, v in summary(latencies).items()}
    return result


class Tally:
    """A counter that can be awaited until it reaches a value."""

    def __init__(self) -> None:
        self.value = 0
        self._target: int | None = None
        self._event = asyncio.Event()

    def add(self, n: int = 1) -> None:
        self.value += n
        if self._target is not None and self.value >= self._target:
            self._event.set()

    async def reach(self, target: int, timeout: float) -> bool:
        """Wait until the count is at least ``target``; False if ``timeout`` passed first."""
        if self.value >= target:
            return True
        self._target = target
        self._event.clear()
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._target = None
        return True


class Holder(Protocol):
    """Many long-lived connections of one implementation, in one process."""

    async def open(self, index: int) -> None:
        """Open connection ``index`` (raises if it cannot)."""

    async def close_all(self) -> None:
        """Close every connection (bounded by the caller)."""

    def connected(self) -> int:
        """How many connections are up now."""

    def lost(self) -> int:
        """How many times a connection went down since it was opened."""

    def storm_records(self) -> list[StormRecord]:
        """Per connection, when it went down and came back (for the reconnect storm)."""


@dataclass(slots=True)
class StormRecord:
    down_at: float | None = None
    back_at: float | None = None
    attempts: int = 0


async def _open_many(
    holder: Holder, start: int, count: int, concurrency: int, seconds: float
) -> tuple[int, int]:
    """Open ``count`` connections, ``concurrency`` at a time, within ``seconds``."""
    sem = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            try:
                await holder.open(i)
            except Exception:
                failed += 1

    tasks = [asyncio.ensure_future(one(i)) for i in range(start, start + count)]
    _, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return count - failed - len(pending), failed + len(pending)


async def hold(holder: Holder, params: dict[str, Any]) -> None:
    """Hold idle connections, driven by the orchestrator's commands on stdin.

    ``warm`` is reported after ``warmup_conns`` connections were opened and
    closed (so the server's one-time allocations happen before its baseline
    is taken); after ``{"cmd": "go"}`` the ``conns`` connections open and
    ``ready`` is reported. Then ``report``, ``restarted`` (reconnect storm)
    and ``quit`` are answered until stdin closes.
    """
    try:
        await _hold(holder, params)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(holder.close_all(), 30)
        emit({"event": "bye"})


async def _hold(holder: Holder, params: dict[str, Any]) -> None:
    commands = await read_commands()
    concurrency = int(params.get("concurrency", 50))
    open_seconds = float(params.get("open_seconds", 120))
    warmup = int(params.get("warmup_conns", 0))
    if warmup:
        await _open_many(holder, 0, warmup, concurrency, open_seconds)
        await asyncio.wait_for(holder.close_all(), 30)
    emit({"event": "warm"})
    while (await commands.get()).get("cmd") != "go":
        pass
    t0 = time.perf_counter()
    opened, failed = await _open_many(
        holder, warmup, int(params["conns"]), concurrency, open_seconds
    )
    emit(
        {
            "event": "ready",
            "connected": opened,
            "failed": failed,
            "open_s": time.perf_counter() - t0,
        }
    )
    while True:
        cmd = await commands.get()
        kind = cmd.get("cmd")
        if kind == "report":
            emit({"event": "report", "connected": holder.connected(), "lost": holder.lost()})
        elif kind == "restarted":
            emit(await _storm_report(holder, cmd, float(params.get("storm_timeout", 60))))
        elif kind == "quit":
            break


async def _storm_report(holder: Holder, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Wait (bounded) until every connection is back, then describe how they came back."""
    t_up = float(cmd["t_up"])
    t_down = float(cmd["t_down"])
    records = holder.storm_records()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r.back_at is not None for r in records):
            break
        await asyncio.sleep(0.05)
    back = [r.back_at - t_up for r in records if r.back_at is not None]
    attempts = [r.attempts for r in records if r.back_at is not None]
    histogram: dict[str, int] = {}
    for t in sorted(back):
        bucket = f"{math.floor(t * 2) / 2:.1f}"
        histogram[bucket] = histogram.get(bucket, 0) + 1
    return {
        "event": "storm",
        "clients": len(records),
        "back": len(back),
        "never_down": sum(1 for r in records if r.down_at is None),
        "restart_s": t_up - t_down,
        "all_back_s": max(back) if len(back) == len(records) and back else math.nan,
        "back_after_up_s": summary(back),
        "attempts": {
            "mean": sum(attempts) / len(attempts) if attempts else math.nan,
            **summary([float(a) for a in attempts]),
        },
        "back_per_half_second": histogram,
    }


async def probe(
    request: Callable[[int], Awaitable[object]], params: dict[str, Any]
) -> dict[str, Any]:
    """Requests at a steady rate; their latency tells whether the node stays responsive."""
    interval = 1.0 / float(params["rate"])
    budget = Budget(int(params["count"]), float(params["seconds"]))
    timeout = float(params.get("timeout", 5.0))
    latencies: list[float] = []
    errors = 0
    budget.start()
    next_at = time.perf_counter()
    i = 0
    while budget.more(i):
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(request(i), timeout)
            latencies.append(time.perf_counter() - t0)
        except Exception:
            errors += 1
        i += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    return {
        "requests": i,
        "errors": errors,
        "latency_ms": {k: v * 1e3 for k, v in summary(latencies).items()},
    }


Measured = Callable[[str, dict[str, Any], int], Awaitable[dict[str, Any]]]
"""A measured scenario of one implementation: (url, params, server PID) -> result."""


async def run_scenario(
    scenario: str,
    url: str,
    params: dict[str, Any],
    server_pid: int,
    measured: Mapping[str, Measured],
    holder: Callable[[], Holder],
) -> dict[str, Any] | None:
    """One client process's work: a measured scenario, or (``hold``) idle connections."""
    if scenario == "hold":
        await hold(holder(), params)
        return None
    run = measured.get(scenario)
    if run is None:
        raise ValueError(f"unknown scenario {scenario!r}")
    return await run(url, params, server_pid)

"""The scenarios, orchestrator side: which processes each one starts, with what.

A scenario's ``run`` starts a fresh deployment for one implementation, runs
its client process(es), stops everything (in ``finally``, by PID) and returns
the run's numbers as a dict. ``metrics`` say which of those numbers make the
rows of the table. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.common import GC_LOG_ENV, cpu_seconds, rss_bytes
from benchmarks.procs import ClientProcess, Deployment, Impl, SingleNode

__all__ = ["FANOUT_SCENARIOS", "SCENARIOS", "Metric", "Scenario"]


@dataclass(frozen=True, slots=True)
class Metric:
    """One row of the table: a number found at ``key`` (dotted) in each run's result."""

    key: str
    label: str
    fmt: str = "{:,.0f}"
    higher_is_better: bool = True


RunFn = Callable[[Impl, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    metrics: tuple[Metric, ...]
    full: dict[str, Any]
    quick: dict[str, Any]
    run: RunFn
    heavy: bool = False
    """Long scenarios (thousands of connections): run ``--heavy-runs`` times."""
    client: str = ""
    """The client programs' name for it ("": the same as ``name``)."""

    def params(self, quick: bool) -> dict[str, Any]:
        return dict(self.quick if quick else self.full)


def _deployment(
    impl: Impl, heartbeat: float | None = None, env: dict[str, str] | None = None
) -> Deployment:
    return SingleNode(impl, impl.heartbeat_args(heartbeat), env)


async def _one_client(impl: Impl, scenario: str, params: dict[str, Any]) -> dict[str, Any]:
    """A fresh server and one client process that runs ``scenario`` and reports."""
    deployment = _deployment(impl)
    client: ClientProcess | None = None
    try:
        await deployment.start()
        client = ClientProcess(impl, scenario, deployment.urls[0], deployment.pids[0], params)
        await client.start()
        # Publishing may take seconds + timeout, and the wait for the last deliveries timeout.
        limit = float(params.get("seconds", 10)) + 2 * float(params.get("timeout", 10)) + 60
        result = await client.event(limit, expect="result")
        result.pop("event", None)
        return result
    finally:
        if client is not None:
            await client.stop(10)
        await deployment.stop()


def _runner(scenario: str) -> RunFn:
    async def run(impl: Impl, params: dict[str, Any]) -> dict[str, Any]:
        return await _one_client(impl, scenario, params)

    return run


async def _all(holders: list[ClientProcess], timeout: float, expect: str) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(h.event(timeout, expect) for h in holders)))


async def _send_all(holders: list[ClientProcess], command: dict[str, Any]) -> None:
    await asyncio.gather(*(h.send(command) for h in holders))


HoldObserver = Callable[[int, float], Awaitable[None]]
"""Called with the server PID and the hold's length when the idle hold begins."""


async def _probe(impl: Impl, url: str, pid: int, seconds: float, rate: float) -> dict[str, Any]:
    """Requests at ``rate`` per second for ``seconds`` from a client process of their own."""
    params = {"rate": rate, "seconds": seconds, "count": int(seconds * rate) + 1, "timeout": 5.0}
    probe = ClientProcess(impl, "probe", url, pid, params)
    try:
        await probe.start()
        result = await probe.event(seconds + 60, "result")
        return {k: result[k] for k in ("requests", "errors", "latency_ms")}
    finally:
        await probe.stop(10)


def _read_gc(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            stats: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return {}
    return stats


def _gc_summary(log: dict[str, Any], window: list[float] | None) -> dict[str, Any]:
    """The server's GC totals, and its pauses during the hold (when there was one)."""
    if not log:
        return {}
    out: dict[str, Any] = {"gc": log["generations"]}
    if window is not None:
        t0, t1 = window
        during = [(gen, ms) for t, gen, ms in log["pauses"] if t0 <= t <= t1]
        out["gc_hold_max_pause_ms"] = max((ms for _, ms in during), default=0.0)
        out["gc_hold_full_collections"] = sum(1 for gen, _ in during if gen == 2)
        out["gc_hold_pause_ms_total"] = sum(ms for _, ms in during)
        stalls = [(t, ms) for t, ms in log.get("stalls", []) if t0 <= t <= t1]
        long_ones = [[round(t - t0, 3), round(ms, 1)] for t, ms in stalls if ms >= 10.0]
        out["loop_hold_stalls_10ms_at"] = long_ones
        out["loop_hold_max_stall_ms"] = max((ms for _, ms in stalls), default=0.0)
        out["loop_hold_stalls_10ms"] = len(long_ones)
        out["loop_hold_stalls_2ms"] = len(stalls)
    return out


async def _idle(
    impl: Impl, params: dict[str, Any], observe: HoldObserver | None = None
) -> dict[str, Any]:
    """Open ``conns`` idle connections from several processes; measure the server.

    Server memory per connection is (RSS with them - RSS before them), the
    baseline taken after a warm-up batch was opened and closed. With
    ``hold_seconds``, they then stay idle (heartbeats running) while a probe
    client sends ``probe_rate`` requests per second and records latency; the
    same probe first runs for ``baseline_seconds`` against the server with no
    connections, as a control for the machine's own noise. The server's
    garbage-collector pauses are recorded throughout.
    """
    conns = int(params["conns"])
    per_process = int(params["per_process"])
    heartbeat = params.get("heartbeat")
    rate = float(params.get("probe_rate", 50))
    with tempfile.NamedTemporaryFile(prefix="rtchat-bench-gc-", suffix=".json") as gc_log:
        deployment = _deployment(impl, heartbeat, {GC_LOG_ENV: gc_log.name})
        holders: list[ClientProcess] = []
        try:
            await deployment.start()
            url, pid = deployment.urls[0], deployment.pids[0]
            remaining = conns
            while remaining > 0:
                n = min(per_process, remaining)
                remaining -= n
                hold = {
                    "conns": n,
                    "warmup_conns": int(params["warmup_conns"]) if not holders else 0,
                    "concurrency": int(params["concurrency"]),
                    "open_seconds": float(params["open_seconds"]),
                    "heartbeat": heartbeat,
                    "nice": int(params.get("holder_nice", 0)),
                }
                holders.append(ClientProcess(impl, "hold", url, pid, hold))
            for holder in holders:
                await holder.start()
            await _all(holders, 120, "warm")
            result: dict[str, Any] = {"conns": conns}
            baseline_seconds = float(params.get("baseline_seconds", 0))
            if baseline_seconds > 0:
                result["baseline_probe"] = await _probe(impl, url, pid, baseline_seconds, rate)
            await asyncio.sleep(0.5)
            rss_base = rss_bytes(pid)
            t0 = time.monotonic()
            await _send_all(holders, {"cmd": "go"})
            ready = await _all(holders, float(params["open_seconds"]) + 30, "ready")
            open_s = time.monotonic() - t0
            connected = sum(int(r["connected"]) for r in ready)
            await asyncio.sleep(float(params["settle"]))
            rss = rss_bytes(pid)
            result |= {
                "connected": connected,
                "failed": sum(int(r["failed"]) for r in ready),
                "open_s": open_s,
                "opened_per_s": connected / open_s if open_s > 0 else math.nan,
                "rss_base_mb": rss_base / 2**20,
                "rss_mb": rss / 2**20,
                "kb_per_conn": (rss - rss_base) / 1024 / connected if connected else math.nan,
            }
            hold_seconds = float(params.get("hold_seconds", 0))
            if hold_seconds > 0:
                cpu0 = cpu_seconds(pid)
                t_hold = time.monotonic()
                watching = asyncio.ensure_future(
                    observe(pid, hold_seconds) if observe is not None else asyncio.sleep(0)
                )
                try:
                    result["probe"] = await _probe(impl, url, pid, hold_seconds, rate)
                finally:
                    await watching
                t_end = time.monotonic()
                held = t_end - t_hold
                result["hold_window"] = [t_hold, t_end]
                result["idle_server_cpu_util"] = (cpu_seconds(pid) - cpu0) / held
                result["rss_end_mb"] = rss_bytes(pid) / 2**20
            await _send_all(holders, {"cmd": "report"})
            reports = await _all(holders, 30, "report")
            result["connected_at_end"] = sum(int(r["connected"]) for r in reports)
            result["lost"] = sum(int(r["lost"]) for r in reports)
            result["healthy"] = (
                result["connected_at_end"] == conns
                and result["lost"] == 0
                and ("probe" not in result or result["probe"]["errors"] == 0)
            )
            await _quit(holders)
            await deployment.stop()
            result |= _gc_summary(_read_gc(gc_log.name), result.pop("hold_window", None))
            return result
        finally:
            await _quit(holders)
            await deployment.stop()


async def _quit(holders: list[ClientProcess]) -> None:
    for holder in holders:
        with contextlib.suppress(Exception):
            await holder.send({"cmd": "quit"})
    await asyncio.gather(*(h.stop(40) for h in holders), return_exceptions=True)


async def _storm(impl: Impl, params: dict[str, Any]) -> dict[str, Any]:
    """Connected clients, the server restarted under them: how they come back."""
    deployment = _deployment(impl)
    holder: ClientProcess | None = None
    try:
        await deployment.start()
        hold = {
            "conns": int(params["conns"]),
            "concurrency": int(params["concurrency"]),
            "open_seconds": float(params["open_seconds"]),
            "reconnect": True,
            "storm_timeout": float(params["storm_timeout"]),
        }
        holder = ClientProcess(impl, "hold", deployment.urls[0], deployment.pids[0], hold)
        await holder.start()
        await holder.event(60, "warm")
        await holder.send({"cmd": "go"})
        ready = await holder.event(float(params["open_seconds"]) + 30, "ready")
        await asyncio.sleep(float(params["settle"]))
        t_down, t_up = await deployment.restart()
        await holder.send({"cmd": "restarted", "t_down": t_down, "t_up": t_up})
        storm = await holder.event(float(params["storm_timeout"]) + 30, "storm")
        storm.pop("event", None)
        storm["connected_before"] = ready["connected"]
        return storm
    finally:
        if holder is not None:
            with contextlib.suppress(Exception):
                await holder.send({"cmd": "quit"})
            await holder.stop(40)
        await deployment.stop()


_CPU_US = "{:,.1f}"


def _fanout(handler: str, publisher: str) -> Scenario:
    """One of the four room fan-out variants (``benchmarks/clients/fanout.py``).

    ``handler``: the receivers' callback, ``sync`` or ``async``; ``publisher``:
    ``throttled`` (at most ``window`` messages not yet received by all) or
    ``unthrottled`` (as fast as the library lets it; rtchat keeps
    ``publish_in_flight`` acknowledged publishes in flight, its client's
    ``max_in_flight`` default). Throttled, the run lasts ``seconds``;
    unthrottled, every implementation publishes the same ``messages`` (within
    ``seconds``), and the run lasts until every receiver has caught up (or
    ``timeout``, or ``stall`` seconds without a delivery).
    """
    throttled = publisher == "throttled"
    name = (
        "fanout" + ("-async" if handler == "async" else "") + ("" if throttled else "-unthrottled")
    )
    title = f"room fan-out, 1 publisher → 200 clients, {handler} handler, publisher {publisher}"
    metrics = [
        Metric("rate", "deliveries/s"),
        Metric("server_cpu_us_per_op", "server CPU µs/delivery", "{:,.2f}", False),
        Metric("client_cpu_us_per_op", "client CPU µs/delivery", "{:,.2f}", False),
    ]
    if not throttled:
        metrics.append(Metric("published_per_s", "messages published/s (flood)"))
    metrics += [
        Metric("lost", "deliveries lost", higher_is_better=False),
        Metric("out_of_order_or_repeated", "deliveries out of order or repeated", "{:,.0f}", False),
        Metric("disconnects", "receiver disconnects", higher_is_better=False),
    ]
    common = {"handler": handler, "publisher": publisher, "publish_in_flight": 1_000}
    full = {
        "receivers": 200,
        "messages": 5_000 if throttled else 1_000,
        "seconds": 5.0 if throttled else 10.0,
        "warmup": 50,
        "window": 32,
        "timeout": 60,
        "stall": 10,
    }
    quick = {
        "receivers": 20,
        "messages": 100,
        "seconds": 0.3,
        "warmup": 5,
        "window": 16,
        "timeout": 10,
        "stall": 5,
    }
    return Scenario(
        name,
        title,
        tuple(metrics),
        full=common | full,
        quick=common | quick,
        run=_runner("fanout"),
        client="fanout",
    )


_FANOUT = [_fanout(h, p) for p in ("throttled", "unthrottled") for h in ("sync", "async")]
FANOUT_SCENARIOS = tuple(s.name for s in _FANOUT)
"""``fanout``, ``fanout-async``, ``fanout-unthrottled``, ``fanout-async-unthrottled``."""

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "seq",
            "sequential request→reply, 1 client",
            (
                Metric("rate", "round trips/s"),
                Metric("latency_ms.p99", "p99 latency, ms", "{:,.2f}", higher_is_better=False),
                Metric("server_cpu_us_per_op", "server CPU µs/round trip", _CPU_US, False),
            ),
            full={"count": 200_000, "seconds": 4.0, "warmup": 300},
            quick={"count": 200, "seconds": 0.3, "warmup": 20},
            run=_runner("seq"),
        ),
        Scenario(
            "pipelined",
            "pipelined requests, 100 in flight, 1 client",
            (
                Metric("rate", "replies/s"),
                Metric("server_cpu_us_per_op", "server CPU µs/reply", _CPU_US, False),
                Metric("client_cpu_us_per_op", "client CPU µs/reply", _CPU_US, False),
            ),
            full={"count": 1_000_000, "seconds": 4.0, "warmup": 500, "window": 100},
            quick={"count": 500, "seconds": 0.3, "warmup": 50, "window": 100},
            run=_runner("pipelined"),
        ),
        *_FANOUT,
        Scenario(
            "publish",
            "acked publish to a room of 10, 100 in flight",
            (
                Metric("rate", "acked publishes/s"),
                Metric("server_cpu_us_per_op", "server CPU µs/publish", _CPU_US, False),
            ),
            full={
                "receivers": 10,
                "count": 1_000_000,
                "seconds": 4.0,
                "warmup": 200,
                "window": 100,
                "timeout": 30,
            },
            quick={
                "receivers": 3,
                "count": 300,
                "seconds": 0.3,
                "warmup": 20,
                "window": 100,
                "timeout": 10,
            },
            run=_runner("publish"),
        ),
        Scenario(
            "memory",
            "server memory per idle connection (2,000 connections)",
            (
                Metric("kb_per_conn", "KB per connection", "{:,.1f}", False),
                Metric("rss_mb", "server RSS, MB", "{:,.1f}", False),
            ),
            full={
                "conns": 2_000,
                "per_process": 2_000,
                "warmup_conns": 50,
                "concurrency": 50,
                "open_seconds": 120,
                "settle": 1.0,
            },
            quick={
                "conns": 40,
                "per_process": 40,
                "warmup_conns": 5,
                "concurrency": 20,
                "open_seconds": 20,
                "settle": 0.2,
            },
            run=_idle,
        ),
        Scenario(
            "idle10k",
            "10,000 idle connections, heartbeats every 5 s, probe 50 req/s",
            (
                Metric("probe.latency_ms.p99", "probe p99 latency, ms", "{:,.2f}", False),
                Metric("probe.latency_ms.max", "probe max latency, ms", "{:,.1f}", False),
                Metric(
                    "baseline_probe.latency_ms.p99",
                    "control: probe p99 with no connections, ms",
                    "{:,.2f}",
                    False,
                ),
                Metric(
                    "gc_hold_max_pause_ms",
                    "server's longest GC pause in the hold, ms",
                    "{:,.1f}",
                    False,
                ),
                Metric(
                    "gc_hold_full_collections",
                    "server's full GC passes in the hold",
                    "{:,.0f}",
                    False,
                ),
                Metric(
                    "loop_hold_max_stall_ms",
                    "server's longest event-loop stall in the hold, ms",
                    "{:,.1f}",
                    False,
                ),
                Metric(
                    "loop_hold_stalls_10ms",
                    "server's event-loop stalls of 10 ms or more in the hold",
                    "{:,.0f}",
                    False,
                ),
                Metric("connected_at_end", "connections up at the end"),
                Metric("lost", "connections lost", higher_is_better=False),
                Metric("healthy", "healthy (1: all up, none lost, no probe error)"),
                Metric("kb_per_conn", "KB per connection", "{:,.1f}", False),
                Metric("idle_server_cpu_util", "server CPU while idle", "{:.0%}", False),
                Metric("opened_per_s", "connections opened/s"),
            ),
            full={
                "conns": 10_000,
                "per_process": 2_500,
                "warmup_conns": 50,
                "concurrency": 100,
                "open_seconds": 240,
                "settle": 1.0,
                "heartbeat": 5.0,
                "hold_seconds": 20.0,
                "baseline_seconds": 5.0,
                "probe_rate": 50,
                "holder_nice": 10,
            },
            quick={
                "conns": 40,
                "per_process": 20,
                "warmup_conns": 5,
                "concurrency": 20,
                "open_seconds": 20,
                "settle": 0.2,
                "heartbeat": 0.5,
                "hold_seconds": 0.5,
                "baseline_seconds": 0.2,
                "probe_rate": 50,
            },
            run=_idle,
            heavy=True,
        ),
        Scenario(
            "storm",
            "reconnect storm: 1,000 clients, server restarted",
            (
                Metric("all_back_s", "s until all back (after server up)", "{:,.2f}", False),
                Metric("back_after_up_s.p50", "median s until back", "{:,.2f}", False),
                Metric("back_after_up_s.p90", "p90 s until back", "{:,.2f}", False),
                Metric("attempts.mean", "attempts per client, mean", "{:,.2f}", False),
                Metric("attempts.max", "attempts per client, max", "{:,.0f}", False),
                Metric("restart_s", "server restart took, s", "{:,.2f}", False),
            ),
            full={
                "conns": 1_000,
                "concurrency": 50,
                "open_seconds": 120,
                "settle": 1.0,
                "storm_timeout": 90,
            },
            quick={
                "conns": 20,
                "concurrency": 20,
                "open_seconds": 20,
                "settle": 0.2,
                "storm_timeout": 30,
            },
            run=_storm,
            heavy=True,
        ),
    ]
}

"""Helpers shared by the orchestrator, the servers and the client programs.

Everything here is small and dependency-free: CPU pinning, the file
descriptor limit, process CPU time and memory read from ``/proc``, JSON lines
on stdout/stdin (how client programs talk to the orchestrator), and the
measured window (``Meter``).
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CPU_ENV",
    "GC_LOG_ENV",
    "WATCH_STDIN_ENV",
    "PAYLOAD",
    "Meter",
    "cpu_seconds",
    "emit",
    "exit_with_parent",
    "gc_monitor_from_env",
    "pin_from_env",
    "percentile",
    "raise_nofile",
    "read_commands",
    "rss_bytes",
    "summary",
]

CPU_ENV = "RTCHAT_BENCH_CPU"
"""Environment variable naming the CPU a benchmark process pins itself to."""

WATCH_STDIN_ENV = "RTCHAT_BENCH_WATCH_STDIN"
"""Environment variable: "1" makes a server exit when its stdin closes."""

GC_LOG_ENV = "RTCHAT_BENCH_GC_LOG"
"""Environment variable: a file where a server writes its garbage-collector pauses at exit."""

PAYLOAD: dict[str, Any] = {
    "user": "bench-user-0042",
    "text": "the quick brown fox jumps over the lazy dog, twice over",
    "n": 0,
}
"""The application payload of every message: about 100 bytes of JSON."""


def pin_from_env() -> int | None:
    """Pin this process to the CPU named in ``RTCHAT_BENCH_CPU`` (if the OS can)."""
    value = os.environ.get(CPU_ENV)
    if not value or not hasattr(os, "sched_setaffinity"):
        return None
    cpu = int(value)
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return None
    return cpu


def gc_monitor_from_env() -> None:
    """Time every cyclic-GC pass, per generation; write the totals at exit.

    Only when ``RTCHAT_BENCH_GC_LOG`` names a file. A full (generation 2)
    collection walks every live container object, so with thousands of
    connections it is a stop-the-world pause worth knowing about.
    """
    path = os.environ.get(GC_LOG_ENV)
    if not path:
        return
    stats = {gen: {"count": 0, "total_ms": 0.0, "max_ms": 0.0} for gen in range(3)}
    pauses: list[tuple[float, int, float]] = []  # (monotonic start, generation, ms), >= 1 ms
    started: list[float] = [0.0, 0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            started[1] = time.monotonic()
            return
        ms = (time.perf_counter() - started[0]) * 1e3
        generation = info["generation"]
        entry = stats[generation]
        entry["count"] += 1
        entry["total_ms"] += ms
        entry["max_ms"] = max(entry["max_ms"], ms)
        if ms >= 1.0 and len(pauses) < 100_000:
            pauses.append((started[1], generation, ms))

    stalls: list[tuple[float, float]] = []  # (monotonic start, ms), >= 2 ms
    _watch_event_loop(stalls)

    def write() -> None:
        with open(path, "w") as f:
            json.dump(
                {
                    "generations": {str(g): e for g, e in stats.items()},
                    "pauses": pauses,
                    "stalls": stalls,
                },
                f,
            )

    gc.callbacks.append(callback)
    atexit.register(write)


STALL_TICK_S = 0.005
"""How often the loop watcher asks to run; how late it runs is the loop's stall."""


def _watch_event_loop(stalls: list[tuple[float, float]]) -> None:
    """Record every time the process's event loop ran a timer 2 ms or more late.

    A timer due every 5 ms that runs late means the loop was busy (or the
    process was not scheduled) for that long: every request arriving then
    waited as long. Installed through the event-loop policy, so the program
    under test runs unchanged.
    """

    class WatchedPolicy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            loop = super().new_event_loop()

            def tick(due: float) -> None:
                late = loop.time() - due
                if late >= 0.002 and len(stalls) < 100_000:
                    stalls.append((time.monotonic() - late, late * 1e3))
                next_due = loop.time() + STALL_TICK_S
                loop.call_at(next_due, tick, next_due)

            first = loop.time() + STALL_TICK_S
            loop.call_at(first, tick, first)
            return loop

    asyncio.set_event_loop_policy(WatchedPolicy())


def exit_with_parent() -> None:
    """SIGTERM this process when stdin closes: a server never outlives its orchestrator.

    Only under the orchestrator (``RTCHAT_BENCH_WATCH_STDIN=1``), which keeps
    the server's stdin open; if it dies (even by SIGKILL), the pipe closes
    and the server shuts down gracefully. Started by hand, a server ignores
    its stdin.
    """
    if os.environ.get(WATCH_STDIN_ENV) != "1":
        return

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def raise_nofile() -> int:
    """Raise the soft limit on open files to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, in seconds.

    The scheduler's nanosecond count (``/proc/<pid>/task/*/schedstat``) when
    the kernel keeps it, else the clock-tick count of ``/proc/<pid>/stat``.
    Returns NaN when the process is gone.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        total = 0
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / _TICKS
    except (OSError, ValueError, IndexError):
        return math.nan


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, in bytes (0 when unknown)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def emit(obj: dict[str, Any]) -> None:
    """Write one JSON line to stdout (the orchestrator reads these)."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def read_commands() -> asyncio.Queue[dict[str, Any]]:
    """Commands from the orchestrator, one JSON object per stdin line.

    A closed stdin yields ``{"cmd": "quit"}``, so a client program never
    outlives its orchestrator.
    """
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def pump() -> None:
        while True:
            line = await reader.readline()
            if not line:
                queue.put_nowait({"cmd": "quit"})
                return
            text = line.decode().strip()
            if text:
                queue.put_nowait(json.loads(text))

    task = loop.create_task(pump())
    _background.add(task)
    return queue


_background: set[asyncio.Task[None]] = set()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = math.floor(k)
    hi = math.ceil(k)
    if lo == hi:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 and max of a sample."""
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }


@dataclass(slots=True)
class Meter:
    """A measured window: wall time, operations, and CPU of server and client."""

    server_pid: int
    started: float = 0.0
    server_cpu0: float = 0.0
    client_cpu0: float = 0.0
    result: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self.server_cpu0 = cpu_seconds(self.server_pid)
        self.client_cpu0 = time.process_time()
        self.started = time.perf_counter()

    def stop(self, ops: int, unit: str = "ops") -> dict[str, float]:
        """End the window; ``ops`` operations happened in it."""
        elapsed = time.perf_counter() - self.started
        server_cpu = cpu_seconds(self.server_pid) - self.server_cpu0
        client_cpu = time.process_time() - self.client_cpu0
        per_op = 1e6 / ops if ops else math.nan
        self.result = {
            unit: ops,
            "elapsed_s": elapsed,
            "rate": ops / elapsed if elapsed > 0 else math.nan,
            "server_cpu_s": server_cpu,
            "client_cpu_s": client_cpu,
            "server_cpu_util": server_cpu / elapsed if elapsed > 0 else math.nan,
            "client_cpu_util": client_cpu / elapsed if elapsed > 0 else math.nan,
            "server_cpu_us_per_op": server_cpu * per_op,
            "client_cpu_us_per_op": client_cpu * per_op,
        }
        return self.result

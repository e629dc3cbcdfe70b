"""Scale-out on Redis: what a delivery and a request cost across nodes, node and Redis side.

    .venv/bin/python -m benchmarks.scaleout [--quick] [--seconds 4] [--receivers 100]
        [--runs 3] [--json out.json]

Starts its own ``redis-server`` on a free port (no persistence, nothing else
on it, so its counters are this run's alone) and ``rtchat-server`` processes
pinned to CPU 0; the clients run in this process, pinned to CPU 1. Cases,
each on fresh servers:

* ``fanout-memory``: one node, in-memory broker; 1 publisher, ``receivers``
  receivers, at most ``window`` messages not yet received by all;
* ``fanout-redis-1``: the same on one node with the Redis broker;
* ``fanout-redis-2``: two nodes on one Redis; the publisher on node A, the
  receivers split evenly over A and B;
* ``requests-memory`` / ``requests-redis``: pipelined requests (100 in
  flight) to the built-in ``echo`` handler on one node.

For each: deliveries (or replies) per second, server CPU µs per delivery
(all nodes), and for Redis, per published message (or per request), from
``INFO`` before and after: its CPU µs, the Lua script calls (``EVALSHA``),
the commands it ran (those inside scripts included) and network bytes.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from benchmarks.common import PAYLOAD, cpu_seconds, raise_nofile
from benchmarks.procs import ROOT, _env, _stop, client_cpu, server_cpu
from rtchat_sdk import Client

__all__ = ["main"]

CASES = ("fanout-memory", "fanout-redis-1", "fanout-redis-2", "requests-memory", "requests-redis")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def _redis_server() -> AsyncIterator[tuple[str, int]]:
    """Our own redis-server: (url, pid)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        stdout=asyncio.subprocess.DEVNULL,
        env=_env(server_cpu()),
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    await client.ping()
                    break
                except (OSError, RedisError):  # still starting
                    await asyncio.sleep(0.02)
        yield url, proc.pid
    finally:
        await client.aclose()
        await _stop(proc, 5.0)


@contextlib.asynccontextmanager
async def _nodes(count: int, redis_url: str | None) -> AsyncIterator[list[tuple[str, int]]]:
    """``count`` rtchat-server processes: [(url, pid)]."""
    procs: list[asyncio.subprocess.Process] = []
    nodes: list[tuple[str, int]] = []
    try:
        for _ in range(count):
            args = ["--port", "0", "--log-level", "ERROR"]
            if redis_url is not None:
                args += ["--redis", redis_url, "--redis-prefix", "bench"]
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.servers.rtchat_server",
                *args,
                stdout=asyncio.subprocess.PIPE,
                env=_env(server_cpu()),
                cwd=ROOT,
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            if "ws://" not in line:
                raise SystemExit(f"server did not start: {line!r}")
            nodes.append((line[line.index("ws://") :].split()[0], proc.pid))
        yield nodes
    finally:
        for proc in procs:
            await _stop(proc, 10.0)


async def _redis_counters(url: str | None) -> dict[str, float]:
    if url is None:
        return {}
    client = Redis.from_url(url, decode_responses=True)
    try:
        info = await client.info()
        scripts = (await client.info("commandstats")).get("cmdstat_evalsha", {"calls": 0})
    finally:
        await client.aclose()
    return {
        "cpu": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        "scripts": float(scripts["calls"]),
        "commands": float(info["total_commands_processed"]),
        "bytes_in": float(info["total_net_input_bytes"]),
        "bytes_out": float(info["total_net_output_bytes"]),
    }


async def _fanout(nodes: list[tuple[str, int]], receivers: int, seconds: float) -> dict[str, Any]:
    """Publisher on the first node; receivers spread over all nodes; ``window`` unreceived."""
    window = 32
    got = [0] * receivers
    changed = asyncio.Event()
    clients: list[Client] = []

    def counter(i: int) -> Callable[[Any], None]:
        def on_message(data: Any) -> None:
            got[i] += 1
            changed.set()

        return on_message

    for i in range(receivers):
        client = Client(nodes[i % len(nodes)][0])
        client.on("m")(counter(i))
        await client.connect()
        await client.join("bench")
        clients.append(client)
    publisher = Client(nodes[0][0])
    await publisher.connect()
    await publisher.join("bench")
    sent = 0

    async def until_received(count: int) -> None:
        while min(got) < count:
            changed.clear()
            await changed.wait()

    async def publish_for(duration: float) -> None:
        nonlocal sent
        end = time.perf_counter() + duration
        pending: set[asyncio.Task[int]] = set()
        while time.perf_counter() < end:
            if sent - min(got) >= window:
                await until_received(sent - window + 1)
                continue
            sent += 1
            pending.add(asyncio.ensure_future(publisher.publish("bench", "m", PAYLOAD)))
            if len(pending) >= window:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
        await asyncio.wait_for(until_received(sent), 60)

    try:
        await publish_for(min(1.0, seconds / 4))  # warm-up
        counted_from = sent
        before = {pid: cpu_seconds(pid) for _, pid in nodes}
        started = time.perf_counter()
        await publish_for(seconds)
        elapsed = time.perf_counter() - started
        node_cpu = sum(cpu_seconds(pid) - before[pid] for _, pid in nodes)
        published = sent - counted_from
        deliveries = published * receivers
        return {
            "published": published,
            "deliveries": deliveries,
            "rate": deliveries / elapsed,
            "node_cpu_us_per_delivery": node_cpu / deliveries * 1e6,
            "per_published": published,
        }
    finally:
        for client in [*clients, publisher]:
            await client.close()


async def _requests(nodes: list[tuple[str, int]], seconds: float) -> dict[str, Any]:
    window = 100
    async with Client(nodes[0][0]) as client:

        async def run_for(duration: float) -> int:
            done = 0
            end = time.perf_counter() + duration

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < end:
                    await client.request("echo", PAYLOAD, timeout=30)
                    done += 1

            await asyncio.gather(*(worker() for _ in range(window)))
            return done

        await run_for(min(1.0, seconds / 4))
        pid = nodes[0][1]
        before = cpu_seconds(pid)
        started = time.perf_counter()
        replies = await run_for(seconds)
        elapsed = time.perf_counter() - started
        return {
            "replies": replies,
            "rate": replies / elapsed,
            "node_cpu_us_per_reply": (cpu_seconds(pid) - before) / replies * 1e6,
            "per_published": replies,
        }


async def _case(name: str, redis_url: str, seconds: float, receivers: int) -> dict[str, Any]:
    kind, broker = name.split("-", 1)
    uses_redis = broker.startswith("redis")
    count = 2 if broker == "redis-2" else 1
    url = redis_url if uses_redis else None
    async with _nodes(count, url) as nodes:
        before = await _redis_counters(url)
        if kind == "fanout":
            result = await _fanout(nodes, receivers, seconds)
        else:
            result = await _requests(nodes, seconds)
        after = await _redis_counters(url)
    per = result.pop("per_published")
    for key, value in before.items():
        # Counted over warm-up and measurement together: per message of the whole run.
        total = per * (1 + min(1.0, seconds / 4) / seconds)
        scale = 1e6 if key == "cpu" else 1
        result[f"redis_{key}_per_msg"] = (after[key] - value) * scale / total
    return result


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    cpu = client_cpu()
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    results: dict[str, list[dict[str, Any]]] = {case: [] for case in args.cases}
    async with _redis_server() as (redis_url, _):
        for _ in range(args.runs):
            for case in args.cases:  # cases take turns: noise spreads over all of them
                results[case].append(await _case(case, redis_url, args.seconds, args.receivers))
    return results


def _render(results: dict[str, list[dict[str, Any]]]) -> str:
    keys = [
        ("rate", "{:,.0f}"),
        ("node_cpu_us_per_delivery", "{:,.2f}"),
        ("node_cpu_us_per_reply", "{:,.2f}"),
        ("redis_cpu_per_msg", "{:,.1f}"),
        ("redis_scripts_per_msg", "{:,.2f}"),
        ("redis_commands_per_msg", "{:,.2f}"),
        ("redis_bytes_in_per_msg", "{:,.0f}"),
        ("redis_bytes_out_per_msg", "{:,.0f}"),
    ]
    lines = ["| case | " + " | ".join(k for k, _ in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for case, runs in results.items():
        cells = []
        for key, fmt in keys:
            values = [r[key] for r in runs if key in r]
            cells.append(fmt.format(statistics.median(values)) if values else "")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--receivers", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.cases = args.cases.split(",")
    if args.quick:
        args.seconds, args.receivers, args.runs = 0.3, 6, 1
    results = asyncio.run(_main(args))
    print(_render(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    print(
        "medians of", args.runs, "runs; redis_cpu_per_msg in µs; per published message or request"
    )


if __name__ == "__main__":
    main()

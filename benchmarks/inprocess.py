"""The server's cost per message without sockets: hub and driver fed frames in one process.

    .venv/bin/python -m benchmarks.inprocess [--chunks 15] [--per-chunk 2000]

A ``Server`` (not listening) gets connections through stub transports that
keep what is written, and frames through ``Endpoint.received``, as the
WebSocket transport would hand them over. Each figure is the CPU time
(``time.process_time``) per frame, best of the chunks: the steadiest guide
on a noisy machine to what the hub and driver cost, with the kernel, the
event loop's polling and websockets' framing left out.

* ``request``: a request to a sync handler that returns its data;
* ``request-async``: the same to an ``async def`` handler;
* ``publish-10``: an acked publish to a room of 10 members (one is the
  publisher), each delivery written to 9 transports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from server_ref import Context, Server, ServerConfig
from server_ref.transports.base import Transport

__all__ = ["main"]


class _Kept(Transport):
    """A transport that keeps nothing but a count: the cheapest honest sink."""

    def __init__(self) -> None:
        self.frames = 0

    def write(self, data: bytes) -> None:
        self.frames += 1

    def pending_bytes(self) -> int:
        return 0

    async def close(self, code: int, reason: str) -> None:
        return None

    def abort(self) -> None:
        return None


async def _connect(server: Server) -> tuple[int, _Kept]:
    transport = _Kept()
    conn = server.opened(transport)
    await server.received(conn, json.dumps({"type": "hello", "protocol": 1}))
    return conn, transport


async def _best(chunks: int, per_chunk: int, frame: Callable[[int], Awaitable[None]]) -> float:
    """Best CPU µs per frame over the chunks; ``frame(i)`` sends message number ``i``."""
    best = float("inf")
    i = 0
    for _ in range(chunks):
        start = time.process_time()
        for _ in range(per_chunk):
            i += 1
            await frame(i)
        best = min(best, (time.process_time() - start) / per_chunk * 1e6)
    return best


async def _measure(chunks: int, per_chunk: int) -> dict[str, float]:
    server = Server(ServerConfig(rate_per_second=1e9, rate_burst=1_000_000_000))  # no rate cap

    @server.on("echo")
    def echo(ctx: Context, data: Any) -> Any:
        return data

    @server.on("echo-async")
    async def echo_async(ctx: Context, data: Any) -> Any:
        return data

    results: dict[str, float] = {}
    conn, sink = await _connect(server)

    async def request(i: int) -> None:
        await server.received(conn, f'{{"type":"request","id":{i},"event":"echo","data":{i}}}')

    results["request"] = await _best(chunks, per_chunk, request)

    base = chunks * per_chunk + 1

    async def request_async(i: int) -> None:
        n = base + i
        await server.received(conn, f'{{"type":"request","id":{n},"event":"echo-async","data":1}}')

    results["request-async"] = await _best(chunks, per_chunk, request_async)

    members = [await _connect(server) for _ in range(10)]
    for member, _ in members:
        await server.received(member, '{"type":"join","id":1,"room":"r"}')
    publisher = members[0][0]

    async def publish(i: int) -> None:
        n = i + 1
        await server.received(
            publisher, f'{{"type":"publish","id":{n},"room":"r","event":"m","data":{i}}}'
        )

    results["publish-10"] = await _best(chunks, per_chunk, publish)
    n = chunks * per_chunk
    # Each sent a welcome and a join reply first; then a reply or delivery per frame.
    got = [sink.frames] + [t.frames for _, t in members]
    if got != [1 + 2 * n] + [2 + n] * 10:
        raise RuntimeError(f"frames went missing or were added: {got}")
    await server.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=15)
    parser.add_argument("--per-chunk", type=int, default=2000)
    args = parser.parse_args(argv)
    results = asyncio.run(_measure(args.chunks, args.per_chunk))
    best_of = f"best of {args.chunks} chunks of {args.per_chunk}"
    for name, micros in results.items():
        print(f"{name:14} {micros:6.2f} µs CPU per frame ({best_of})")


if __name__ == "__main__":
    main()

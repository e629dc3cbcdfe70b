"""The raw websockets baseline server: echo, rooms and ``broadcast()``.

``python -m benchmarks.servers.ws_server --port 0 [--compression deflate]``

* ``/echo``: every message is sent back unchanged — the least a server can do.
* ``/room``: JSON messages ``{"t": "join", "id", "room"}`` and
  ``{"t": "pub", "id", "room", "d"}``; a publish is encoded once and written
  to every other member with ``websockets.broadcast``; both are acknowledged
  with ``{"t": "ack", "id"}``.

Prints ``listening on ws://HOST:PORT`` once bound; SIGTERM closes every
connection with 1001 and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Literal

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from benchmarks.common import (
    exit_with_parent,
    gc_monitor_from_env,
    pin_from_env,
    raise_nofile,
)

__all__ = ["main"]


async def _serve(args: argparse.Namespace) -> int:
    rooms: dict[str, set[ServerConnection]] = {}

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async def room(ws: ServerConnection) -> None:
        joined: list[str] = []
        try:
            async for message in ws:
                frame = json.loads(message)
                kind = frame["t"]
                if kind == "pub":
                    name = frame["room"]
                    members = rooms.get(name, ())
                    text = json.dumps({"t": "msg", "room": name, "d": frame["d"]})
                    broadcast([c for c in members if c is not ws], text)
                elif kind == "join":
                    name = frame["room"]
                    rooms.setdefault(name, set()).add(ws)
                    joined.append(name)
                await ws.send(json.dumps({"t": "ack", "id": frame["id"]}))
        finally:
            for name in joined:
                rooms.get(name, set()).discard(ws)

    async def handler(ws: ServerConnection) -> None:
        try:
            if ws.request is not None and ws.request.path.startswith("/room"):
                await room(ws)
            else:
                await echo(ws)
        except ConnectionClosed:
            pass

    compression: Literal["deflate"] | None = "deflate" if args.compression == "deflate" else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        handler,
        args.host,
        args.port,
        compression=compression,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        max_size=1024 * 1024,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"listening on ws://{args.host}:{port}", flush=True)
        await stop.wait()
        server.close()  # closes every connection with 1001 going away
        await server.wait_closed()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ws_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--compression", choices=["none", "deflate"], default="none")
    parser.add_argument("--ping-interval", type=float, default=20.0)
    parser.add_argument("--ping-timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    pin_from_env()
    raise_nofile()
    gc_monitor_from_env()
    exit_with_parent()
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())

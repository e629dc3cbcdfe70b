"""The python-socketio baseline server, on aiohttp, websocket transport only.

``python -m benchmarks.servers.sio_server --port 0``

Events (each answered through Socket.IO's ack): ``echo`` returns its data,
``join`` enters a room, ``publish`` emits ``msg`` to a room
(``emit(room=, skip_sid=)``, the sender excluded).

Prints ``listening on ws://HOST:PORT`` once bound; SIGTERM shuts down
(aiohttp drops every websocket after a 0.25 s grace) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import socketio  # type: ignore[import-untyped,import-not-found,unused-ignore]
from aiohttp import web  # type: ignore[import-not-found,unused-ignore]

from benchmarks.common import (
    exit_with_parent,
    gc_monitor_from_env,
    pin_from_env,
    raise_nofile,
)

__all__ = ["main"]


async def _serve(args: argparse.Namespace) -> int:
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        transports=["websocket"],
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        logger=False,
        engineio_logger=False,
    )
    app = web.Application()
    sio.attach(app)

    async def echo(sid: str, data: Any) -> Any:
        return data

    async def join(sid: str, room: str) -> bool:
        await sio.enter_room(sid, room)
        return True

    async def publish(sid: str, data: dict[str, Any]) -> bool:
        await sio.emit("msg", data["d"], room=data["room"], skip_sid=sid)
        return True

    sio.on("echo", echo)
    sio.on("join", join)
    sio.on("publish", publish)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A short shutdown: aiohttp then cancels the websocket handlers and drops the
    # connections, which socketio clients treat as a lost link and reconnect.
    # (A Socket.IO-level disconnect would tell them not to come back.)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.25)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port, reuse_address=True)
        await site.start()
        port = runner.addresses[0][1]
        print(f"listening on ws://{args.host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sio_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ping-interval", type=float, default=25.0)
    parser.add_argument("--ping-timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    pin_from_env()
    raise_nofile()
    gc_monitor_from_env()
    exit_with_parent()
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())

"""rtchat's ASGI app under uvicorn, as a benchmark server.

``python -m benchmarks.servers.rtchat_asgi_server --host 127.0.0.1 --port 0``

The same server as ``rtchat_server`` (an ``echo`` handler, the in-memory
broker, the harness's heartbeat flags), served by uvicorn through ``server_ref.asgi`` instead of
websockets' own server: WebSocket over ASGI messages, and HTTP long polling
at ``/poll``. Pinned and limited as the other servers; prints ``rtchat server
listening on ws://HOST:PORT`` once bound; exits on SIGTERM (uvicorn's
graceful shutdown) or when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from benchmarks.common import exit_with_parent, gc_monitor_from_env, pin_from_env, raise_nofile

__all__ = ["main"]


async def _serve(host: str, port: int, interval: float, timeout: float) -> None:
    import uvicorn

    from server_ref import Server, ServerConfig
    from server_ref.asgi import create_app

    limits = ServerConfig(
        heartbeat_interval=interval,
        heartbeat_timeout=timeout,
        rate_per_second=1e9,  # as rtchat_server.py: one connection's speed is measured
        rate_burst=1_000_000_000,
    )
    server_ref = Server(limits)
    server_ref.on("echo")(lambda ctx, data: data)
    app = create_app(server_ref)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="error", lifespan="on", ws_max_size=1 << 21
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn sets a flag)
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    print(f"rtchat server listening on ws://{host}:{bound}", flush=True)
    await task


def main(argv: list[str] | None = None) -> int:
    pin_from_env()
    raise_nofile()
    gc_monitor_from_env()
    exit_with_parent()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--heartbeat-interval", type=float, default=20.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    args, _ = parser.parse_known_args(argv)  # the harness's --log-level: uvicorn's is error
    asyncio.run(_serve(args.host, args.port, args.heartbeat_interval, args.heartbeat_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""rtchat as an ASGI 3 application: ``uvicorn server_ref.asgi:app``, or mounted in FastAPI.

``create_app(server)`` serves ``server``'s endpoints (``transports/asgi.py``):
WebSocket connections on any path, HTTP long polling at ``/poll``
(``transports/polling.py``, PROTOCOL §1.1), ``GET /healthz`` and ``GET /readyz``.
Mounted under a prefix (``app.mount("/rt", create_app(server))``), clients
connect to ``ws://host/rt/`` and health is at ``/rt/healthz``.

Lifespan: the app opens the server (its broker) on ``lifespan.startup`` and
closes it on ``lifespan.shutdown``. Starlette and FastAPI do not pass
lifespan events to mounted apps, so the app also opens the server on its
first request; close it from the parent's lifespan (``await server.close()``,
or ``lifespan=rtchat_app.lifespan`` in ``FastAPI(...)``).

``app`` is the command line's server as an ASGI app: the built-in ``echo``
handler, the in-memory broker, or Redis when ``REDIS_URL`` is set
(``RTCHAT_REDIS_PREFIX`` for its prefix); ``RTCHAT_REQUEST_TIMING_EVERY`` sets
``ServerConfig.request_timing_every``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from rtchat_sdk import protocol as p

from .app import Context
from .config import ServerConfig
from .server import Server
from .transports.addresses import scope_address
from .transports.asgi import Receive, Scope, Send, serve_http, serve_websocket
from .transports.base import Endpoint, Listener, bearer_token
from .transports.origins import origin_allowed, origin_of
from .transports.polling import Polling

__all__ = ["RtchatApp", "UvicornListener", "app", "create_app", "uvicorn_listener"]


class RtchatApp:
    """The ASGI application of one ``Server``."""

    def __init__(self, server: Server, *, websocket: bool = True) -> None:
        self.server = server
        self.websocket = websocket
        """False: refuse WebSocket upgrades (403), as some proxies do; polling still works."""
        self._opening = asyncio.Lock()
        self.polling = Polling(server, server.config)
        """HTTP long polling at ``/poll`` (PROTOCOL §1.1)."""
        self._mirror: asyncio.Task[None] | None = None
        """With ``PROMETHEUS_MULTIPROC_DIR`` set (workers): copies this worker's metrics
        to its files there (``metrics.mirror_forever``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        await self._open()
        if kind == "websocket":
            origin = origin_of(scope.get("headers", ()))
            if not self.websocket or not origin_allowed(self.server.config.allowed_origins, origin):
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008})  # the server answers 403
                return
            await serve_websocket(
                self.server,
                receive,
                send,
                self.server.config.max_frame_bytes,
                bearer=bearer_token(scope.get("headers", [])),
                address=scope_address(scope, self.polling.trusted),
            )
        elif kind == "http":
            await serve_http(
                self.server,
                scope,
                receive,
                send,
                self.polling,
                allowed_origins=self.server.config.allowed_origins,
            )

    async def _open(self) -> None:
        if self.server.not_ready() == "not started":
            async with self._opening:
                await self.server.open()
                if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and self.server.config.metrics:
                    from .metrics import mirror_forever  # prometheus_client only then

                    self._mirror = asyncio.create_task(mirror_forever(self.server))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._open()
                except Exception as exc:  # e.g. Redis unreachable: the ASGI server stops
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def close(self) -> None:
        """Close the server (held polls get its goodbye), then the polling connections."""
        await self.server.close()
        await self.polling.close_all()
        if self._mirror is not None:
            self._mirror.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._mirror

    @contextlib.asynccontextmanager
    async def lifespan(self, parent: Any = None) -> AsyncIterator[None]:
        """For a parent app's lifespan (``FastAPI(lifespan=rtchat_app.lifespan)``)."""
        await self._open()
        try:
            yield
        finally:
            await self.close()


def create_app(server: Server, *, websocket: bool = True) -> RtchatApp:
    """An ASGI app serving ``server`` (not started: the app opens it).

    ``websocket=False`` refuses WebSocket upgrades, leaving long polling (for tests
    of the fallback, or a deployment whose proxies break WebSockets).
    """
    return RtchatApp(server, websocket=websocket)


def _echo(ctx: Context, data: Any) -> Any:
    return data


def _default_server() -> Server:
    broker = None
    url = os.environ.get("REDIS_URL")
    if url:
        from .broker.redis import RedisBroker

        broker = RedisBroker(url, prefix=os.environ.get("RTCHAT_REDIS_PREFIX", "rtchat"))
    every = os.environ.get("RTCHAT_REQUEST_TIMING_EVERY")
    config = None
    if every:
        if not every.isdigit():
            raise ValueError(f"RTCHAT_REQUEST_TIMING_EVERY must be a whole number, got {every!r}")
        config = ServerConfig(request_timing_every=int(every))  # (0 refused there)
    server = Server(config, broker=broker)
    server.namespace(p.DEFAULT_NAMESPACE).on("echo")(_echo)
    return server


app = create_app(_default_server())
"""``uvicorn server_ref.asgi:app``: the command line's server (``echo``), as ASGI."""


class UvicornListener(Listener):
    """``Server(transport=uvicorn_listener)``: the server's own port served by uvicorn
    through this app, so WebSocket, long polling and health share one port
    (``rtchat-server --asgi``)."""

    def __init__(self, server: Server) -> None:
        self._app = RtchatApp(server)
        self._uvicorn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._port: int | None = None

    async def start(self, host: str, port: int) -> None:
        import uvicorn  # only for those who serve through it

        config = uvicorn.Config(
            self._app,
            host=host,
            port=port,
            lifespan="off",  # the Server starts and stops itself
            log_level="warning",
            ws_max_size=self._app.server.config.max_frame_bytes,
            ws_ping_interval=None,  # rtchat's heartbeats run at the app level
        )
        config.load()  # then uvicorn listens with our TLS context, if any (not loaded again)
        config.ssl = self._app.server.config.server_ssl()
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn.capture_signals = contextlib.nullcontext  # the command line owns signals
        self._task = asyncio.create_task(self._uvicorn.serve(), name="rtchat-uvicorn")
        while not self._uvicorn.started:
            if self._task.done():
                self._task.result()  # raises why it could not start (address in use...)
                raise OSError(f"uvicorn did not start on {host}:{port}")
            await asyncio.sleep(0.01)
        self._port = self._uvicorn.servers[0].sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server is not started")
        return self._port

    def stop_accepting(self) -> None:
        return None  # uvicorn stops accepting when it exits, in wait_closed

    async def wait_closed(self) -> None:
        await self._app.polling.close_all()
        if self._uvicorn is not None and self._task is not None:
            self._uvicorn.should_exit = True
            await self._task


def uvicorn_listener(endpoint: Endpoint, config: ServerConfig) -> Listener:
    """A ``ListenerFactory``: the ASGI app under uvicorn (the endpoint is the ``Server``)."""
    if not isinstance(endpoint, Server):
        raise TypeError("uvicorn_listener serves a Server")
    return UvicornListener(endpoint)

"""Plain HTTP on the WebSocket port: long polling, health and the browser client beside
WebSocket, on one host and port.

websockets' server reads only a request head (a WebSocket handshake has no
body), so it cannot take a long-polling POST. Each accepted socket therefore
starts as a ``FrontConnection``, which reads the first request head before
websockets sees it:

* a WebSocket upgrade (``Upgrade: websocket``) goes to the websockets
  ``ServerConnection`` made for it then, with the bytes read so far, so the
  WebSocket path is exactly websockets' own after one header check;
* any other request hands the socket to an ``HttpConnection``: h11 parses
  the requests (keep-alive included, one at a time), and each is answered by
  the same ASGI code the ASGI app uses (``asgi.serve_http``: ``/poll``, the
  endpoint's GET paths, 404), so every HTTP endpoint is written once.

With TLS (``ServerConfig.certfile``), the socket is asyncio's TLS transport:
the front reads decrypted bytes and hands the same transport on.

A socket whose first byte cannot start an HTTP method (a TLS hello sent to a
plain port) gets 400 and a close at once; one that sends no complete request
head within ``handshake_timeout`` (on connecting, or idle between keep-alive
requests) is closed; a head over
``MAX_HEAD_BYTES`` gets 431, a body over ``max_frame_bytes`` 413, a request
h11 cannot parse 400, each followed by a close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import h11
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection
from websockets.server import ServerProtocol

from ..config import ServerConfig
from .asgi import Message, Scope, serve_http
from .base import Endpoint
from .polling import Polling

__all__ = ["MAX_HEAD_BYTES", "FrontConnection", "HttpConnection", "HttpService", "front_for"]

log = logging.getLogger("server_ref")

MAX_HEAD_BYTES = 16 * 1024
"""A request line and headers larger than this are refused (431)."""

_STOP_WAIT = 5.0
"""Seconds ``HttpService.close`` waits for requests in progress before dropping them."""


class HttpService:
    """The plain HTTP side of one listener: its long-polling connections and sockets."""

    def __init__(self, endpoint: Endpoint, config: ServerConfig) -> None:
        self.endpoint = endpoint
        self.polling = Polling(endpoint, config)
        self.max_body_bytes = config.max_frame_bytes
        self.idle_timeout = config.handshake_timeout
        self.allowed_origins = config.allowed_origins
        self.connections: set[HttpConnection] = set()

    async def close(self) -> None:
        """Answer held polls and end the polling connections, then close every socket."""
        await self.polling.close_all()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_WAIT)
        for connection in list(self.connections):
            connection.close()


class HttpConnection(asyncio.Protocol):
    """One socket of plain HTTP/1.1 requests, parsed by h11 and answered in order."""

    def __init__(self, service: HttpService) -> None:
        self._service = service
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._transport: asyncio.Transport | None = None
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._idle: asyncio.TimerHandle | None = None
        self._lost = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        """The request being answered, if any (the next is read after it)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._service.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self._h11.receive_data(data)
        if self.task is None:
            self._next()

    def eof_received(self) -> bool | None:
        self._h11.receive_data(b"")
        if self.task is None:
            self._next()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.set()
        self._service.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self._service.idle_timeout, self.close)

    def _next(self) -> None:
        """Read events until a whole request is in, then answer it."""
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc.error_status_hint, str(exc))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if self._idle is not None:
                    self._idle.cancel()
                self._request = event
                self._body.clear()
                length = _content_length(event)
                if length is not None and length > self._service.max_body_bytes:
                    self._refuse(413, f"body over max_frame_bytes ({self._service.max_body_bytes})")
                    return
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._service.max_body_bytes:
                    self._refuse(413, f"body over max_frame_bytes ({self._service.max_body_bytes})")
                    return
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None
                request, body = self._request, bytes(self._body)
                self.task = asyncio.create_task(self._answer(request, body), name="rtchat-http")
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    async def _answer(self, request: h11.Request, body: bytes) -> None:
        """Answer one request through the ASGI code, then read the next."""
        head: dict[str, Any] = {}
        chunks: list[bytes] = []
        unread = [body]

        async def receive() -> Message:
            if unread:
                return {"type": "http.request", "body": unread.pop(), "more_body": False}
            await self._lost.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                head.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        try:
            await serve_http(
                self._service.endpoint,
                _scope(request, self._transport),
                receive,
                send,
                self._service.polling,
                allowed_origins=self._service.allowed_origins,
            )
            self._respond(request, head.get("status", 500), head.get("headers", []), chunks)
        except Exception:
            log.exception("HTTP request failed: %s %s", request.method, request.target)
            self._refuse(500, "internal error")
        finally:
            self.task = None
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._arm_idle()
            self._next()
        elif self._h11.our_state is h11.MUST_CLOSE or self._h11.their_state is h11.MUST_CLOSE:
            self.close()

    def _respond(
        self,
        request: h11.Request,
        status: int,
        headers: list[tuple[bytes, bytes]],
        chunks: list[bytes],
    ) -> None:
        if self._lost.is_set() or self._transport is None:
            return
        response = h11.Response(status_code=status, headers=headers, reason=_reason(status))
        out = self._h11.send(response)
        if request.method != b"HEAD":
            out += self._h11.send(h11.Data(data=b"".join(chunks)))
        out += self._h11.send(h11.EndOfMessage())
        self._transport.write(out)

    def _refuse(self, status: int, reason: str) -> None:
        """Answer an error and close: the rest of what the socket sends is not read."""
        if self._transport is None or self._lost.is_set():
            return
        payload = ('{"error": "' + reason.replace('"', "'") + '"}').encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                response = h11.Response(status_code=status, headers=headers, reason=_reason(status))
                self._transport.write(self._h11.send(response) + payload)
        self._transport.close()


def _reason(status: int) -> bytes:
    with contextlib.suppress(ValueError):
        return HTTPStatus(status).phrase.encode()
    return b""


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def _scope(request: h11.Request, transport: asyncio.Transport | None) -> Scope:
    """The ASGI ``http`` scope of an h11 request."""
    target = request.target
    path, _, query = target.partition(b"?")
    peer = None if transport is None else transport.get_extra_info("peername")
    local = None if transport is None else transport.get_extra_info("sockname")
    ssl = None if transport is None else transport.get_extra_info("sslcontext")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": request.http_version.decode(),
        "method": request.method.decode(),
        "scheme": "http" if ssl is None else "https",
        "path": path.decode("utf-8", "replace"),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": list(request.headers),
        "client": peer[:2] if peer else None,
        "server": local[:2] if local else None,
    }


class FrontConnection(asyncio.Protocol):
    """A new socket, until its first request head says what it is: an upgrade becomes
    the websockets ``ServerConnection`` made for it, anything else an ``HttpConnection``.

    It is a protocol of its own, not a ``ServerConnection`` subclass, so that a
    WebSocket connection, once handed over, is exactly websockets' object (with
    no attribute of ours in it: 1.6 KB per connection, measured, when there were).
    """

    __slots__ = ("_head", "_make_websocket", "_service", "_socket", "_timer", "_timer_seconds")

    def __init__(
        self,
        make_websocket: Callable[[], ServerConnection],
        service: HttpService,
        head_timeout: float,
    ) -> None:
        self._make_websocket = make_websocket
        self._service = service
        self._head = bytearray()
        self._socket: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_seconds = head_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._socket = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timer_seconds, transport.abort)

    def data_received(self, data: bytes) -> None:
        socket = self._socket
        assert socket is not None
        head = self._head
        head += data
        if not head[:1].isalpha():  # no HTTP method: a TLS hello to a plain port, or noise
            self._stop()
            socket.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            socket.close()
            return
        end = head.find(b"\r\n\r\n")
        if (end < 0 and len(head) > MAX_HEAD_BYTES) or end > MAX_HEAD_BYTES:
            self._stop()
            socket.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
            socket.close()
            return
        if end < 0:
            return
        received = bytes(head)
        self._stop()
        successor: asyncio.Protocol
        if _is_upgrade(received[:end]):
            successor = self._make_websocket()
        else:
            successor = HttpConnection(self._service)
        socket.set_protocol(successor)
        successor.connection_made(socket)
        successor.data_received(received)

    def eof_received(self) -> None:
        self._stop()  # returning None: the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()

    def _stop(self) -> None:
        self._head.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _is_upgrade(head: bytes) -> bool:
    """The request head asks for a WebSocket (``Upgrade: websocket``)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


def front_for(service: HttpService, config: ServerConfig) -> type[ServerConnection]:
    """The ``create_connection`` for websockets' ``serve``: each socket starts as a
    ``FrontConnection`` holding what websockets would have built for it."""

    def create(protocol: ServerProtocol, server: WsServer, **options: Any) -> FrontConnection:
        def make_websocket() -> ServerConnection:
            return ServerConnection(protocol, server, **options)

        return FrontConnection(make_websocket, service, config.handshake_timeout)

    # websockets calls it as it would call a ServerConnection subclass (same arguments).
    return cast("type[ServerConnection]", create)

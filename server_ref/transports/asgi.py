"""The ASGI transport: rtchat's WebSocket and HTTP endpoints as ASGI 3 messages.

An ASGI server (uvicorn, hypercorn) or framework (FastAPI, Starlette) owns
the socket and the HTTP parsing; this module turns its ``websocket.*`` and
``http.*`` messages into the server's ``Endpoint`` calls, as
``websocket.py`` does for websockets' own server:

* a ``websocket`` scope is one connection: ``websocket.receive`` texts go to
  ``Endpoint.received`` one at a time (the next is read after it returns);
  what the server writes in one event-loop pass leaves in one
  ``websocket.send`` per frame, or per batch when the client asked for
  batches, from a writer task; ``close(code, reason)`` sends
  ``websocket.close``;
* an ``http`` request to ``/poll`` is long polling (``polling.py``, PROTOCOL
  §1.1); a GET elsewhere goes to ``Endpoint.http_get`` (health); the mount
  prefix (``root_path``) is taken off the path first; other paths get 404;
  a request from a page whose ``Origin`` is not allowed gets 403, an allowed
  one its CORS headers and its preflight answered (``origins.py``).

Frames larger than ``max_frame_bytes`` close the connection with 1009, as
the WebSocket transport's library does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from rtchat_sdk import protocol as p

from .addresses import scope_address
from .base import Endpoint, Transport, bearer_token
from .origins import cors_headers, origin_allowed, origin_of, preflight_headers
from .polling import Polling, Reply

__all__ = ["AsgiWebSocketTransport", "Receive", "Scope", "Send", "serve_http", "serve_websocket"]

log = logging.getLogger("server_ref")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_HIGH_WATER = 1 << 20
"""Unsent bytes past which the reader waits for the writer before reading on."""


def request_path(scope: Scope) -> str:
    """The path below the mount point (``root_path``), whichever way the server sets it."""
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


class AsgiWebSocketTransport(Transport):
    """One ASGI WebSocket connection; a writer task sends what each loop pass wrote."""

    kind = "asgi-websocket"

    def __init__(self, send: Send, max_frame_bytes: int) -> None:
        self._send = send
        self._max_frame_bytes = max_frame_bytes
        self.batching = False
        self._queue: list[bytes] = []
        self._unsent = 0
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing: tuple[int, str] | None = None
        self._done = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="rtchat-asgi-writer")

    def write(self, data: bytes) -> None:
        if self._closing is not None or self._done.is_set():
            return
        self._queue.append(data)
        self._unsent += len(data)
        self._drained.clear()
        self._wakeup.set()

    def pending_bytes(self) -> int:
        return self._unsent

    async def close(self, code: int, reason: str) -> None:
        if self._closing is None:
            self._closing = (code, reason)
            self._wakeup.set()
        await self._done.wait()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
        self._done.set()

    async def wait_drained(self) -> None:
        """Back-pressure: wait while the unsent data is over the high-water mark."""
        if self._unsent > _HIGH_WATER:
            await self._drained.wait()

    def _messages(self, frames: list[bytes]) -> list[str]:
        """The WebSocket messages for ``frames``: one each, or batches within the limit."""
        if not self.batching or len(frames) == 1:
            return [frame.decode() for frame in frames]
        out: list[str] = []
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            if batch and size + len(frame) + 2 > self._max_frame_bytes:
                out.append(batch[0].decode() if len(batch) == 1 else p.encode_batch(batch).decode())
                batch, size = [], 0
            batch.append(frame)
            size += len(frame) + 1
        out.append(batch[0].decode() if len(batch) == 1 else p.encode_batch(batch).decode())
        return out

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                frames, self._queue = self._queue, []
                if frames:
                    for text in self._messages(frames):
                        await self._send({"type": "websocket.send", "text": text})
                    self._unsent -= sum(len(frame) for frame in frames)
                if not self._queue:
                    self._drained.set()
                    if self._closing is not None:
                        code, reason = self._closing
                        await self._send(
                            {"type": "websocket.close", "code": code, "reason": reason}
                        )
                        return
        except Exception:  # the peer is gone: the reader sees the disconnect
            log.debug("ASGI websocket send failed", exc_info=True)
        finally:
            self._drained.set()
            self._done.set()


async def serve_websocket(
    endpoint: Endpoint,
    receive: Receive,
    send: Send,
    max_frame_bytes: int,
    *,
    bearer: str | None = None,
    address: str | None = None,
) -> None:
    """Run one ASGI WebSocket connection against ``endpoint`` until it ends.

    ``bearer``: the token of the scope's ``Authorization: Bearer`` header, if any;
    ``address``: the client's (``addresses.scope_address``).
    """
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    transport = AsgiWebSocketTransport(send, max_frame_bytes)
    transport.bearer = bearer
    transport.address = address
    transport.start()
    conn = endpoint.opened(transport)
    peer_code: int | None = None
    try:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                peer_code = message.get("code")
                break
            if kind != "websocket.receive":
                continue
            text = message.get("text")
            data: str | bytes = text if text is not None else message.get("bytes") or b""
            size = p.wire_size(data) if isinstance(data, str) else len(data)
            if size > max_frame_bytes:
                await transport.close(p.CloseCode.MESSAGE_TOO_BIG, "message too big")
                continue  # the disconnect follows
            await endpoint.received(conn, data)
            await transport.wait_drained()
    finally:
        await endpoint.closed(conn, peer_code)
        transport.abort()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it passes ``limit`` bytes (the rest is not kept)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks) if size <= limit else None


async def _poll_while_there(polling: Polling, sid: str, ack: int, receive: Receive) -> Reply:
    """A poll, answered empty at once if its client goes away while it is held (a
    closed tab), so that nothing (a server's graceful shutdown) waits for it."""
    await receive()  # the GET's empty body; the next message is the disconnect
    poll = asyncio.ensure_future(polling.poll(sid, ack))
    gone = asyncio.ensure_future(receive())
    try:
        await asyncio.wait({poll, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not poll.done():
            polling.release(sid)
        return await poll
    finally:
        gone.cancel()


async def _serve_poll(polling: Polling, scope: Scope, receive: Receive) -> Reply:
    """PROTOCOL §1.1: open, poll, send, goodbye."""
    query = parse_qs(scope.get("query_string", b"").decode())
    sid = query.get("sid", [""])[0]
    method = scope.get("method")
    if method == "GET":
        try:
            ack = int(query.get("ack", ["0"])[0])
        except ValueError:
            return 400, {"error": "ack must be an integer"}
        return await _poll_while_there(polling, sid, ack, receive)
    if method == "DELETE":
        return await polling.goodbye(sid)
    if method != "POST":
        return 405, {"error": "method not allowed"}
    limit = polling.max_body_bytes
    body = await _read_body(receive, limit)
    if body is None:
        return 413, {"error": f"body over max_frame_bytes ({limit})"}
    if sid:
        return await polling.post(sid, body)
    address = scope_address(scope, polling.trusted)
    return await polling.open(body, bearer_token(scope.get("headers", [])), address)


async def serve_http(
    endpoint: Endpoint,
    scope: Scope,
    receive: Receive,
    send: Send,
    polling: Polling | None = None,
    *,
    allowed_origins: tuple[str, ...] = (),
) -> None:
    """Answer one plain HTTP request: long polling at ``/poll``, the endpoint's GET paths
    (health), else 404 (405 for other methods); 403 for a page of an origin not in
    ``allowed_origins`` (when set), whose preflight ``OPTIONS`` is answered."""
    origin = origin_of(scope.get("headers", ()))
    if not origin_allowed(allowed_origins, origin):
        await _respond(send, 403, "application/json", b'{"error": "origin not allowed"}')
        return
    cors = cors_headers(allowed_origins, origin)
    if cors:
        if origin is not None and scope.get("method") == "OPTIONS":
            preflight = [*preflight_headers(allowed_origins, origin), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 204, "headers": preflight})
            await send({"type": "http.response.body", "body": b""})
            return
        send = _adding_headers(send, cors)
    path = request_path(scope)
    if path == "/poll" and polling is not None:
        status, body = await _serve_poll(polling, scope, receive)
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        await _respond(send, status, "application/json", payload)
        return
    if scope.get("method") not in ("GET", "HEAD"):
        await _respond(send, 405, "application/json", b'{"error": "method not allowed"}')
        return
    answer = endpoint.http_get(path)
    if answer is None:
        missing = json.dumps({"error": f"no such path: {path}"}).encode()
        await _respond(send, 404, "application/json", missing)
        return
    status, content_type, payload, headers = answer
    query = scope.get("query_string", b"").decode()
    if 300 <= status < 400 and query:  # a redirect keeps the page's options
        headers = tuple((k, f"{v}?{query}" if k == "Location" else v) for k, v in headers)
    await _respond(send, status, content_type, payload, headers)


def _adding_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """``send``, with ``extra`` headers added to the response's head."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return sending


async def _respond(
    send: Send,
    status: int,
    content_type: str,
    payload: bytes,
    extra: tuple[tuple[str, str], ...] = (),
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
        *((name.lower().encode(), value.encode()) for name, value in extra),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    with contextlib.suppress(OSError):
        await send({"type": "http.response.body", "body": payload})

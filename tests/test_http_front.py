"""Plain HTTP on the built-in server's WebSocket port (``transports/http_front.py``):
keep-alive, pipelining, HEAD, the served files, and each limit at its edge."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rtchat_sdk import Client
from server_ref import Context, Server, ServerConfig
from server_ref.transports.http_front import MAX_HEAD_BYTES

pytestmark = pytest.mark.timeout(20)


def echo(ctx: Context, data: Any) -> Any:
    return data


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server(ServerConfig(handshake_timeout=0.5, max_frame_bytes=1000, demo=True))
    srv.on("echo")(echo)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.close()


@contextlib.asynccontextmanager
async def raw(server: Server) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain TCP connection to the server's port, closed at the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: status, headers, body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode().split("\r\n")[:-2]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return int(status_line.split()[1]), headers, body


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


async def closed(reader: asyncio.StreamReader) -> bool:
    """The server closed the socket (EOF with nothing more, or a reset) within 5 s."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def test_requests_on_one_kept_alive_connection_are_answered_in_order(server: Server) -> None:
    async with raw(server) as (reader, writer):
        writer.write(get("/healthz"))
        assert (await read_response(reader))[0] == 200
        writer.write(get("/readyz") + get("/nope"))  # pipelined: both in one write
        status, _, body = await read_response(reader)
        assert (status, json.loads(body)) == (200, {"status": "ready"})
        status, headers, body = await read_response(reader)
        assert (status, headers["content-type"]) == (404, "application/json")
        assert json.loads(body) == {"error": "no such path: /nope"}


async def test_a_head_request_gets_the_headers_without_the_body(server: Server) -> None:
    async with raw(server) as (reader, writer):
        writer.write(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + get("/healthz"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"content-length: 18" in head  # the GET's length, no body follows
        assert (await read_response(reader))[2] == b'{"status": "live"}'  # the next response


async def test_the_browser_client_and_the_demo_page_are_served(server: Server) -> None:
    async with raw(server) as (reader, writer):
        writer.write(get("/rtchat.js") + get("/demo?transport=polling") + get("/demo/"))
        status, headers, body = await read_response(reader)
        assert (status, headers["content-type"]) == (200, "text/javascript; charset=utf-8")
        assert b"export class Client" in body
        status, headers, _ = await read_response(reader)
        assert (status, headers["location"]) == (308, "demo/?transport=polling")
        status, headers, body = await read_response(reader)
        assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
        assert b"rtchat.js" in body


async def test_the_demo_page_is_not_served_unless_asked() -> None:
    srv = Server()
    await srv.start("127.0.0.1", 0)
    try:
        async with raw(srv) as (reader, writer):
            writer.write(get("/demo/"))
            assert (await read_response(reader))[0] == 404
    finally:
        await srv.close()


async def test_a_body_over_max_frame_bytes_is_refused_unread_and_the_socket_closed(
    server: Server,
) -> None:
    async with raw(server) as (reader, writer):
        writer.write(b"POST /poll HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert (status, headers["connection"]) == (413, "close")
        assert "max_frame_bytes (1000)" in json.loads(body)["error"]
        assert await closed(reader)


async def test_a_body_at_max_frame_bytes_is_read(server: Server) -> None:
    """1000 bytes pass the HTTP layer; polling then refuses them as a bad hello (400)."""
    async with raw(server) as (reader, writer):
        body = b"[" + b" " * 998 + b"]"
        writer.write(b"POST /poll HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + body)
        status, _, answer = await read_response(reader)
        assert status == 400
        assert "hello" in json.loads(answer)["error"]


@pytest.mark.parametrize("size", [MAX_HEAD_BYTES - 200, MAX_HEAD_BYTES + 10])
async def test_request_heads_are_limited_to_max_head_bytes(server: Server, size: int) -> None:
    async with raw(server) as (reader, writer):
        filler = "x" * (size - len(get("/healthz")) - 10)
        writer.write(get("/healthz", f"X-Fill: {filler}\r\n"))
        if size <= MAX_HEAD_BYTES:
            assert (await read_response(reader))[0] == 200
        else:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 431")
            assert await closed(reader)


async def test_a_garbled_request_gets_400_and_a_close(server: Server) -> None:
    async with raw(server) as (reader, writer):
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 400
        assert await closed(reader)


async def test_a_silent_socket_is_closed_after_handshake_timeout(server: Server) -> None:
    async with raw(server) as (reader, _):
        started = asyncio.get_running_loop().time()
        assert await closed(reader)
        assert asyncio.get_running_loop().time() - started >= 0.45  # not before 0.5 s


async def test_an_idle_kept_alive_socket_is_closed_after_handshake_timeout(server: Server) -> None:
    async with raw(server) as (reader, writer):
        writer.write(get("/healthz"))
        assert (await read_response(reader))[0] == 200
        assert await closed(reader)


async def test_websocket_clients_and_plain_http_share_the_port(server: Server) -> None:
    async with Client(server.url) as client:
        assert client.transport == "websocket"
        async with raw(server) as (reader, writer):
            writer.write(get("/healthz"))
            assert (await read_response(reader))[0] == 200
            assert await client.request("echo", {"still": "open"}, timeout=5) == {"still": "open"}


async def test_bytes_that_cannot_start_a_request_get_400_and_a_close_at_once(
    server: Server,
) -> None:
    """A TLS hello to this plain port (0x16...) is refused at once, not after a timeout."""
    async with raw(server) as (reader, writer):
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        status, _, _ = await read_response(reader)
        assert status == 400
        assert await closed(reader)

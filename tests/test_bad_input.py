"""Malformed frames from a raw WebSocket client: named errors, nobody else hurt."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from rtchat_sdk import Client
from server_ref import Server

pytestmark = pytest.mark.timeout(20)


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    """The next frame that is not a heartbeat."""
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if frame["type"] not in ("ping", "pong"):
            return frame


async def raw(server: Server, hello: bool = True) -> ClientConnection:
    ws = await connect(server.url, proxy=None)
    if hello:
        await ws.send(json.dumps({"type": "hello", "protocol": 1}))
        assert (await recv_json(ws))["type"] == "welcome"
    return ws


BAD_FRAMES = [
    ("{oops", "bad_json", None),
    ("[]", "bad_frame", None),
    ("42", "bad_frame", None),
    ('{"id": 1}', "bad_frame", None),
    ('{"type": "subscribe", "id": 1}', "unknown_type", None),
    ('{"type": "request", "id": 7, "event": ["not", "a", "string"]}', "invalid_frame", 7),
    ('{"type": "publish", "id": 8, "room": 5, "event": "e"}', "invalid_frame", 8),
    ('{"type": "request", "id": -1, "event": "echo"}', "invalid_frame", None),
    ('{"type": "ping", "ts": NaN}', "invalid_frame", None),  # its pong could not carry it back
    ('{"type": "ping", "ts": Infinity}', "invalid_frame", None),
]


async def test_each_bad_frame_gets_a_named_error_and_the_client_is_still_served(
    server: Server,
) -> None:
    ws = await raw(server)
    try:
        for text, code, message_id in BAD_FRAMES:
            await ws.send(text)
            error = await recv_json(ws)
            assert (error["type"], error["code"], error["id"]) == ("error", code, message_id), text
        await ws.send(json.dumps({"type": "request", "id": 100, "event": "echo", "data": "ok"}))
        assert await recv_json(ws) == {"type": "reply", "id": 100, "data": "ok"}
    finally:
        await ws.close()


async def test_binary_frame_with_bad_json_is_rejected_too(server: Server) -> None:
    ws = await raw(server)
    try:
        await ws.send(b"\xff\xfe\x00")
        assert (await recv_json(ws))["code"] == "bad_json"
    finally:
        await ws.close()


async def test_other_clients_are_unaffected(server: Server) -> None:
    async with Client(server.url) as good:
        ws = await raw(server)
        try:
            for text, _, _ in BAD_FRAMES:
                await ws.send(text)
            assert await good.request("echo", "still here") == "still here"
        finally:
            await ws.close()


async def test_frame_before_hello_is_refused_and_closed(server: Server) -> None:
    ws = await raw(server, hello=False)
    await ws.send(json.dumps({"type": "request", "id": 1, "event": "echo"}))
    error = await recv_json(ws)
    assert error["code"] == "handshake_required"
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1008


async def test_incompatible_protocol_is_refused_with_a_clear_code(server: Server) -> None:
    ws = await raw(server, hello=False)
    await ws.send(json.dumps({"type": "hello", "protocol": 999}))
    error = await recv_json(ws)
    assert error["code"] == "unsupported_protocol"
    assert "999" in error["message"]
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 4002


async def test_oversized_frame_closes_with_1009() -> None:
    from server_ref import ServerConfig

    srv = Server(ServerConfig(max_frame_bytes=1024))
    await srv.start("127.0.0.1", 0)
    try:
        ws = await raw(srv)
        await ws.send(json.dumps({"type": "emit", "id": 1, "event": "e", "data": "x" * 4096}))
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1009
    finally:
        await srv.close()

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

from .conftest import make_server

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
    ('{"type": 5, "id": 1}', "bad_frame", None),  # a type that is not a string
    ('{"type": null}', "bad_frame", None),
    ('{"type": "request", "id": 7, "event": ["not", "a", "string"]}', "invalid_frame", 7),
    ('{"type": "publish", "id": 8, "room": 5, "event": "e"}', "invalid_frame", 8),
    ('{"type": "request", "id": -1, "event": "echo"}', "invalid_frame", None),
    # JSON has no NaN or Infinity: the literals some parsers take are bad JSON.
    ('{"type": "ping", "ts": NaN}', "bad_json", None),
    ('{"type": "ping", "ts": Infinity}', "bad_json", None),
    ('{"type": "ping", "ts": -Infinity}', "bad_json", None),
    ('{"type": "request", "id": 9, "event": "echo", "data": {"x": [1, NaN]}}', "bad_json", None),
    ('{"type": "emit", "id": 10, "event": "echo", "data": -Infinity}', "bad_json", None),
    # Standard JSON, but beyond a double: infinite once parsed, so its pong could not carry it.
    ('{"type": "ping", "ts": 1e999}', "invalid_frame", None),
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


async def test_nan_and_infinity_inside_strings_are_only_text(server: Server) -> None:
    ws = await raw(server)
    try:
        data = {"NaN": "Infinity -Infinity NaN"}
        await ws.send(json.dumps({"type": "request", "id": 1, "event": "echo", "data": data}))
        assert await recv_json(ws) == {"type": "reply", "id": 1, "data": data}
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


async def test_frames_that_do_not_parse_before_hello_leave_the_handshake_open(
    server: Server,
) -> None:
    # "The first frame must be hello" means the first frame that parses.
    ws = await raw(server, hello=False)
    try:
        for text, code in [
            ("{oops", "bad_json"),
            ('{"type": 5}', "bad_frame"),
            ('{"type": "ping", "ts": NaN}', "bad_json"),
            ('{"type": "hello", "protocol": "one"}', "invalid_frame"),
        ]:
            await ws.send(text)
            error = await recv_json(ws)
            assert (error["type"], error["code"]) == ("error", code), text
        await ws.send(json.dumps({"type": "hello", "protocol": 1}))
        assert (await recv_json(ws))["type"] == "welcome"
    finally:
        await ws.close()


@pytest.mark.parametrize("before_hello", [False, True])
async def test_the_last_bad_frame_gets_its_error_and_then_the_close(before_hello: bool) -> None:
    from server_ref import ServerConfig

    srv = Server(ServerConfig(max_bad_frames=3))
    await srv.start("127.0.0.1", 0)
    try:
        ws = await raw(srv, hello=not before_hello)
        for n in range(3):
            await ws.send(f'{{"bad": {n}}}')
        errors = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
        assert [(e["type"], e["code"]) for e in errors] == [("error", "bad_frame")] * 3
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 4007
    finally:
        await srv.close()


async def test_sizes_count_utf8_bytes_and_non_ascii_may_be_raw_or_escaped() -> None:
    from server_ref import ServerConfig

    srv = make_server(ServerConfig(max_frame_bytes=1000))
    await srv.start("127.0.0.1", 0)
    try:
        ws = await raw(srv)
        # Raw UTF-8 and \u escapes are the same text; the reply writes raw UTF-8.
        await ws.send('{"type":"request","id":1,"event":"echo","data":"é😀"}')
        await ws.send('{"type":"request","id":2,"event":"echo","data":"\\u00e9\\ud83d\\ude00"}')
        replies = [await ws.recv() for _ in range(2)]
        assert replies == [f'{{"type":"reply","id":{i},"data":"é😀"}}' for i in (1, 2)]
        # A delivery of 450 'é' is 450 characters but 900 bytes of data: too large.
        await ws.send('{"type":"join","id":3,"room":"r"}')
        assert (await recv_json(ws))["type"] == "reply"
        await ws.send(
            json.dumps(
                {"type": "publish", "id": 4, "room": "r", "event": "m", "data": "é" * 450},
                ensure_ascii=False,
            )
        )
        assert (await recv_json(ws))["code"] == "too_large"
        # A message of 600 characters, 1200 bytes, is over the limit: close 1009.
        await ws.send(
            json.dumps(
                {"type": "emit", "id": 5, "event": "e", "data": "é" * 590}, ensure_ascii=False
            )
        )
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1009
    finally:
        await srv.close()

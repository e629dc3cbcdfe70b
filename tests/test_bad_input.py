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


# ---------------------------------------------------------------------------
# Issue 13 item 5: the hostile shapes the first list did not reach.


async def test_deep_nesting_is_bad_json_not_a_recursion_error(server: Server) -> None:
    # 100 000 nested arrays (200 kB, under the frame limit), alone and as a payload:
    # the parser stops at its depth limit (about 200 levels) instead of recursing.
    ws = await raw(server)
    try:
        deep = "[" * 100_000 + "]" * 100_000
        deep_object = '{"a":' * 50_000 + "1" + "}" * 50_000
        for text in [
            deep,
            f'{{"type":"request","id":1,"event":"echo","data":{deep}}}',
            f'{{"type":"publish","id":2,"room":"r","event":"e","data":{deep_object}}}',
        ]:
            await ws.send(text)
            error = await recv_json(ws)
            assert (error["code"], error["id"]) == ("bad_json", None)
            assert "recursion limit" in error["message"]
        # Nesting well inside the limit is ordinary data.
        nested: Any = "core"
        for _ in range(100):
            nested = [nested]
        await ws.send(json.dumps({"type": "request", "id": 3, "event": "echo", "data": nested}))
        assert await recv_json(ws) == {"type": "reply", "id": 3, "data": nested}
    finally:
        await ws.close()


async def test_huge_integers_are_bad_json_beyond_4300_digits_and_data_below(
    server: Server,
) -> None:
    # Python's int-from-str limit is 4300 digits; the parser refuses longer numbers
    # itself ("number out of range"), wherever they stand, before any int() is made.
    ws = await raw(server)
    try:
        huge = "1" + "0" * 5000  # 10**5000; str() of it would hit the same limit
        for text in [
            f'{{"type":"request","id":{huge},"event":"echo"}}',
            f'{{"type":"request","id":1,"event":"echo","data":{huge}}}',
            f'{{"type":"ping","ts":{huge}}}',
            f'{{"type":"ping","ts":-{huge}}}',
            f'{{"type":"hello","protocol":{huge}}}',
        ]:
            await ws.send(text)
            error = await recv_json(ws)
            assert (error["code"], error["id"]) == ("bad_json", None), text[:40]
            assert "out of range" in error["message"]
        # 4300 digits is data like any other, and comes back unchanged.
        big = int("9" * 4300)
        await ws.send(json.dumps({"type": "request", "id": 4, "event": "echo", "data": big}))
        assert await recv_json(ws) == {"type": "reply", "id": 4, "data": big}
        # An id beyond 64 bits is still an int >= 1 (PROTOCOL §4.2): answered with itself.
        await ws.send(json.dumps({"type": "request", "id": 2**64, "event": "echo", "data": 1}))
        assert await recv_json(ws) == {"type": "reply", "id": 2**64, "data": 1}
        # A float beyond the double range is standard JSON: invalid_frame in ping.ts.
        await ws.send('{"type":"ping","ts":-1e999}')
        assert (await recv_json(ws))["code"] == "invalid_frame"
    finally:
        await ws.close()


async def test_a_string_up_to_max_frame_bytes_passes_and_one_byte_more_closes_1009() -> None:
    from server_ref import ServerConfig

    limit = 4096
    srv = make_server(ServerConfig(max_frame_bytes=limit))
    await srv.start("127.0.0.1", 0)
    try:
        ws = await raw(srv)
        envelope = '{"type":"request","id":1,"event":"echo","data":"%s"}'
        room = limit - len((envelope % "").encode())
        # Exactly the limit in bytes, with 2-byte characters in it: accepted.
        text = envelope % ("é" * (room // 2) + "x" * (room % 2))
        assert len(text.encode()) == limit
        await ws.send(text)
        assert (await recv_json(ws))["id"] == 1
        # One byte more: the library closes with 1009 before the hub sees it.
        await ws.send((envelope % ("x" * (room + 1))).replace('"id":1', '"id":2'))
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1009
    finally:
        await srv.close()


async def test_invalid_utf8_text_frame_closes_1007_binary_frame_gets_bad_json(
    server: Server,
) -> None:
    async with Client(server.url) as good:
        # A binary message is UTF-8 JSON to the server (PROTOCOL §1): bad bytes in it
        # are bad_json and the connection carries on; good bytes are served.
        ws = await raw(server)
        try:
            await ws.send(b'{"type":"request","id":1,"event":"echo","data":"\xff\xfe"}')
            assert (await recv_json(ws))["code"] == "bad_json"
            await ws.send(b'{"type":"request","id":2,"event":"echo","data":"\xc3\xa9"}')
            assert await recv_json(ws) == {"type": "reply", "id": 2, "data": "é"}
            # A text message must be UTF-8 (RFC 6455 §8.1): the WebSocket library
            # fails the connection with 1007 (invalid frame payload data).
            await ws.send(b'{"type":"request","id":3,"event":"echo","data":"\xff"}', text=True)
            with pytest.raises(ConnectionClosed):
                await recv_json(ws)
            assert ws.close_code == 1007
        finally:
            await ws.close()
        assert await good.request("echo", "unaffected") == "unaffected"


@pytest.mark.parametrize(
    "first",
    [
        {"type": "ping", "ts": 1.0},
        {"type": "pong", "ts": 1.0},
        {"type": "join", "id": 1, "room": "r"},
        {"type": "publish", "id": 1, "room": "r", "event": "e"},
        {"type": "emit", "id": 1, "event": "e"},
    ],
)
async def test_any_valid_frame_before_hello_is_handshake_required_and_1008(
    server: Server, first: dict[str, Any]
) -> None:
    ws = await raw(server, hello=False)
    await ws.send(json.dumps(first))
    error = await recv_json(ws)
    assert (error["code"], error["id"]) == ("handshake_required", None)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1008


async def test_server_frame_types_from_a_client_are_unknown_types(server: Server) -> None:
    # "A string type that names no frame of the direction gets unknown_type" (§2):
    # a client sending reply, welcome, error, message or gap is sending nonsense.
    ws = await raw(server, hello=False)
    try:
        for kind in ["reply", "welcome", "error", "message", "gap"]:
            await ws.send(json.dumps({"type": kind, "id": 1, "code": "x", "data": None}))
            error = await recv_json(ws)
            assert (error["code"], error["id"]) == ("unknown_type", None), kind
        await ws.send(json.dumps({"type": "hello", "protocol": 1}))
        assert (await recv_json(ws))["type"] == "welcome"
    finally:
        await ws.close()


async def test_a_second_hello_is_already_handshaken_and_counts_as_a_bad_frame() -> None:
    from server_ref import ServerConfig

    srv = make_server(ServerConfig(max_bad_frames=3))
    await srv.start("127.0.0.1", 0)
    try:
        ws = await raw(srv)
        await ws.send(json.dumps({"type": "hello", "protocol": 1}))
        assert (await recv_json(ws))["code"] == "already_handshaken"
        # Still the same session: requests are answered.
        await ws.send(json.dumps({"type": "request", "id": 1, "event": "echo", "data": 1}))
        assert await recv_json(ws) == {"type": "reply", "id": 1, "data": 1}
        # A hello with another version on an open connection is not a renegotiation.
        await ws.send(json.dumps({"type": "hello", "protocol": 2}))
        assert (await recv_json(ws))["code"] == "already_handshaken"
        await ws.send("{oops")  # the third bad frame: its error, then 4007
        assert (await recv_json(ws))["code"] == "bad_json"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 4007
    finally:
        await srv.close()


async def test_a_field_that_must_be_an_object_is_invalid_frame_not_bad_frame(
    server: Server,
) -> None:
    # Found by tests/test_fuzz.py: `auth: true` was answered `bad_frame` ("frame must
    # be a JSON object"), the code for a frame that is not an object (§12).
    ws = await raw(server, hello=False)
    try:
        for text in [
            '{"type":"hello","protocol":1,"auth":true}',
            '{"type":"hello","protocol":1,"auth":[1]}',
        ]:
            await ws.send(text)
            error = await recv_json(ws)
            assert (error["code"], error["id"]) == ("invalid_frame", None), text
            assert "auth" in error["message"]
        await ws.send('{"type":"hello","protocol":1,"auth":{"user":"u"}}')
        assert (await recv_json(ws))["type"] == "welcome"
    finally:
        await ws.close()


async def test_a_deeply_nested_poll_body_is_400_not_500(server: Server) -> None:
    import httpx

    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{server.port}", trust_env=False
    ) as http:
        opened = await http.post("/poll", content=b'[{"type": "hello", "protocol": 1}]')
        sid = opened.json()["sid"]
        deep = b"[" * 5000 + b"]" * 5000
        try:
            assert (await http.post("/poll", content=deep)).status_code == 400
            assert (await http.post(f"/poll?sid={sid}", content=deep)).status_code == 400
        finally:
            await http.delete(f"/poll?sid={sid}")

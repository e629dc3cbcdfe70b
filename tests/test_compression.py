"""permessage-deflate: off unless both sides turn it on; everything works either way."""

from __future__ import annotations

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate

from rtchat_sdk import Client
from server_ref import Server, ServerConfig
from server_ref.transports.websocket import WebSocketTransport

from .conftest import make_server

pytestmark = pytest.mark.timeout(20)


def connections(server: Server) -> list[WebSocketTransport]:
    """The server's open WebSocket connections."""
    return [t for t in server._transports.values() if isinstance(t, WebSocketTransport)]


def negotiated(server: Server) -> list[bool]:
    """For each open connection on the server: is permessage-deflate in use?"""
    return [
        any(isinstance(e, PerMessageDeflate) for e in conn.ws.protocol.extensions)
        for conn in connections(server)
    ]


@pytest.mark.parametrize(
    ("server_on", "client_on", "expected"),
    [(False, False, False), (True, False, False), (False, True, False), (True, True, True)],
)
async def test_compression_is_used_only_when_both_sides_turn_it_on(
    server_on: bool, client_on: bool, expected: bool
) -> None:
    server = make_server(ServerConfig(compression=server_on))
    await server.start("127.0.0.1", 0)
    try:
        async with Client(server.url, compression=client_on) as client:
            big = {"text": "all work and no play " * 2_000}  # ~42 KB, compresses well
            assert await client.request("echo", big) == big
            assert negotiated(server) == [expected]
    finally:
        await server.close()


def test_the_default_is_off() -> None:
    assert ServerConfig().compression is False
    assert Client("ws://127.0.0.1:1").compression is False


def test_the_server_flag_turns_it_on() -> None:
    from server_ref.__main__ import build_parser, config_from_args

    parser = build_parser()
    assert config_from_args(parser, parser.parse_args(["--compression"])).compression is True
    assert config_from_args(parser, parser.parse_args([])).compression is False

"""Allowed origins (``ServerConfig.allowed_origins``, ``--allowed-origin``): a page of
another origin is refused with 403 at the WebSocket handshake and on every HTTP
request, an allowed one gets CORS headers and its preflight answered, and a request
with no ``Origin`` (not a browser) is served; on the built-in port and under uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from rtchat_sdk import Client
from server_ref import Server, ServerConfig
from server_ref.__main__ import build_parser, config_from_args
from server_ref.asgi import uvicorn_listener
from server_ref.transports.origins import PREFLIGHT_MAX_AGE

pytestmark = pytest.mark.timeout(30)

APP = "https://app.example"
EVIL = "https://evil.example"


@pytest.fixture(params=["builtin", "uvicorn"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    config = ServerConfig(allowed_origins=(APP,))
    srv = (
        Server(config, transport=uvicorn_listener) if request.param == "uvicorn" else Server(config)
    )
    srv.on("echo")(lambda ctx, data: data)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.close()


def http_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_a_websocket_handshake_from_another_origin_gets_403(server: Server) -> None:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(server.url, origin=EVIL, open_timeout=5):  # type: ignore[arg-type]
            pass
    assert caught.value.response.status_code == 403


async def test_a_websocket_handshake_from_an_allowed_origin_is_taken(server: Server) -> None:
    async with connect(server.url, origin=APP, open_timeout=5) as ws:  # type: ignore[arg-type]
        assert ws.response is not None
        assert ws.response.status_code == 101


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_client_without_origin_is_served(server: Server, transport: str) -> None:
    async with Client(server.url, transports=(transport,)) as client:
        assert await client.request("echo", "no origin", timeout=5) == "no origin"


async def test_polling_from_another_origin_gets_403_without_cors(server: Server) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{http_url(server)}/poll", headers={"Origin": EVIL})
        health = await http.get(f"{http_url(server)}/healthz", headers={"Origin": EVIL})
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers
    assert health.status_code == 403


async def test_an_allowed_origin_gets_cors_headers_and_its_preflight(server: Server) -> None:
    async with httpx.AsyncClient() as http:
        preflight = await http.options(
            f"{http_url(server)}/poll",
            headers={
                "Origin": APP,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        health = await http.get(f"{http_url(server)}/healthz", headers={"Origin": APP})
        refused = await http.options(f"{http_url(server)}/poll", headers={"Origin": EVIL})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == APP
    assert preflight.headers["access-control-allow-methods"] == "GET, POST, DELETE"
    assert preflight.headers["access-control-allow-headers"] == "Content-Type"
    assert preflight.headers["access-control-max-age"] == str(PREFLIGHT_MAX_AGE)
    assert preflight.headers["vary"] == "Origin"
    assert health.status_code == 200
    assert health.headers["access-control-allow-origin"] == APP
    assert health.headers["vary"] == "Origin"
    assert refused.status_code == 403


async def test_no_setting_allows_every_origin_and_sends_no_cors() -> None:
    server = Server()
    async with server.serving("127.0.0.1", 0), httpx.AsyncClient() as http:
        async with connect(server.url, origin=EVIL, open_timeout=5):  # type: ignore[arg-type]
            pass
        health = await http.get(f"{http_url(server)}/healthz", headers={"Origin": EVIL})
    assert health.status_code == 200
    assert "access-control-allow-origin" not in health.headers


def test_the_flag_repeats_and_bad_origins_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["--allowed-origin", APP, "--allowed-origin", "HTTP://Other:8080/"])
    assert config_from_args(parser, args).allowed_origins == (APP, "http://other:8080")
    assert config_from_args(parser, parser.parse_args([])).allowed_origins == ()
    with pytest.raises(SystemExit) as caught:
        config_from_args(parser, parser.parse_args(["--allowed-origin", "app.example/x"]))
    assert caught.value.code == 2
    assert "scheme://host[:port]" in capsys.readouterr().err

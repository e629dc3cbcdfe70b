"""The ASGI app under uvicorn: rtchat served directly, and mounted in FastAPI under a prefix."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from rtchat_sdk import Client, Delivery
from server_ref import Server, ServerConfig
from server_ref.asgi import create_app
from tests.helpers import http_get

pytestmark = pytest.mark.timeout(30)


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """``app`` under uvicorn on a free loopback port: its http:// base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 (uvicorn sets a flag, no event)
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def echo_server(config: ServerConfig | None = None) -> Server:
    server = Server(config)

    @server.on("echo")
    def echo(ctx: object, data: Any) -> Any:
        return data

    return server


async def test_uvicorn_serves_websocket_clients_health_and_closes_the_server_on_shutdown() -> None:
    server = echo_server()
    async with serving(create_app(server)) as base:
        ws = base.replace("http://", "ws://")
        assert await http_get(ws, "/healthz") == (200, {"status": "live"})
        assert await http_get(ws, "/readyz") == (200, {"status": "ready"})
        async with Client(ws + "/any/path") as alice, Client(ws) as bob:
            got: asyncio.Queue[tuple[Any, Delivery]] = asyncio.Queue()
            bob.on("m")(lambda data, meta: got.put_nowait((data, meta)))
            await alice.join("r")
            await bob.join("r")
            assert await alice.request("echo", {"n": 1}, timeout=5) == {"n": 1}
            offsets = [await alice.publish("r", "m", i) for i in range(20)]
            received = [await asyncio.wait_for(got.get(), 5) for _ in offsets]
            assert [data for data, _ in received] == list(range(20))
            assert [meta.offset for _, meta in received] == offsets
        assert server.not_ready() is None
    assert server.not_ready() == "shutting down"  # the lifespan's shutdown closed it


async def test_a_frame_over_the_limit_closes_with_1009_and_the_server_carries_on() -> None:
    server = echo_server(ServerConfig(max_frame_bytes=4096))
    async with serving(create_app(server)) as base:
        ws = base.replace("http://", "ws://")
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        async with connect(ws) as raw:
            await raw.send('{"type":"hello","protocol":1}')
            await raw.recv()
            await raw.send('{"type":"emit","id":1,"event":"echo","data":"' + "x" * 5000 + '"}')
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(raw.recv(), 5)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1009
        async with Client(ws) as client:
            assert await client.request("echo", 2, timeout=5) == 2


async def test_the_fastapi_example_mounts_rtchat_under_a_prefix_beside_a_rest_route() -> None:
    from examples.fastapi_app import app, rtchat_server

    async with serving(app) as base:
        ws = base.replace("http://", "ws://") + "/rt/"
        async with httpx.AsyncClient(base_url=base) as http:
            health = await http.get("/rt/healthz")
            assert (health.status_code, health.json()) == (200, {"status": "live"})
            assert (await http.get("/rt/readyz")).json() == {"status": "ready"}
            async with Client(ws) as client:
                got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

                @client.on("announcement")
                def on_announcement(data: Any) -> None:
                    if not got.done():
                        got.set_result(data)

                await client.join("lobby")
                answer = await http.post("/announce", json={"room": "lobby", "text": "hello"})
                assert answer.status_code == 200
                assert answer.json() == {"offset": 1}
                assert await asyncio.wait_for(got, 5) == {"text": "hello"}
                assert (await http.get("/sessions")).json() == {"sessions": 1}
    assert rtchat_server.not_ready() == "shutting down"  # closed with the app's lifespan

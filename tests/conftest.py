"""Shared fixtures: a real server on a free loopback port, and clients of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

import tests.redis_support  # noqa: F401  (first: it takes REDIS_URL out of the environment)
from rtchat_sdk import Client
from server_ref import Server, ServerConfig


def make_server(config: ServerConfig | None = None) -> Server:
    """A server with the handlers the tests rely on."""
    server = Server(config)

    @server.on("echo")
    def echo(ctx: object, data: object) -> object:
        return data

    @server.on("fail")
    def fail(ctx: object, data: object) -> object:
        raise ValueError(f"asked to fail with {data!r}")

    return server


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """A running reference server on 127.0.0.1 and a free port."""
    srv = make_server()
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
async def connect(server: Server) -> AsyncIterator[Callable[..., Client]]:
    """Factory of connected-on-enter clients, all closed at the end of the test."""
    clients: list[Client] = []

    def factory(**kwargs: object) -> Client:
        client = Client(server.url, **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    try:
        yield factory
    finally:
        for client in clients:
            await client.close()

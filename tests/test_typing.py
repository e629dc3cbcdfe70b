"""Static types users see: mypy --strict checks these assert_type lines in CI."""

from __future__ import annotations

from typing import Any, assert_type

import pytest

from rtchat_sdk import Client, Event
from server_ref import Context, Server


class GetUser(Event, name="typing.get_user"):
    id: int


class User(Event, name="typing.user"):
    id: int
    name: str


@pytest.mark.timeout(20)
async def test_typed_request_returns_the_response_model() -> None:
    server = Server()

    @server.on(GetUser)
    def get_user(ctx: Context, req: GetUser) -> User:
        return User(id=req.id, name="ann")

    await server.start("127.0.0.1", 0)
    try:
        async with Client(server.url) as client:
            user = await client.request(GetUser(id=1), response=User)
            assert_type(user, User)
            assert user.name == "ann"
            raw = await client.request("typing.get_user", {"id": 2})
            assert_type(raw, Any)
            assert raw == {"id": 2, "name": "ann"}
            await client.join("r")
            offset = await client.publish("r", GetUser(id=1))
            assert_type(offset, int)
            assert offset == 1
    finally:
        await server.close()

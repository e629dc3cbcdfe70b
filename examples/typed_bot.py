"""Typed events end to end: pydantic models on both sides of a request.

This example starts its own ``Server`` in this process, registers a handler
for the ``GetUser`` event that returns a ``User`` model, and calls it with
``await client.request(GetUser(id=1), response=User)``: the request payload is
validated into ``GetUser`` on the server and the reply into ``User`` on the
client. It also shows what a caller gets for a missing user (the handler's
``RemoteError`` code) and for a payload the model rejects (``invalid_payload``)::

    python examples/typed_bot.py              # on a free port
    python examples/typed_bot.py --port 8766  # on a given port

It needs no other server, and exits 0 once every call came back as expected.
"""

from __future__ import annotations

import argparse
import asyncio

from pydantic import BaseModel

from rtchat_sdk import Client, Event, HandlerError, RemoteError
from server_ref import Context, Server

USERS = {1: ("Ada Lovelace", "ada@example.org"), 2: ("Alan Turing", "alan@example.org")}


class GetUser(Event, name="user.get"):
    """The request: which user to look up."""

    id: int


class User(BaseModel):
    """The reply."""

    id: int
    name: str
    email: str


def make_server() -> Server:
    server = Server()

    @server.on(GetUser)
    def get_user(ctx: Context, request: GetUser) -> User:
        if request.id not in USERS:
            raise RemoteError("not_found", f"no user with id {request.id}")
        name, email = USERS[request.id]
        return User(id=request.id, name=name, email=email)

    return server


def say(*args: object) -> None:
    print(*args, flush=True)


async def run(port: int) -> int:
    server = make_server()
    await server.start("127.0.0.1", port)
    say(f"server listening on {server.url}")
    try:
        async with Client(server.url) as client:
            user = await client.request(GetUser(id=1), response=User)
            say(f"GetUser(id=1) -> {user!r}")

            other = await client.request(GetUser(id=2), response=User)
            say(f"GetUser(id=2) -> {other.name} <{other.email}>")

            try:
                await client.request(GetUser(id=42), response=User)
            except RemoteError as exc:
                say(f"GetUser(id=42) -> RemoteError code={exc.code!r}: {exc.message}")
            else:
                say("GetUser(id=42) unexpectedly found a user")
                return 1

            try:
                await client.request("user.get", {"id": "not a number"}, response=User)
            except HandlerError as exc:
                say(f"user.get with a bad id -> HandlerError code={exc.code!r}")
            else:
                say("a bad payload was unexpectedly accepted")
                return 1
    finally:
        await server.close()
    say("typed bot done")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Typed request/reply with pydantic models.")
    parser.add_argument(
        "--port", type=int, default=0, help="port of the in-process server (0: a free one)"
    )
    args = parser.parse_args(argv)
    return asyncio.run(run(args.port))


if __name__ == "__main__":
    raise SystemExit(main())

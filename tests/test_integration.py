"""End to end against a real server on a free loopback port."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from rtchat_sdk import (
    AckTimeout,
    Client,
    ConnectionState,
    Delivery,
    Event,
    HandlerError,
    RemoteError,
    UnknownEvent,
    UnknownNamespace,
)
from server_ref import Context, Server

pytestmark = pytest.mark.timeout(30)

Connect = Callable[..., Client]


class ChatMessage(Event, name="it.chat"):
    text: str


class GetUser(Event, name="it.get_user"):
    id: int


class User(Event, name="it.user"):
    id: int
    name: str


async def test_two_clients_see_each_others_publishes_not_their_own(connect: Connect) -> None:
    async with connect() as alice, connect() as bob:
        seen: dict[str, list[tuple[str, str | None]]] = {"alice": [], "bob": []}
        done = asyncio.Event()

        def recorder(who: str) -> Callable[[ChatMessage, Delivery], None]:
            def handler(msg: ChatMessage, meta: Delivery) -> None:
                seen[who].append((msg.text, meta.sender))
                if len(seen["alice"]) == 2 and len(seen["bob"]) == 2:
                    done.set()

            return handler

        alice.on(ChatMessage)(recorder("alice"))
        bob.on(ChatMessage)(recorder("bob"))
        await alice.join("lobby")
        await bob.join("lobby")
        for i in range(2):
            await alice.publish("lobby", ChatMessage(text=f"a{i}"))
            await bob.publish("lobby", ChatMessage(text=f"b{i}"))
        await asyncio.wait_for(done.wait(), 5)
        assert seen["bob"] == [("a0", alice.session_id), ("a1", alice.session_id)]
        assert seen["alice"] == [("b0", bob.session_id), ("b1", bob.session_id)]


async def test_echo_publish_reaches_the_sender(connect: Connect) -> None:
    async with connect() as alice:
        got: asyncio.Queue[Any] = asyncio.Queue()
        alice.on("note")(got.put_nowait)
        await alice.join("me")
        offset = await alice.publish("me", "note", {"n": 1}, echo=True)
        assert await asyncio.wait_for(got.get(), 5) == {"n": 1}
        assert offset == 1


async def test_offsets_increase_by_one_per_room(connect: Connect) -> None:
    async with connect() as alice:
        await alice.join("r1")
        await alice.join("r2")
        assert [await alice.publish("r1", "e", i) for i in range(3)] == [1, 2, 3]
        assert await alice.publish("r2", "e", 0) == 1


async def test_two_thousand_concurrent_requests_get_their_own_replies(connect: Connect) -> None:
    async with connect() as client:
        payloads = [{"n": i, "tag": random.random()} for i in range(2000)]
        replies = await asyncio.gather(*(client.request("echo", d) for d in payloads))
        assert replies == payloads


async def test_unknown_event_raises(connect: Connect) -> None:
    async with connect() as client:
        with pytest.raises(UnknownEvent) as info:
            await client.request("no.such.event", {})
        assert info.value.code == "unknown_event"


async def test_handler_exception_becomes_remote_error(connect: Connect) -> None:
    async with connect() as client:
        with pytest.raises(HandlerError) as info:
            await client.request("fail", "boom")
        assert info.value.code == "handler_error"
        assert "boom" in info.value.message
        # The connection carries on.
        assert await client.request("echo", 1) == 1
        assert client.state is ConnectionState.CONNECTED


async def test_request_timeout_raises_ack_timeout(server: Server, connect: Connect) -> None:
    release = asyncio.Event()

    @server.on("hang")
    async def hang(ctx: Context, data: Any) -> None:
        await release.wait()

    async with connect() as client:
        with pytest.raises(AckTimeout):
            await client.request("hang", None, timeout=0.2)
        assert isinstance(AckTimeout("x"), TimeoutError)
        release.set()
        assert await client.request("echo", "after") == "after"


async def test_typed_request_and_invalid_payload(server: Server, connect: Connect) -> None:
    @server.on(GetUser)
    def get_user(ctx: Context, req: GetUser) -> User:
        return User(id=req.id, name=f"user{req.id}")

    async with connect() as client:
        user = await client.request(GetUser(id=7), response=User)
        assert user == User(id=7, name="user7")
        with pytest.raises(RemoteError) as info:
            await client.request("it.get_user", {"id": "not a number"})
        assert info.value.code == "invalid_payload"


async def test_invalid_delivery_never_reaches_handler(connect: Connect) -> None:
    async with connect() as sender, connect() as receiver:
        handled: list[ChatMessage] = []
        errors: list[Exception] = []
        good = asyncio.Event()

        @receiver.on(ChatMessage)
        def on_chat(msg: ChatMessage) -> None:
            handled.append(msg)
            good.set()

        receiver.on_error(errors.append)
        await sender.join("typed")
        await receiver.join("typed")
        await sender.publish("typed", "it.chat", {"wrong": 1})
        await sender.publish("typed", ChatMessage(text="ok"))
        await asyncio.wait_for(good.wait(), 5)
        assert handled == [ChatMessage(text="ok")]
        assert len(errors) == 1
        assert "ChatMessage" in str(errors[0])


async def test_namespaces_stay_apart(server: Server, connect: Connect) -> None:
    admin = server.namespace("/admin")

    @admin.on("whoami")
    def whoami(ctx: Context) -> str:
        return f"admin:{ctx.ns}"

    async with connect() as client, connect() as other:
        admin_client = client.namespace("/admin")
        assert await admin_client.request("whoami") == "admin:/admin"
        with pytest.raises(UnknownEvent):
            await client.request("whoami")
        with pytest.raises(UnknownEvent):
            await admin_client.request("echo", 1)

        in_default: list[Any] = []
        in_admin: list[Any] = []
        admin_seen = asyncio.Event()
        client.on("news")(in_default.append)

        def on_admin_news(data: Any) -> None:
            in_admin.append(data)
            admin_seen.set()

        admin_client.on("news")(on_admin_news)
        await client.join("same-name")
        await admin_client.join("same-name")
        other_admin = other.namespace("/admin")
        await other_admin.join("same-name")
        await other_admin.publish("same-name", "news", "for admins")
        await asyncio.wait_for(admin_seen.wait(), 5)
        assert in_admin == ["for admins"]
        assert in_default == []


async def test_unknown_namespace_is_a_clear_error(connect: Connect) -> None:
    async with connect() as client:
        with pytest.raises(UnknownNamespace):
            await client.namespace("/nope").request("echo", 1)


async def test_publish_requires_membership(connect: Connect) -> None:
    async with connect() as client:
        with pytest.raises(RemoteError) as info:
            await client.publish("not-joined", "e", 1)
        assert info.value.code == "not_in_room"


async def test_leave_stops_deliveries(connect: Connect) -> None:
    async with connect() as alice, connect() as bob:
        got: list[Any] = []
        marker = asyncio.Event()

        def on_msg(data: Any) -> None:
            got.append(data)
            if data == "last":
                marker.set()

        bob.on("m")(on_msg)
        await alice.join("room")
        await bob.join("room")
        await bob.join("control")
        await alice.join("control")
        await alice.publish("room", "m", "first")
        await bob.leave("room")
        await alice.publish("room", "m", "missed")
        await alice.publish("control", "m", "last")
        await asyncio.wait_for(marker.wait(), 5)
        assert got == ["first", "last"]


async def test_direct_send_to_a_session(server: Server, connect: Connect) -> None:
    @server.on("poke")
    async def poke(ctx: Context, target: str) -> int:
        return await ctx.send(target, "poked", {"by": ctx.session_id})

    async with connect() as alice, connect() as bob:
        got: asyncio.Queue[tuple[Any, Delivery]] = asyncio.Queue()
        bob.on("poked")(lambda data, meta: got.put_nowait((data, meta)))
        offset = await alice.request("poke", bob.session_id)
        data, meta = await asyncio.wait_for(got.get(), 5)
        assert data == {"by": alice.session_id}
        assert meta.stream == f"inbox:{bob.session_id}"
        assert meta.offset == offset == 1
        assert meta.room is None


async def test_server_side_publish_and_handler_context(server: Server, connect: Connect) -> None:
    @server.on("enter")
    async def enter(ctx: Context, room: str) -> str:
        await ctx.join(room)
        return ctx.session_id

    async with connect(auth={"user": "ann"}) as client:
        got: asyncio.Queue[Any] = asyncio.Queue()
        client.on("announce")(got.put_nowait)
        assert await client.request("enter", "hall") == client.session_id
        await server.publish("hall", "announce", {"from": "server"})
        assert await asyncio.wait_for(got.get(), 5) == {"from": "server"}


async def test_state_changes_are_reported(connect: Connect) -> None:
    client = connect()
    states: list[ConnectionState] = []
    client.on_state_change(states.append)
    async with client:
        assert client.state is ConnectionState.CONNECTED
    assert states == [ConnectionState.CONNECTING, ConnectionState.CONNECTED, ConnectionState.CLOSED]


async def test_ping_measures_the_round_trip(connect: Connect) -> None:
    async with connect() as client:
        assert client.rtt is None
        rtt = await client.ping()
        assert 0 <= rtt < 1.0
        assert client.rtt == rtt

"""Authorization per action (issue 13 item 2): join, publish, call and receive hooks.

On the hub (``HubNet``, a fake clock, JWT-like identities with claims): each
denial is an ``error`` ``forbidden`` answering the message, the connection
stays up, a namespace without hooks asks nothing (the fast path), the
built-in rooms claim, hooks that raise. End to end (a real ``Server`` and
``Client``, async hooks): the client raises ``Forbidden`` and carries on;
``authorize_receive`` guards ``ctx.send``; ``--jwt-rooms-claim``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest

from rtchat_sdk import Client, ConnectionState, Forbidden, RemoteError
from rtchat_sdk import protocol as p
from rtchat_sdk.errors import remote_error
from server_ref import Context, Namespace, Server
from server_ref.auth_flags import add_jwt_flags, jwt_authenticator
from server_ref.core.commands import Authorize, Identity
from server_ref.room_claims import guard_rooms, room_allowed, rooms_claim
from tests.hubnet import HubNet
from tests.test_auth_jwt import SECRET
from tests.test_auth_jwt import token as jwt_token
from tests.test_server_cli import spawn_server

pytestmark = pytest.mark.timeout(20)

ANN = Identity("ann", {"sub": "ann", "rooms": ["lobby", "team-*"], "role": "user"})
ROOT = Identity("root", {"sub": "root", "rooms": ["*"], "role": "admin"})


def net_with_users() -> HubNet:
    net = HubNet(users={"ann-token": ANN, "root-token": ROOT})

    @net.namespaces["/"].on("echo")
    def echo(ctx: Context, data: Any) -> Any:
        return data

    return net


def hello(net: HubNet, token: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    return net.hello(auth={"token": token}, **fields)


def answer(net: HubNet, conn: int, frame: dict[str, Any]) -> dict[str, Any]:
    net.send(conn, frame)
    (out,) = net.frames(conn)
    assert out["id"] == frame["id"]
    return out


def join(i: int, room: str, ns: str = "/") -> dict[str, Any]:
    return {"type": "join", "id": i, "ns": ns, "room": room}


def publish(i: int, room: str, event: str = "m") -> dict[str, Any]:
    return {"type": "publish", "id": i, "room": room, "event": event, "data": i}


def request(i: int, event: str = "echo") -> dict[str, Any]:
    return {"type": "request", "id": i, "event": event, "data": i}


def assert_forbidden(frame: dict[str, Any], message_id: int) -> None:
    assert frame["type"] == "error"
    assert (frame["id"], frame["code"], frame["retry_after"]) == (message_id, "forbidden", None)


# ----------------------------------------------------------------------
# On the hub


def test_an_unauthorized_join_publish_and_request_are_forbidden_and_the_connection_stays() -> None:
    net = net_with_users()
    space = net.namespaces["/"]
    seen: list[tuple[str, Any]] = []

    @space.authorize_join
    def may_join(ctx: Context, room: str) -> bool:
        seen.append(("join", (ctx.user, ctx.claims["role"], room)))
        return room != "secret"

    @space.authorize_publish
    def may_publish(ctx: Context, room: str, event: str) -> bool:
        seen.append(("publish", (ctx.user, room, event)))
        return event != "shout"

    @space.authorize_call
    def may_call(ctx: Context, event: str) -> bool:
        seen.append(("call", (ctx.user, event)))
        return event != "echo" or ctx.claims["role"] == "admin"

    conn, _ = hello(net, "ann-token")
    assert_forbidden(answer(net, conn, join(1, "secret")), 1)
    assert answer(net, conn, join(2, "lobby"))["type"] == "reply"
    assert_forbidden(answer(net, conn, publish(3, "lobby", "shout")), 3)
    assert answer(net, conn, publish(4, "lobby", "say"))["type"] == "reply"
    assert_forbidden(answer(net, conn, request(5)), 5)
    emit = {"type": "emit", "id": 6, "event": "nope"}
    assert answer(net, conn, emit)["code"] == "unknown_event"  # allowed, so looked up
    assert conn not in net.closed  # a denial is an answer, not a close

    root, _ = hello(net, "root-token")
    assert answer(net, root, request(1))["data"] == 1
    assert seen[:6] == [
        ("join", ("ann", "user", "secret")),
        ("join", ("ann", "user", "lobby")),
        ("publish", ("ann", "lobby", "shout")),
        ("publish", ("ann", "lobby", "say")),
        ("call", ("ann", "echo")),
        ("call", ("ann", "nope")),
    ]


def test_a_resent_denied_message_gets_the_same_answer_without_asking_again() -> None:
    net = net_with_users()
    asked: list[str] = []

    @net.namespaces["/"].authorize_call
    def never(ctx: Context, event: str) -> bool:
        asked.append(event)
        return False

    conn, _ = hello(net, "ann-token")
    first = answer(net, conn, request(1))
    assert answer(net, conn, request(1)) == first
    assert asked == ["echo"]


def test_a_namespace_without_hooks_asks_nothing() -> None:
    net = net_with_users()
    net.namespaces["/other"] = Namespace("/other")

    @net.namespaces["/other"].authorize_join
    def nobody(ctx: Context, room: str) -> bool:
        return False

    conn, _ = hello(net, "ann-token")
    assert answer(net, conn, join(1, "lobby"))["type"] == "reply"
    assert answer(net, conn, publish(2, "lobby"))["type"] == "reply"
    assert answer(net, conn, request(3))["type"] == "reply"
    assert not [c for c in net.calls if isinstance(c, Authorize)]  # the fast path: no call
    assert_forbidden(answer(net, conn, join(4, "lobby", ns="/other")), 4)
    (call,) = [c for c in net.calls if isinstance(c, Authorize)]
    assert (call.ns, call.action, call.room, call.claims) == ("/other", "join", "lobby", ANN.claims)


def test_a_hook_that_raises_refuses(caplog: pytest.LogCaptureFixture) -> None:
    net = net_with_users()

    @net.namespaces["/"].authorize_join
    def broken(ctx: Context, room: str) -> bool:
        raise RuntimeError("bug")

    conn, _ = hello(net, "ann-token")
    assert_forbidden(answer(net, conn, join(1, "lobby")), 1)
    assert "join check in '/' raised" in caplog.text


def test_the_rooms_claim_allows_listed_rooms_and_prefixes_only() -> None:
    net = net_with_users()
    guard_rooms(net.namespaces["/"], "rooms")
    conn, _ = hello(net, "ann-token")
    assert answer(net, conn, join(1, "lobby"))["type"] == "reply"
    assert answer(net, conn, join(2, "team-a"))["type"] == "reply"
    assert_forbidden(answer(net, conn, join(3, "lobby2")), 3)
    assert_forbidden(answer(net, conn, join(4, "team")), 4)
    assert answer(net, conn, publish(5, "team-a"))["type"] == "reply"
    root, _ = hello(net, "root-token")
    assert answer(net, root, join(1, "anything"))["type"] == "reply"


def test_a_session_restored_after_its_loss_is_put_back_only_in_rooms_its_claims_allow() -> None:
    net = net_with_users()
    guard_rooms(net.namespaces["/"], "rooms")
    streams = [
        {"stream": p.room_stream("/", room), "epoch": "e", "offset": 0, "ns": "/", "room": room}
        for room in ("lobby", "admins")
    ]
    resume = {"token": "lost", "session": "gone", "last_reply": 0, "streams": streams}
    conn = net.open()
    net.send(
        conn, {"type": "hello", "protocol": 1, "auth": {"token": "ann-token"}, "resume": resume}
    )
    welcome, *rest = net.frames(conn)
    assert welcome["resumed"] is False
    assert [f["room"] for f in rest if f.get("reason") == "not_rejoined"] == ["admins"]
    checked = [(c.room, c.claims) for c in net.calls if isinstance(c, Authorize)]
    assert checked == [("lobby", ANN.claims), ("admins", ANN.claims)]


def test_room_patterns() -> None:
    assert room_allowed(["a", "b-*"], "a")
    assert room_allowed(["b-*"], "b-1")
    assert room_allowed(["*"], "")
    assert room_allowed(["b*"], "b")
    assert not room_allowed(["a"], "ab")
    assert not room_allowed(["a*b"], "a-b")
    assert not room_allowed("a", "a")  # a claim that is not a list refuses
    assert not room_allowed(None, "a")
    assert not room_allowed([1, None], "1")


def test_forbidden_is_its_own_remote_error() -> None:
    error = remote_error("forbidden", "not allowed to join 'x'")
    assert isinstance(error, Forbidden)
    assert isinstance(error, RemoteError)
    assert p.ErrorCode.FORBIDDEN.value == "forbidden"


# ----------------------------------------------------------------------
# End to end


async def test_async_hooks_make_the_client_raise_forbidden_and_carry_on() -> None:
    server = Server(authenticate=lambda auth: ANN if auth == {"token": "ann"} else None)
    space = server.namespace("/chat")

    @space.on("echo")
    def echo(ctx: Context, data: Any) -> Any:
        return [ctx.user, ctx.claims["role"], data]

    @space.authorize_join
    async def may_join(ctx: Context, room: str) -> bool:
        await asyncio.sleep(0)
        return room in ctx.claims["rooms"]

    @space.authorize_publish
    async def may_publish(ctx: Context, room: str, event: str) -> bool:
        return event == "say"

    @space.authorize_call
    async def may_call(ctx: Context, event: str) -> bool:
        return event == "echo"

    async with (
        server.serving("127.0.0.1", 0),
        Client(server.url, auth={"token": "ann"}) as client,
    ):
        chat = client.namespace("/chat")
        with pytest.raises(Forbidden, match="forbidden: not allowed to join 'admins'"):
            await chat.join("admins")
        await chat.join("lobby")
        with pytest.raises(Forbidden):
            await chat.publish("lobby", "shout", 1)
        assert await chat.publish("lobby", "say", 2) == 1
        with pytest.raises(Forbidden):
            await chat.request("other", 3)
        with pytest.raises(Forbidden):
            await chat.emit("other", 3)
        assert await chat.request("echo", 4) == ["ann", "user", 4]
        assert client.state is ConnectionState.CONNECTED
        assert client.counters["connections"] == 1  # never reconnected


async def test_authorize_receive_guards_direct_sends_with_the_recipients_identity() -> None:
    users = {"ann": ANN, "root": ROOT}
    server = Server(authenticate=lambda auth: users.get((auth or {}).get("token", "")))
    space = server.namespace("/")
    asked: list[tuple[str | None, str]] = []

    @space.authorize_receive
    def may_receive(ctx: Context, event: str) -> bool:
        asked.append((ctx.user, event))
        return ctx.claims.get("role") == "admin"

    @space.on("dm")
    async def dm(ctx: Context, data: dict[str, str]) -> None:
        await ctx.send(data["to"], "dm", {"from": ctx.user})

    async with (
        server.serving("127.0.0.1", 0),
        Client(server.url, auth={"token": "ann"}) as ann,
        Client(server.url, auth={"token": "root"}) as root,
    ):
        got: asyncio.Queue[Any] = asyncio.Queue()
        root.on("dm")(got.put_nowait)
        assert ann.session_id is not None
        assert root.session_id is not None
        await ann.emit("dm", {"to": root.session_id})
        assert await asyncio.wait_for(got.get(), 10) == {"from": "ann"}
        with pytest.raises(Forbidden, match="may not receive 'dm'"):
            await root.emit("dm", {"to": ann.session_id})
        with pytest.raises(Forbidden):
            await server.send_to("no-such-session", "dm", {})  # unknown: no claims
        assert asked == [("root", "dm"), ("ann", "dm"), (None, "dm")]
        assert ann.state is ConnectionState.CONNECTED


def test_the_rooms_claim_flag_needs_jwt_and_is_read_from_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = argparse.ArgumentParser()
    add_jwt_flags(parser)
    with pytest.raises(SystemExit):
        jwt_authenticator(parser, parser.parse_args(["--jwt-rooms-claim", "rooms"]))
    monkeypatch.setenv("RTCHAT_JWT_ROOMS_CLAIM", "chan")
    args = parser.parse_args(["--jwt-secret", "s" * 32])
    assert jwt_authenticator(parser, args) is not None
    assert args.jwt_rooms_claim == "chan"
    check = rooms_claim(args.jwt_rooms_claim)
    ctx = Context(server=None, session_id="s", user="u", ns="/", claims={"chan": ["x"]})  # type: ignore[arg-type]
    assert check(ctx, "x")
    assert check(ctx, "x", "m")
    assert not check(ctx, "y")


async def test_rtchat_server_guards_the_rooms_of_slash_with_jwt_rooms_claim() -> None:
    server = await spawn_server("--jwt-secret", SECRET, "--jwt-rooms-claim", "chan")
    try:
        url = f"ws://127.0.0.1:{server.port}"
        async with Client(url, token=jwt_token(chan=["lobby", "team-*"])) as client:
            await client.join("lobby")
            await client.join("team-7")
            assert await client.publish("team-7", "m", 1) == 1
            with pytest.raises(Forbidden):
                await client.join("admins")
            assert await client.request("echo", 2) == 2  # calls are not guarded by it
        async with Client(url, token=jwt_token()) as bare:  # no claim: no room
            with pytest.raises(Forbidden):
                await bare.join("lobby")
    finally:
        await server.kill()

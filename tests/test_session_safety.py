"""Session safety (issue 13 item 3): what a resume token and a session id are worth.

On the hub (``HubNet``: the real hub and memory broker on a fake clock), with
identities from real JWTs: a resume with another identity's token, a forged
token or an expired one is refused, which means (PROTOCOL §10.4) a new
session, and the session the token named is not taken over: not attached,
not closed, its rooms and inbox not handed over, still resumable by its own
identity. A session id seen in a delivery (``sender``) neither resumes that
session nor sends as it. Also: tokens carry at least 128 bits from ``secrets``.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from rtchat_sdk import protocol as p
from server_ref.auth import JwtAuthenticator
from server_ref.config import ServerConfig
from server_ref.core.commands import Identity
from server_ref.core.hub import Hub
from tests.hubnet import HubNet

pytestmark = pytest.mark.timeout(20)

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret!"
ROOM = p.room_stream("/", "r")


def jwt_users() -> dict[str, str | Identity]:
    """Tokens to the identities a real JwtAuthenticator finds in them."""
    auth = JwtAuthenticator(secret=SECRET)
    out: dict[str, str | Identity] = {}
    for user in ("ann", "bob"):
        token = jwt.encode({"sub": user, "exp": time.time() + 3600}, SECRET, algorithm="HS256")
        out[user] = auth.verify(token)
    return out


def make_net(**config: Any) -> HubNet:
    return HubNet(ServerConfig(**config), users=jwt_users())


def hello(
    net: HubNet, user: str, resume: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    fields: dict[str, Any] = {"auth": {"token": user}}
    if resume is not None:
        fields["resume"] = {"last_reply": 0, "streams": [], **resume}
    return net.hello(**fields)


def joined(net: HubNet, conn: int, room: str = "r", message_id: int = 1) -> str:
    """Join; returns the room stream's epoch."""
    net.send(conn, {"type": "join", "id": message_id, "room": room})
    reply = net.frames(conn)[-1]
    assert reply["type"] == "reply"
    epoch: str = reply["data"]["epoch"]
    return epoch


def assert_untouched(net: HubNet, ann: int, welcome: dict[str, Any], new: dict[str, Any]) -> None:
    """``new`` is a new session; ann's session and connection carry on as before."""
    assert new["resumed"] is False
    assert new["session"] != welcome["session"]
    assert new["token"] != welcome["token"]
    assert ann not in net.closed  # no 4006: the session was not taken over
    net.publish(ROOM, "after")  # ann still gets her room's deliveries
    assert [f["data"] for f in net.frames(ann)] == ["after"]


def test_a_resume_with_another_identitys_token_gets_a_new_session() -> None:
    net = make_net()
    ann, welcome = hello(net, "ann")
    epoch = joined(net, ann)
    resume = {"token": welcome["token"], "session": welcome["session"]}
    bob, new = hello(net, "bob", resume)
    assert_untouched(net, ann, welcome, new)
    assert net.frames(bob) == []  # ann's room and inbox were not handed over
    net.close(ann, p.CloseCode.GOING_AWAY)  # detached: resumable, but only by ann
    _, detached = hello(net, "bob", resume)
    assert detached["resumed"] is False
    assert detached["session"] != welcome["session"]
    net.publish(ROOM, "missed")
    seen = {"stream": ROOM, "epoch": epoch, "offset": 1, "ns": "/", "room": "r"}  # "after"
    again = net.open()
    back = {"last_reply": 0, **resume, "streams": [seen]}
    net.send(again, {"type": "hello", "protocol": 1, "auth": {"token": "ann"}, "resume": back})
    frames = net.frames(again)
    assert (frames[0]["resumed"], frames[0]["session"]) == (True, welcome["session"])
    assert [f["data"] for f in frames if f["type"] == "message"] == ["missed"]  # replayed


def test_a_resume_with_a_forged_token_gets_a_new_session() -> None:
    net = make_net()
    ann, welcome = hello(net, "ann")
    joined(net, ann)
    forged = {"token": welcome["token"] + "x", "session": welcome["session"]}
    _, new = hello(net, "ann", forged)  # even by the same identity
    assert_untouched(net, ann, welcome, new)


def test_a_resume_with_an_expired_token_gets_a_new_session() -> None:
    net = make_net(session_ttl=30)
    ann, welcome = hello(net, "ann")
    joined(net, ann)
    net.close(ann, p.CloseCode.GOING_AWAY)
    net.advance(30.5)  # past session_ttl on the fake clock
    resume = {"token": welcome["token"], "session": welcome["session"]}
    again, new = hello(net, "ann", resume)
    assert new["resumed"] is False
    assert new["session"] != welcome["session"]
    assert new["token"] != welcome["token"]
    net.publish(ROOM, "after")
    assert net.frames(again) == []  # the expired session's room is not its successor's


def test_a_session_id_seen_in_a_delivery_is_not_a_credential() -> None:
    net = make_net()
    ann, ann_welcome = hello(net, "ann")
    bob, _ = hello(net, "bob")
    joined(net, ann)
    joined(net, bob)
    net.send(ann, {"type": "publish", "id": 2, "room": "r", "event": "m", "data": "hi"})
    (delivery,) = [f for f in net.frames(bob) if f["type"] == "message"]
    seen = delivery["sender"]
    assert seen == ann_welcome["session"]

    # Bob presents the id as a resume token, as the token and the session alike.
    thief, new = hello(net, "bob", {"token": seen, "session": seen})
    assert new["resumed"] is False
    assert new["session"] != seen
    assert ann not in net.closed

    # Nor can he send as ann: a frame's sender is the session of its connection.
    joined(net, thief)
    net.frames(ann)
    frame = {"type": "publish", "id": 2, "room": "r", "event": "m", "data": "x", "sender": seen}
    net.send(thief, frame)
    (forged,) = [f for f in net.frames(ann) if f["type"] == "message"]
    assert forged["sender"] == new["session"]


def test_resume_tokens_carry_at_least_128_bits_from_secrets() -> None:
    hub = Hub(ServerConfig(), namespaces={}, node="n")
    tokens = {hub._new_session()[1] for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) >= 43 for t in tokens)  # token_urlsafe(32): 256 bits in 43 characters

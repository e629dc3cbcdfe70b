"""JWT authentication (issue 13 item 1): the authenticator, the client's token, expiry.

Unit tests of ``JwtAuthenticator`` with a fake wall clock; end-to-end tests
against a real ``Server``: bad tokens refused at once (4001 and a reason, no
reconnect loop), a token callable refreshing across a refusal, a server-side
drop and an in-connection expiry (4008, then a resume with nothing lost), the
``Authorization: Bearer`` header; and ``rtchat-server``'s JWT flags as a process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import connect

from rtchat_sdk import Client, ConnectionFailed, ConnectionState, ReconnectPolicy, Unauthorized
from rtchat_sdk.protocol import CloseCode
from server_ref import Server, ServerConfig
from server_ref.auth import JwtAuthenticator
from server_ref.errors import CredentialsRefused
from tests.helpers import Inbox
from tests.test_server_cli import run_cli, spawn_server

pytestmark = pytest.mark.timeout(20)

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret!"  # 35 bytes: HS256 wants at least 32
FAST = ReconnectPolicy(initial_delay=0.01, max_delay=0.02)
NOW = 1_800_000_000.0


def token(sub: str = "ann", *, key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    body = {"sub": sub, "exp": time.time() + 60, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ----------------------------------------------------------------------
# The authenticator


def test_a_valid_token_gives_its_subject_claims_and_remaining_lifetime() -> None:
    auth = JwtAuthenticator(secret=SECRET, audience="chat", issuer="idp", clock=lambda: NOW)
    t = token(exp=NOW + 90, aud="chat", iss="idp", role="admin")
    identity = auth({"token": t})
    assert identity.user == "ann"
    assert identity.claims["role"] == "admin"
    assert identity.expires_in == pytest.approx(90)


@pytest.mark.parametrize(
    ("claims", "key", "why"),
    [
        ({"exp": NOW - 1}, SECRET, "token expired"),
        ({"nbf": NOW + 30}, SECRET, "token not yet valid"),
        ({"aud": "other"}, SECRET, "another audience"),
        ({"aud": None}, SECRET, "no .aud. claim"),  # an audience is configured: aud required
        ({"iss": "evil"}, SECRET, "another issuer"),
        ({}, "x" * 40, "signature does not verify"),  # forged: signed with another secret
        ({"sub": None}, SECRET, "no 'sub' claim"),
        ({"exp": None}, SECRET, "no 'exp' claim"),
    ],
)
def test_bad_tokens_are_refused_saying_why(claims: dict[str, Any], key: str, why: str) -> None:
    auth = JwtAuthenticator(secret=SECRET, audience="chat", issuer="idp", clock=lambda: NOW)
    body = {"exp": NOW + 60, "aud": "chat", "iss": "idp", **claims}
    t = token(key=key, **body)
    with pytest.raises(CredentialsRefused, match=why):
        auth({"token": t})


@pytest.mark.parametrize("auth", [None, {}, {"token": ""}, {"token": 7}, {"token": "not.a.jwt"}])
def test_no_token_or_garbage_is_refused(auth: dict[str, Any] | None) -> None:
    with pytest.raises(CredentialsRefused):
        JwtAuthenticator(secret=SECRET)(auth)


def test_leeway_tolerates_clock_skew_both_ways() -> None:
    auth = JwtAuthenticator(secret=SECRET, leeway=10, clock=lambda: NOW)
    assert auth({"token": token(exp=NOW - 5)}).user == "ann"
    assert auth({"token": token(exp=NOW + 60, nbf=NOW + 5)}).user == "ann"
    with pytest.raises(CredentialsRefused, match="expired"):
        auth({"token": token(exp=NOW - 11)})


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
def test_public_key_tokens(kind: str) -> None:
    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    auth = JwtAuthenticator(public_key=pem, clock=lambda: NOW)
    assert auth.algorithms == [kind]
    assert auth({"token": token(key=private, algorithm=kind, exp=NOW + 5)}).user == "ann"
    # The classic forgery: an HS256 token whose HMAC key is the public key itself.
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"sub": "mallory", "exp": NOW + 60}).encode())
    sig = _b64(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(CredentialsRefused):
        auth({"token": f"{head}.{body}.{sig}"})


def test_configuration_mistakes_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        JwtAuthenticator()
    with pytest.raises(ValueError, match="exactly one"):
        JwtAuthenticator(secret=SECRET, public_key=b"pem")
    with pytest.raises(ValueError, match="32 bytes"):
        JwtAuthenticator(secret="short")
    with pytest.raises(ValueError, match="algorithms"):
        JwtAuthenticator(secret=SECRET, algorithms=["RS256"])
    with pytest.raises(ValueError, match="PEM public key"):
        JwtAuthenticator(public_key=b"not a key")


# ----------------------------------------------------------------------
# End to end


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server(ServerConfig(token_expiry_grace=0.3), authenticate=JwtAuthenticator(secret=SECRET))
    async with srv.serving("127.0.0.1", 0):
        yield srv


def _attempts(client: Client) -> list[int]:
    seen: list[int] = []
    client.on_attempt(lambda attempt, url: seen.append(attempt))
    return seen


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (token(exp=time.time() - 5), "expired"),
        (token(nbf=time.time() + 600), "not yet valid"),
        (token(key="y" * 40), "signature"),
        ("garbage", "invalid token"),
    ],
)
async def test_a_bad_token_raises_unauthorized_at_once_without_reconnecting(
    server: Server, bad: str, why: str
) -> None:
    client = Client(server.url, token=bad, reconnect=FAST, retry_first_connect=True)
    attempts = _attempts(client)
    async with asyncio.timeout(1.0):
        with pytest.raises(Unauthorized, match=why):
            await client.connect()
    assert attempts == [1]
    assert client.counters["failed_attempts"] == 1
    assert client.counters["connections"] == 0  # never welcomed


async def test_wrong_audience_is_refused_end_to_end() -> None:
    auth = JwtAuthenticator(secret=SECRET, audience="chat")
    async with Server(authenticate=auth).serving("127.0.0.1", 0) as srv:
        client = Client(srv.url, token=token(aud="billing"), reconnect=FAST)
        async with asyncio.timeout(1.0):
            with pytest.raises(Unauthorized, match="audience"):
                await client.connect()
        assert client.counters["failed_attempts"] == 1


async def test_a_refused_callable_token_is_renewed_once(server: Server) -> None:
    given = [token(exp=time.time() - 5), token()]
    calls: list[str] = []

    async def issue() -> str:
        calls.append(given[min(len(calls), 1)])
        return calls[-1]

    async with Client(server.url, token=issue, reconnect=FAST) as client:
        assert client.state is ConnectionState.CONNECTED
    assert calls == given  # one dial each: the renewal is tried once, at once

    stale = token(exp=time.time() - 5)
    same_calls: list[int] = []

    def same() -> str:
        same_calls.append(1)
        return stale

    client = Client(server.url, token=same, reconnect=FAST, retry_first_connect=True)
    with pytest.raises(Unauthorized):
        await client.connect()
    assert len(same_calls) == 2  # asked again once; the same token is not tried again
    assert client.counters["failed_attempts"] == 1


async def test_a_callable_token_is_fetched_again_after_a_server_side_drop(
    server: Server,
) -> None:
    calls: list[str] = []

    def issue() -> str:
        calls.append(token(n=len(calls)))
        return calls[-1]

    async with Client(server.url, token=issue, reconnect=FAST) as client:
        back = asyncio.Event()
        client.on_state_change(lambda s: back.set() if s is ConnectionState.CONNECTED else None)
        first = client.session_id
        for transport in list(server._transports.values()):
            transport.abort()
        async with asyncio.timeout(5):
            await back.wait()
        assert client.session_id == first  # resumed
    assert len(calls) == 2


async def test_a_token_expiring_in_the_connection_is_refreshed_and_the_session_resumed(
    server: Server,
) -> None:
    issued: list[float] = []

    def issue() -> str:
        issued.append(time.time())
        return token(exp=time.time() + (0.5 if len(issued) == 1 else 600))

    async with Client(server.url, token=issue, reconnect=FAST) as client:
        inbox = Inbox(client)
        await client.join("r")
        states: list[ConnectionState] = []
        back = asyncio.Event()
        publishing: list[asyncio.Future[int]] = []

        def on_state(state: ConnectionState) -> None:
            states.append(state)
            if state is ConnectionState.RECONNECTING:
                publishing.append(asyncio.ensure_future(server.publish("r", "m", "while away")))
            elif state is ConnectionState.CONNECTED:
                back.set()

        client.on_state_change(on_state)
        first = client.session_id
        await server.publish("r", "m", "before")
        async with asyncio.timeout(5):
            await back.wait()
        assert states == [ConnectionState.RECONNECTING, ConnectionState.CONNECTED]
        assert client.session_id == first
        await asyncio.gather(*publishing)
        await server.publish("r", "m", "after")
        got = await inbox.settle(server)
        assert got == ["before", "while away", "after"]
        assert client.counters["reconnects"] == 1
        assert client.counters["failed_attempts"] == 0
    assert len(issued) == 2


async def test_the_server_closes_a_stale_connection_with_4008(server: Server) -> None:
    async with connect(server.url) as ws:
        hello = {"type": "hello", "protocol": 1, "auth": {"token": token(exp=time.time() + 0.3)}}
        await ws.send(json.dumps(hello))
        assert json.loads(await ws.recv())["type"] == "welcome"
        async with asyncio.timeout(5):
            await ws.wait_closed()
        assert ws.close_code == CloseCode.TOKEN_EXPIRED


async def test_an_authorization_header_is_accepted_and_the_hello_token_wins(
    server: Server,
) -> None:
    headers = {"Authorization": f"Bearer {token('bob')}"}
    async with connect(server.url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome"
        assert server.hub.sessions.by_id[welcome["session"]].record.user == "bob"
        assert server.hub.sessions.by_id[welcome["session"]].claims["sub"] == "bob"
    async with connect(server.url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1, "auth": {"token": "bad"}}))
        refusal = json.loads(await ws.recv())
        assert refusal["code"] == "unauthorized"
        await ws.wait_closed()
        assert ws.close_code == CloseCode.UNAUTHORIZED
        assert (ws.close_reason or "").startswith("credentials were refused: invalid token")


def test_the_client_checks_its_token_options() -> None:
    with pytest.raises(ValueError, match="not both"):
        Client("ws://127.0.0.1:1", token="t", auth={"token": "u"})
    with pytest.raises(TypeError, match="token must be"):
        Client("ws://127.0.0.1:1", token=42)  # type: ignore[arg-type]


async def test_a_failing_token_callable_is_a_connection_failure(server: Server) -> None:
    def broken() -> str:
        raise RuntimeError("identity provider down")

    client = Client(server.url, token=broken, reconnect=FAST)
    with pytest.raises(ConnectionFailed, match="identity provider down") as caught:
        await client.connect()
    assert not isinstance(caught.value, Unauthorized)


async def test_the_token_and_the_apps_auth_travel_together(server: Server) -> None:
    seen: list[dict[str, Any] | None] = []
    verify = JwtAuthenticator(secret=SECRET)

    def authenticate(auth: dict[str, Any] | None) -> Any:
        seen.append(auth)
        return verify(auth)

    async with Server(authenticate=authenticate).serving("127.0.0.1", 0) as srv:
        t = token()
        async with Client(srv.url, token=t, auth={"device": "phone"}):
            pass
    assert seen == [{"device": "phone", "token": t}]


# ----------------------------------------------------------------------
# rtchat-server's flags


async def _hello(port: int, t: str) -> dict[str, Any]:
    async with connect(f"ws://127.0.0.1:{port}") as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1, "auth": {"token": t}}))
        frame: dict[str, Any] = json.loads(await ws.recv())
        return frame


@pytest.mark.parametrize("by_env", [False, True])
async def test_rtchat_server_verifies_jwts_from_its_flags_or_environment(by_env: bool) -> None:
    flags = ("--jwt-secret", SECRET, "--jwt-audience", "chat")
    env = {"RTCHAT_JWT_SECRET": SECRET, "RTCHAT_JWT_AUDIENCE": "chat"}
    server = await spawn_server(*(() if by_env else flags), env=env if by_env else None)
    try:
        assert (await _hello(server.port, token(aud="chat")))["type"] == "welcome"
        refused = await _hello(server.port, token(aud="other"))
        assert (refused["code"], refused["message"]) == (
            "unauthorized",
            "credentials were refused: token is for another audience",
        )
    finally:
        await server.kill()


async def test_rtchat_server_takes_a_public_key_file(tmp_path: Any) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "key.pem").write_bytes(pem)
    server = await spawn_server("--jwt-public-key", str(tmp_path / "key.pem"), "--jwt-leeway", "5")
    try:
        good = token(key=private, algorithm="ES256")
        assert (await _hello(server.port, good))["type"] == "welcome"
        assert (await _hello(server.port, token()))["code"] == "unauthorized"
    finally:
        await server.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--jwt-secret", "short"), "--jwt-secret: an HS256 secret needs at least 32 bytes"),
        (("--jwt-public-key", "/nonexistent.pem"), "--jwt-public-key: cannot read"),
        (("--jwt-secret", SECRET, "--jwt-leeway", "-1"), "--jwt-leeway must be >= 0"),
        (("--jwt-audience", "chat"), "need --jwt-secret or --jwt-public-key"),
    ],
)
def test_bad_jwt_flags_exit_2(args: tuple[str, ...], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert re.search(re.escape(message), result.stderr), result.stderr

"""The client's life cycle as a new user meets it: bad URLs, failed connects,
retries, cancellation, the words of every failure, and what the counters count."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage, InvalidProxyStatus, InvalidStatus
from websockets.http11 import Response

from rtchat_sdk import (
    Client,
    ConnectionFailed,
    ConnectionLost,
    ConnectionState,
    GaveUp,
    ReconnectPolicy,
    ValidationFailed,
)
from rtchat_sdk.aio.connection import _FailureLog
from rtchat_sdk.aio.endpoint import describe_failure
from server_ref import Server
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.timeout(20)

FAST = ReconnectPolicy(initial_delay=0.01, max_delay=0.02)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reports (never-retrieved exceptions, destroyed tasks)."""
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    loop.set_exception_handler(None)


# -- a URL that can never work is a usage error, at once ---------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://127.0.0.1:8765", "rtchat speaks ws:// and wss://, not ftp://"),
        ("http://127.0.0.1:8765", "not http://"),
        ("127.0.0.1:8765", "expected ws://HOST[:PORT]"),
        ("ws://:8765", "hostname isn't provided"),
        ("ws://127.0.0.1:99999", "Port out of range"),
        ("", "expected ws://HOST[:PORT]"),
    ],
)
def test_an_unusable_url_is_a_value_error_from_the_constructor(url: str, words: str) -> None:
    with pytest.raises(ValueError, match="invalid URL") as caught:
        Client(url)
    assert words in str(caught.value)
    assert not isinstance(caught.value, ConnectionFailed)


def test_every_url_of_a_list_is_checked() -> None:
    with pytest.raises(ValueError, match="ftp://"):
        Client(["ws://127.0.0.1:1", "ftp://127.0.0.1:2"])


# -- no task outlives a client that stopped ------------------------------------


async def test_a_failed_first_connect_leaves_no_task(loop_errors: list[dict[str, Any]]) -> None:
    client = Client(f"ws://127.0.0.1:{_closed_port()}")
    with pytest.raises(ConnectionFailed, match="connection refused"):
        async with client:
            pass
    assert _other_tasks() == set()
    assert client.state is ConnectionState.CLOSED
    del client
    gc.collect()
    assert loop_errors == []


async def test_a_client_that_gives_up_by_itself_leaves_no_task() -> None:
    client = Client(
        f"ws://127.0.0.1:{_closed_port()}",
        retry_first_connect=True,
        reconnect=ReconnectPolicy(initial_delay=0.01, max_attempts=2),
    )
    with pytest.raises(GaveUp):
        await client.connect()
    assert _other_tasks() == set()


async def test_a_client_stopped_by_the_server_without_close_leaves_no_task(
    server: Server,
) -> None:
    """A fatal end (here: reconnection disabled, server gone) ends every task,
    though the app never calls close()."""
    client = Client(server.url, reconnect=ReconnectPolicy(enabled=False))
    closed = asyncio.Event()
    client.on_state_change(lambda state: closed.set() if state is ConnectionState.CLOSED else None)
    await client.connect()
    await server.close()
    await asyncio.wait_for(closed.wait(), 5)
    tasks = _other_tasks()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(t.done() for t in tasks)


async def test_close_twice_and_concurrently(server: Server) -> None:
    client = Client(server.url)
    await client.connect()
    await asyncio.gather(client.close(), client.close())
    await client.close()
    assert _other_tasks() == set()


# -- retrying the first connect: visible, and cancellable cleanly ---------------


async def test_retry_first_connect_logs_each_failure_and_cancels_cleanly(
    caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    url = f"ws://127.0.0.1:{_closed_port()}"
    client = Client(url, retry_first_connect=True, reconnect=FAST)
    third = asyncio.Event()
    client.on_attempt(lambda attempt, _url: third.set() if attempt >= 3 else None)
    with caplog.at_level(logging.DEBUG, logger="rtchat_sdk"):
        connecting = asyncio.create_task(client.connect())
        await asyncio.wait_for(third.wait(), 5)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings, "the first failed attempt is logged at WARNING"
    first = warnings[0].getMessage()
    assert "connection attempt failed" in first
    assert "connection refused" in first  # the reason
    assert f"retrying {url} in " in first  # and the next delay
    # The failures after it, within the rate limit, went to DEBUG instead.
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "retrying" in r.msg]
    assert len(warnings) + len(debug) >= 2
    assert len(warnings) == 1
    assert _other_tasks() == set()
    del client, connecting
    gc.collect()
    assert loop_errors == []


def test_failure_log_rate_limit_with_a_fake_clock(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    failures = _FailureLog(lambda: now[0])
    error = ConnectionFailed("cannot connect to ws://h:1: connection refused")

    def report() -> None:
        failures.report(error, lost=False, next_url="ws://h:1", delay=0.5)

    with caplog.at_level(logging.WARNING, logger="rtchat_sdk"):
        report()  # t=0: logged
        now[0] = 5.0
        report()  # within 10 s: held back
        report()
        now[0] = 10.0
        report()  # the interval has passed: logged, with the count held back
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].endswith("retrying ws://h:1 in 0.50s")
    assert messages[1].endswith("(2 more failures since the last report)")


# -- every ConnectionFailed says what happened ----------------------------------


def _response(status: int) -> Response:
    return Response(status, "", Headers())


_PLAIN = "ws://127.0.0.1:8765"
_TLS = "wss://127.0.0.1:8765"


@pytest.mark.parametrize(
    ("url", "exc", "proxy", "words"),
    [
        (_TLS, ConnectionResetError(), None, "TLS handshake failed: connection reset"),
        (_TLS, ConnectionResetError(), None, "is the server serving TLS?"),
        (_PLAIN, ConnectionResetError(), None, "connection reset by the peer"),
        (_PLAIN, ConnectionRefusedError(111, "Connect call failed"), None, "connection refused"),
        (_PLAIN, ConnectionRefusedError(), "http://p:3128", "through proxy http://p:3128"),
        (_PLAIN, TimeoutError(), None, "no answer within connect_timeout=2s"),
        (_PLAIN, socket.gaierror(-2, "Name or service not known"), None, "'127.0.0.1'"),
        (_PLAIN, InvalidStatus(_response(404)), None, "answered HTTP 404"),
        (_PLAIN, InvalidMessage("did not receive a valid HTTP response"), None, "needs wss://"),
        (_PLAIN, InvalidProxyStatus(_response(407)), "http://p:3128", "HTTP 407"),
        (_TLS, ssl.SSLError(1, "[SSL] wrong version number"), None, "TLS handshake failed"),
        (_TLS, ssl.SSLCertVerificationError(1, "self-signed"), None, "verification failed"),
        (_PLAIN, ImportError("requires python-socks"), "socks5://p:1080", "python-socks"),
        (_PLAIN, OSError(), None, "OSError"),
    ],
)
def test_every_connect_failure_says_what_happened(
    url: str, exc: BaseException, proxy: str | None, words: str
) -> None:
    message = describe_failure(exc, url, timeout=2.0, proxy=proxy)
    assert words in message
    assert message.strip()
    assert not message.endswith(": ")


async def test_wss_to_a_plain_server_says_tls_failed(server: Server) -> None:
    url = server.url.replace("ws://", "wss://")
    with pytest.raises(ConnectionFailed) as caught:
        async with Client(url, proxy=None):
            pass
    message = str(caught.value)  # the TLS library's words for it vary: reset, version...
    assert message.startswith(f"cannot connect to {url}: TLS handshake failed: ")
    assert message.endswith(" (is the server serving TLS? use ws:// for a plain one)")


async def test_an_http_server_that_is_not_rtchat_is_named() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    http = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = http.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectionFailed, match="answered HTTP 404 instead of switching"):
            async with Client(f"ws://127.0.0.1:{port}", proxy=None):
                pass
    finally:
        http.close()
        await http.wait_closed()


# -- counters ---------------------------------------------------------------------


async def test_ping_with_no_connection_to_ping_over_raises_at_once(server: Server) -> None:
    """From a lost connection to the next welcome ``ping()`` raises ConnectionLost:
    it asks the core, which knows there is no connection, including during the
    backoff wait before the next attempt reports ``reconnecting``."""
    lost = asyncio.Event()

    class OnLoss(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("connection lost"):
                lost.set()  # logged as the link starts its backoff wait

    handler = OnLoss()
    logging.getLogger("rtchat_sdk").addHandler(handler)
    try:
        async with FaultProxy(server.port) as proxy:
            slow = ReconnectPolicy(initial_delay=30.0, max_delay=30.0)
            async with Client(proxy.url, reconnect=slow, proxy=None) as client:
                assert await client.ping() >= 0.0
                proxy.refuse(True)  # the next attempts fail: no welcome until the test ends
                proxy.drop()
                await asyncio.wait_for(lost.wait(), 5)
                with pytest.raises(ConnectionLost, match="not connected"):
                    await asyncio.wait_for(client.ping(), 5)
    finally:
        logging.getLogger("rtchat_sdk").removeHandler(handler)


async def test_counters_count_connections_reconnects_and_failed_attempts(
    server: Server,
) -> None:
    """One link cut, two refused attempts, then back: 2 connections, 1 reconnect,
    2 failed attempts, each message sent once and none resent (all were answered)."""
    async with FaultProxy(server.port) as proxy:
        attempts: list[int] = []
        third_try = asyncio.Event()
        back = asyncio.Event()

        def on_attempt(attempt: int, _url: str) -> None:
            attempts.append(attempt)
            if attempt == 3:
                proxy.refuse(False)  # the third try after the cut gets through
                third_try.set()

        async with Client(proxy.url, reconnect=FAST, proxy=None) as client:
            client.on_attempt(on_attempt)
            client.on_state_change(
                lambda state: back.set() if state is ConnectionState.CONNECTED else None
            )
            await client.request("echo", 1, timeout=5)
            await client.request("echo", 2, timeout=5)
            proxy.refuse(True)
            proxy.drop()
            await asyncio.wait_for(third_try.wait(), 5)
            await asyncio.wait_for(back.wait(), 5)
            await client.request("echo", 3, timeout=5)
            counters = client.counters
    assert attempts == [1, 2, 3]
    assert counters["connections"] == 2
    assert counters["reconnects"] == 1
    assert counters["failed_attempts"] == 2
    assert counters["sent"] == 3
    assert counters["resent"] == 0
    assert counters["outbox_size"] == 0


@pytest.mark.parametrize(
    ("auth", "words"),
    [
        ({"token": "t", "score": float("nan")}, "auth.score is NaN"),
        ({"limits": [1.0, float("-inf")]}, "auth.limits[1] is -Infinity"),
        ({"when": object()}, "auth cannot be sent as JSON"),
    ],
)
def test_auth_that_cannot_travel_in_hello_is_refused_at_once(
    auth: dict[str, Any], words: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        Client("ws://127.0.0.1:8765", auth=auth)
    assert words in str(caught.value)

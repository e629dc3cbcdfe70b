"""TLS end to end: ``wss://`` and long polling over ``https://``, on the built-in port
and under uvicorn, with certificates made at test time (trustme); a certificate from
an unknown CA refused by the client, clearly and without a storm of retries; and
``rtchat-server --certfile --keyfile`` as a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trustme

from rtchat_sdk import Client, ConnectionFailed, GaveUp, ReconnectPolicy
from server_ref import Server, ServerConfig
from server_ref.asgi import uvicorn_listener

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
STEP = 10.0


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with cert.pem and key.pem for 127.0.0.1, and the CA's ca.pem."""
    folder = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return folder


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@contextlib.asynccontextmanager
async def tls_server(cert_files: Path, *, asgi: bool = False) -> AsyncIterator[Server]:
    config = ServerConfig(
        certfile=str(cert_files / "cert.pem"), keyfile=str(cert_files / "key.pem")
    )
    server = Server(config, transport=uvicorn_listener) if asgi else Server(config)
    server.on("echo")(lambda ctx, data: data)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


@pytest.mark.parametrize("asgi", [False, True], ids=["builtin", "uvicorn"])
@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_round_trip_over_tls(
    ca: trustme.CA, cert_files: Path, transport: str, asgi: bool
) -> None:
    async with tls_server(cert_files, asgi=asgi) as server:
        assert server.url.startswith("wss://")
        async with Client(server.url, ssl=client_context(ca), transports=(transport,)) as client:
            assert client.transport == transport
            assert await client.request("echo", "secret", timeout=5) == "secret"


async def test_http_endpoints_answer_over_https(ca: trustme.CA, cert_files: Path) -> None:
    async with (
        tls_server(cert_files) as server,
        httpx.AsyncClient(verify=client_context(ca)) as http,
    ):
        response = await http.get(f"https://127.0.0.1:{server.port}/healthz")
        assert response.status_code == 200


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_certificate_from_an_unknown_ca_is_refused_clearly(
    cert_files: Path, transport: str
) -> None:
    """Verification is on by default: the system CAs do not know trustme's."""
    async with tls_server(cert_files) as server:
        client = Client(server.url, transports=(transport,))
        with pytest.raises(ConnectionFailed, match="TLS certificate verification failed"):
            await asyncio.wait_for(client.connect(), STEP)
        assert client.counters["failed_attempts"] == 1


async def test_a_refused_certificate_is_retried_only_at_the_backoffs_pace(
    cert_files: Path,
) -> None:
    """Not fatal (an operator may renew it), but no storm: the policy's waits and limits."""
    attempts: list[float] = []
    policy = ReconnectPolicy(initial_delay=0.05, max_delay=0.05, max_attempts=3)
    async with tls_server(cert_files) as server:
        client = Client(server.url, reconnect=policy, retry_first_connect=True)
        client.on_attempt(lambda n, url: attempts.append(asyncio.get_running_loop().time()))
        with pytest.raises(GaveUp, match="TLS certificate verification failed"):
            await asyncio.wait_for(client.connect(), STEP)
    assert len(attempts) == 3


async def test_a_wrong_ssl_argument_is_a_usage_error() -> None:
    with pytest.raises(TypeError, match="SSLContext or None"):
        Client("wss://127.0.0.1:1", ssl=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="for wss:// URLs"):
        Client("ws://127.0.0.1:1", ssl=ssl.create_default_context())


async def test_an_embedding_app_passes_its_own_context(ca: trustme.CA) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = Server(ssl=context)
    server.on("echo")(lambda ctx, data: data)
    async with (
        server.serving("127.0.0.1", 0),
        Client(server.url, ssl=client_context(ca)) as client,
    ):
        assert await client.request("echo", 1, timeout=5) == 1


async def test_the_cli_serves_tls_with_certfile_and_keyfile(
    ca: trustme.CA, cert_files: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server_ref",
        "--port",
        "0",
        "--certfile",
        str(cert_files / "cert.pem"),
        "--keyfile",
        str(cert_files / "key.pem"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        match = None
        while match is None:  # log lines come first
            line = (await asyncio.wait_for(proc.stdout.readline(), STEP)).decode()
            assert line, "the server's output ended"
            match = re.search(r"^rtchat server listening on (wss://127\.0\.0\.1:\d+) ", line)
        async with Client(match.group(1), ssl=client_context(ca)) as client:
            assert await client.request("echo", "cli", timeout=5) == "cli"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), STEP)


async def test_the_cli_refuses_a_certificate_it_cannot_load(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server_ref",
        "--certfile",
        str(tmp_path / "missing.pem"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    _, err = await asyncio.wait_for(proc.communicate(), STEP)
    assert proc.returncode == 2
    assert b"--certfile/--keyfile: cannot load the certificate" in err

"""The ``rtchat-server`` command line, run as a real process.

Each test starts ``python -m server_ref --port 0``, learns the port from the
"listening" line, and talks to it over 127.0.0.1 only. Waits are on output
lines and process exit, each with a timeout; every process is killed in a
finally block.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server_ref import ServerConfig
from server_ref.__main__ import OWN_FLAGS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(
    r"^rtchat server listening on ws://127\.0\.0\.1:(\d+)"
    r" \((?:in-memory broker|redis broker at .+?)(, served by uvicorn)?\)$"
)
STEP = 10.0  # generous bound on any one wait; a test only waits this long when it fails


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_cli(*args: str, timeout: float = STEP) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (for invocations that exit by themselves)."""
    return subprocess.run(
        [sys.executable, "-m", "server_ref", *args],
        capture_output=True,
        text=True,
        timeout=timeout,  # kills the child if it overruns
        cwd=ROOT,
        env=_env(),
        check=False,
    )


class ServerProcess:
    """A running ``python -m server_ref``; stdout and stderr merged, read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.output: list[str] = []
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        self.port = 0

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip("\r\n")
            self.output.append(text)
            self._lines.put_nowait(text)
        self._lines.put_nowait(None)

    async def expect(self, pattern: re.Pattern[str] | str, timeout: float = STEP) -> re.Match[str]:
        """Consume output lines until one matches ``pattern``."""
        regex = re.compile(pattern)

        async def scan() -> re.Match[str]:
            while (line := await self._lines.get()) is not None:
                if match := regex.search(line):
                    return match
            raise AssertionError(f"output ended before {regex.pattern!r}:\n{self.transcript()}")

        try:
            return await asyncio.wait_for(scan(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no line matching {regex.pattern!r} within {timeout}s:\n{self.transcript()}"
            ) from None

    async def wait(self, timeout: float = STEP) -> int:
        """Wait for the process to exit and its output to end; returns its exit code."""
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
                await asyncio.shield(self._reader)
                return code
        except TimeoutError:
            raise AssertionError(
                f"server still running after {timeout}s:\n{self.transcript()}"
            ) from None

    def transcript(self) -> str:
        return "\n".join(self.output)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def kill(self) -> None:
        """Kill the process if it still runs, and reap it and its output."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        await self._reader


Spawn = Callable[..., Awaitable[ServerProcess]]


async def spawn_server(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """``python -m server_ref`` on a free loopback port, once it says it listens."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server_ref",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        env={**_env(), **(env or {})},
    )
    server = ServerProcess(proc)
    try:
        server.port = int((await server.expect(LISTENING)).group(1))
    except BaseException:
        await server.kill()
        raise
    return server


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Factory of running servers on a free port; all are killed at the end."""
    started: list[ServerProcess] = []

    async def factory(*args: str) -> ServerProcess:
        server = await spawn_server(*args)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            await server.kill()


async def recv_frame(ws: ClientConnection) -> dict[str, Any]:
    """The next frame from the server, skipping heartbeat pings."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), STEP)
        frame: dict[str, Any] = json.loads(raw)
        if frame.get("type") != "ping":
            return frame


async def handshake(ws: ClientConnection) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "hello", "protocol": 1}))
    welcome = await recv_frame(ws)
    assert welcome["type"] == "welcome", welcome
    return welcome


# ----------------------------------------------------------------------
# Command line


@pytest.mark.timeout(30)
def test_help_lists_every_flag_with_its_default() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    expected: dict[str, object] = {"--host": "127.0.0.1", "--port": 8765, "--log-level": "INFO"}
    for field in dataclasses.fields(ServerConfig):
        if field.name not in OWN_FLAGS:  # not numbers: their flags are tested with them
            expected["--" + field.name.replace("_", "-")] = field.default
    for flag, default in expected.items():
        match = re.search(rf"{re.escape(flag)},? \S+ (.*?)\(default: ([^)]*)\)", text)
        assert match is not None, f"{flag} missing from --help:\n{result.stdout}"
        assert match.group(1).strip(), f"{flag} has no help text"
        assert match.group(2) == str(default), f"{flag}: default {match.group(2)} != {default}"


@pytest.mark.timeout(10)
def test_every_config_field_has_a_flag() -> None:
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    for field in dataclasses.fields(ServerConfig):
        if field.name not in OWN_FLAGS:  # tests/test_tls.py, tests/test_origins.py
            assert defaults[field.name] == field.default


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heartbeat-interval", "-1"], "--heartbeat-interval must be positive"),
        (["--max-in-flight", "0"], "--max-in-flight must be positive"),
        (["--max-in-flight", "5000"], "--dedupe-size must be at least --max-in-flight"),
        (["--max-frame-bytes", "lots"], "argument --max-frame-bytes: invalid int value"),
        (["--session-ttl", "nan"], "argument --session-ttl: must be a finite number"),
        (["--port", "70000"], "argument --port: must be between 0 and 65535"),
        (["--log-level", "chatty"], "argument --log-level: must be one of"),
    ],
)
def test_bad_flag_value_exits_2_with_a_message(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert message in errors[0]


@pytest.mark.timeout(10)
def test_bad_flag_value_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--history-seconds", "-5"])
    assert exc_info.value.code == 2
    assert "--history-seconds must be positive, got -5.0" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_port_in_use_exits_1_with_a_message() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = run_cli("--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"rtchat-server: error: cannot listen on 127.0.0.1:{port}: ")
    assert "listening" not in result.stdout


def test_unreachable_redis_exits_1_within_seconds_with_a_message() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed_port:
        closed_port.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = closed_port.getsockname()[1]
        url = f"redis://127.0.0.1:{port}/0"
        result = run_cli("--port", "0", "--redis", url, "--log-level", "WARNING")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"rtchat-server: error: cannot reach Redis at {url}: ")
    assert "listening" not in result.stdout


def test_redis_url_comes_from_the_environment_and_a_bad_prefix_exits_2() -> None:
    args = build_parser().parse_args([])
    assert args.redis is None  # the tests take REDIS_URL out of their environment
    os.environ["REDIS_URL"] = "redis://example.invalid:6379/0"
    try:
        assert build_parser().parse_args([]).redis == "redis://example.invalid:6379/0"
    finally:
        del os.environ["REDIS_URL"]
    result = run_cli("--redis", "redis://127.0.0.1:1/0", "--redis-prefix", "a b")
    assert result.returncode == 2, result.stderr
    assert "prefix" in result.stderr


# ----------------------------------------------------------------------
# Serving and graceful shutdown


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_echo_then_graceful_shutdown_on_signal(spawn: Spawn, sig: signal.Signals) -> None:
    server = await spawn()
    assert server.port != 0
    async with connect(f"ws://127.0.0.1:{server.port}", proxy=None, open_timeout=STEP) as ws:
        welcome = await handshake(ws)
        assert welcome["protocol"] == 1
        await ws.send(json.dumps({"type": "request", "id": 1, "event": "echo", "data": {"a": 1}}))
        assert await recv_frame(ws) == {"type": "reply", "id": 1, "data": {"a": 1}}

        server.signal(sig)
        notice = await recv_frame(ws)
        assert notice["type"] == "error"
        assert notice["code"] == "shutting_down"
        assert notice["id"] is None
        assert notice["retry_after"] == ServerConfig().shutdown_retry_after
        with pytest.raises(ConnectionClosed):
            await recv_frame(ws)
        assert ws.close_code == 1001
    assert await server.wait() == 0
    assert "Traceback" not in server.transcript()


@pytest.mark.timeout(60)
async def test_shutdown_with_no_clients_exits_0(spawn: Spawn) -> None:
    server = await spawn("--log-level", "DEBUG")
    server.signal(signal.SIGTERM)
    await server.expect("shutting down gracefully")
    assert await server.wait() == 0


@pytest.mark.timeout(60)
async def test_flags_reach_the_server(spawn: Spawn) -> None:
    server = await spawn(
        "--heartbeat-interval", "7.5", "--session-ttl", "42", "--history-size", "9"
    )
    async with connect(f"ws://127.0.0.1:{server.port}", proxy=None, open_timeout=STEP) as ws:
        welcome = await handshake(ws)
    assert welcome["heartbeat"]["interval"] == 7.5
    assert welcome["limits"]["session_ttl"] == 42.0
    assert welcome["limits"]["history_size"] == 9


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_second_signal_exits_at_once(spawn: Spawn, sig: signal.Signals) -> None:
    """A client that never answers the closing handshake holds a graceful shutdown
    for the close timeout (10 s); a second signal ends the process at once, of
    that signal. The wait below is shorter than that close timeout."""
    server = await spawn()
    async with connect(f"ws://127.0.0.1:{server.port}", proxy=None, open_timeout=STEP) as ws:
        await handshake(ws)
        ws.transport.pause_reading()  # never sees the close frame, so never answers it
        try:
            server.signal(sig)
            await server.expect("shutting down gracefully")
            server.signal(sig)
            await server.expect("exiting now")
            assert await server.wait(timeout=5.0) == -sig
        finally:
            ws.transport.resume_reading()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flags", [(), ("--asgi",)], ids=["builtin", "asgi"])
async def test_websocket_long_polling_health_and_the_js_share_one_port(
    spawn: Spawn, flags: tuple[str, ...]
) -> None:
    from rtchat_sdk import Client
    from tests.helpers import http_get

    server = await spawn(*flags, "--demo")
    url = f"ws://127.0.0.1:{server.port}"
    assert await http_get(url, "/readyz") == (200, {"status": "ready"})
    async with httpx.AsyncClient(base_url=url.replace("ws://", "http://")) as http:
        script = await http.get("/rtchat.js")
        assert (script.status_code, script.headers["content-type"]) == (
            200,
            "text/javascript; charset=utf-8",
        )
        page = await http.get("/demo/")
        assert page.status_code == 200
        assert "rtchat.js" in page.text
    async with (
        Client(url, transports=("websocket",)) as ws,
        Client(url, transports=("polling",)) as poll,
    ):
        assert (ws.transport, poll.transport) == ("websocket", "polling")
        assert await ws.request("echo", 1, timeout=5) == 1
        assert await poll.request("echo", 2, timeout=5) == 2
    server.signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.proc.wait(), STEP) == 0

"""Server and client processes, and the deployments they make up.

Every process is started here with ``asyncio.create_subprocess_exec``, pinned
to its CPU through ``RTCHAT_BENCH_CPU`` (servers on CPU 0, clients on CPU 1
when the machine has two), and stopped by its own PID in a ``finally``:
SIGTERM, then SIGKILL if it does not exit in time.

A scenario talks to a ``Deployment``: the URLs clients connect to and the
PIDs whose CPU and memory are measured. ``SingleNode`` is one server
process; a multi-node deployment (several server processes sharing a
broker) would start the broker and the nodes in ``start`` and list every
node in ``urls`` and ``pids`` — scenarios already take lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from benchmarks.common import CPU_ENV, WATCH_STDIN_ENV

__all__ = [
    "IMPLS",
    "ROOT",
    "ClientProcess",
    "Deployment",
    "Impl",
    "ProcessFailed",
    "ServerProcess",
    "SingleNode",
    "client_cpu",
    "server_cpu",
]

ROOT = Path(__file__).resolve().parent.parent


class ProcessFailed(RuntimeError):
    """A benchmark process did not start, answer or finish as expected."""


def _cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def server_cpu() -> int | None:
    """The CPU servers are pinned to (None: do not pin, a one-CPU machine)."""
    cpus = _cpus()
    return cpus[0] if len(cpus) >= 2 else None


def client_cpu() -> int | None:
    cpus = _cpus()
    return cpus[1] if len(cpus) >= 2 else None


@dataclass(frozen=True, slots=True)
class Impl:
    """One implementation under test: its server program and client module."""

    name: str
    label: str
    server_module: str
    compression: str = "none"
    server_args: tuple[str, ...] = ()
    transport: str = "websocket"
    """What the client dials: "websocket", or "polling" (HTTP long polling)."""
    default: bool = True
    """Run unless ``--impls`` names others (the ASGI paths are asked for by name)."""

    def heartbeat_args(self, interval: float | None) -> list[str]:
        """Server flags for a heartbeat every ``interval`` seconds (None: its default)."""
        if interval is None:
            return []
        if self.name.startswith("rtchat"):
            return ["--heartbeat-interval", str(interval), "--heartbeat-timeout", str(interval * 2)]
        return ["--ping-interval", str(interval), "--ping-timeout", str(interval * 2)]


IMPLS: dict[str, Impl] = {
    "rtchat": Impl(
        "rtchat", "rtchat", "benchmarks.servers.rtchat_server", server_args=("--log-level", "ERROR")
    ),
    "ws": Impl("ws", "raw websockets", "benchmarks.servers.ws_server"),
    "rtchat-deflate": Impl(
        "rtchat-deflate",
        "rtchat, deflate",
        "benchmarks.servers.rtchat_server",
        compression="deflate",
        server_args=("--log-level", "ERROR", "--compression"),
    ),
    "ws-deflate": Impl(
        "ws-deflate",
        "raw websockets, deflate",
        "benchmarks.servers.ws_server",
        compression="deflate",
        server_args=("--compression", "deflate"),
    ),
    "sio": Impl("sio", "python-socketio", "benchmarks.servers.sio_server"),
    "rtchat-asgi": Impl(
        "rtchat-asgi",
        "rtchat on uvicorn (ASGI)",
        "benchmarks.servers.rtchat_asgi_server",
        default=False,
    ),
    "rtchat-polling": Impl(
        "rtchat-polling",
        "rtchat, HTTP long polling",
        "benchmarks.servers.rtchat_server",
        transport="polling",
        default=False,
        server_args=("--log-level", "ERROR"),
    ),
    "rtchat-polling-asgi": Impl(
        "rtchat-polling-asgi",
        "rtchat, HTTP long polling (uvicorn)",
        "benchmarks.servers.rtchat_asgi_server",
        transport="polling",
        default=False,
    ),
}


def _env(cpu: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(CPU_ENV, None)
    if cpu is not None:
        env[CPU_ENV] = str(cpu)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def _stop(proc: asyncio.subprocess.Process, timeout: float) -> None:
    """SIGTERM this one process, then SIGKILL it if it is still there after ``timeout``."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _tail(log: IO[bytes], limit: int = 2000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]


@dataclass(slots=True)
class ServerProcess:
    """One server program, listening on 127.0.0.1."""

    impl: Impl
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    proc: asyncio.subprocess.Process | None = None
    log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcessFailed("server not started")
        return self.proc.pid

    async def start(self, timeout: float = 30.0) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        argv = [
            sys.executable,
            "-m",
            self.impl.server_module,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.impl.server_args,
            *self.extra_args,
        ]
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,  # kept open: the server exits when it closes
            stdout=asyncio.subprocess.PIPE,
            stderr=self.log,
            env={**_env(server_cpu()), WATCH_STDIN_ENV: "1", **self.env},
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.01, remaining))
            except TimeoutError:
                line = b""
            text = line.decode().strip()
            if "ws://" in text:
                self.url = text[text.index("ws://") :].split()[0]
                self.port = int(self.url.rsplit(":", 1)[1])
                return
            if not line:
                await self.stop()
                raise ProcessFailed(
                    f"{self.impl.name} server did not start: {_tail(self.log) if self.log else ''}"
                )

    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            await _stop(self.proc, timeout)
        if self.log is not None:
            self.log.close()
            self.log = None


class Deployment:
    """What scenarios see: node URLs and server PIDs (one of each per node)."""

    @property
    def urls(self) -> list[str]:
        raise NotImplementedError

    @property
    def pids(self) -> list[int]:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def restart(self) -> tuple[float, float]:
        """Stop every node gracefully and start them again on the same ports.

        Returns (t_down, t_up) on the monotonic clock: when the stop began,
        and when every node listened again.
        """
        raise NotImplementedError


class SingleNode(Deployment):
    """One server process with its in-memory state."""

    def __init__(
        self, impl: Impl, extra_args: list[str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.server = ServerProcess(impl, list(extra_args or []), env=dict(env or {}))

    @property
    def urls(self) -> list[str]:
        return [self.server.url]

    @property
    def pids(self) -> list[int]:
        return [self.server.pid]

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    async def restart(self) -> tuple[float, float]:
        t_down = time.monotonic()
        await self.server.stop(timeout=15.0)
        old = self.server
        self.server = ServerProcess(old.impl, old.extra_args, old.port, old.env)
        await self.server.start()
        return t_down, time.monotonic()


class ClientProcess:
    """One client program: a scenario run, or a holder of idle connections."""

    def __init__(
        self, impl: Impl, scenario: str, url: str, server_pid: int, params: dict[str, Any]
    ) -> None:
        self.impl = impl
        self.scenario = scenario
        self.url = url
        self.server_pid = server_pid
        self.params = {**params, "compression": impl.compression, "transport": impl.transport}
        self.proc: asyncio.subprocess.Process | None = None
        self.log: IO[bytes] | None = None

    async def start(self) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.clients",
            self.impl.name,
            self.scenario,
            "--url",
            self.url,
            "--server-pid",
            str(self.server_pid),
            "--params",
            json.dumps(self.params),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.log,
            env=_env(client_cpu()),
            cwd=ROOT,
            limit=1 << 20,
        )

    async def event(self, timeout: float, expect: str | None = None) -> dict[str, Any]:
        """The next JSON line the client prints (the next one of kind ``expect``)."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProcessFailed(f"{self.impl.name} {self.scenario}: no {expect} in {timeout}s")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except TimeoutError:
                continue
            if not line:
                await self.proc.wait()
                raise ProcessFailed(
                    f"{self.impl.name} {self.scenario} client exited "
                    f"({self.proc.returncode}): {self.stderr()}"
                )
            text = line.decode().strip()
            if not text.startswith("{"):
                continue
            event: dict[str, Any] = json.loads(text)
            if event.get("event") == "error":
                raise ProcessFailed(f"{self.impl.name} {self.scenario}: {event.get('error')}")
            if expect is None or event.get("event") == expect:
                return event

    async def send(self, command: dict[str, Any]) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()

    def stderr(self) -> str:
        return _tail(self.log) if self.log is not None else ""

    async def stop(self, timeout: float = 30.0) -> None:
        """Close its stdin (it then quits on its own), wait, then signal it."""
        if self.proc is not None:
            if self.proc.stdin is not None and not self.proc.stdin.is_closing():
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                await _stop(self.proc, 5.0)
        if self.log is not None:
            self.log.close()
            self.log = None

"""Support for the browser tests (tests/test_browser.py): real Chromium, driven by
Playwright, against a real ``python -m server_ref`` process.

* ``browser_problem()`` says why the browser tests cannot run here (no
  Chromium, no playwright), without importing playwright;
* ``ServerProcess`` runs ``python -m server_ref`` on a free loopback port and
  kills it by PID;
* ``UpgradeRefusingProxy`` forwards plain HTTP to a server and answers every
  WebSocket upgrade ``403``, as proxies that do not speak WebSocket do;
* ``Tab`` drives one page of the server running ``HARNESS``, a script that
  imports ``/rtchat.js`` and records what its client receives, its states and
  gaps.

Every wait has a timeout; nothing here sleeps for luck.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import os
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.async_api import ConsoleMessage, Page

__all__ = [
    "CHROMIUM",
    "HARNESS",
    "HOST_PATH",
    "STEP",
    "ServerProcess",
    "Tab",
    "UpgradeRefusingProxy",
    "browser_problem",
]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
STEP = 10.0
"""Seconds any one wait may take; a test only waits this long when it fails."""

LISTENING = re.compile(r"rtchat server listening on ws://127\.0\.0\.1:(\d+) ")


def browser_problem() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM}"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install playwright)"
    return None


# ----------------------------------------------------------------------
# The server under test


class ServerProcess:
    """A running ``python -m server_ref --port 0``; its output kept for failure reports."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.port = 0
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        self.tracebacks = 0
        """Tracebacks the server printed (a test expects none)."""
        self._listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str) -> ServerProcess:
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
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        server = cls(proc)
        try:
            server.port = await asyncio.wait_for(asyncio.shield(server._listening), STEP)
        except BaseException:
            await server.kill()
            raise
        return server

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip("\r\n")
            self.output.append(text)
            self.tracebacks += text.startswith("Traceback")
            match = LISTENING.search(text)
            if match and not self._listening.done():
                self._listening.set_result(int(match.group(1)))
        if not self._listening.done():
            self._listening.set_exception(
                AssertionError(f"the server exited before listening:\n{self.transcript()}")
            )

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def transcript(self) -> str:
        return "\n".join(self.output)

    async def kill(self) -> None:
        """Kill the process by its PID (if it still runs) and reap it and its output."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), STEP)
        await asyncio.wait_for(self._reader, STEP)
        if not self._listening.done():
            self._listening.cancel()
        elif not self._listening.cancelled():
            self._listening.exception()  # retrieved: no "never retrieved" warning


# ----------------------------------------------------------------------
# A proxy that refuses WebSocket


class UpgradeRefusingProxy:
    """127.0.0.1:<port> -> the server: plain HTTP passes, WebSocket upgrades get 403.

    It looks at the first request head of each TCP connection only: a browser
    opens a WebSocket on a connection of its own, never on a kept-alive one.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refused = 0
        self.forwarded = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> UpgradeRefusingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # every handler then sees EOF and ends
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STEP)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if re.search(rb"(?im)^upgrade:\s*websocket\s*$", head):
                self.refused += 1
                writer.write(
                    b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n"
                    b"content-length: 27\r\nconnection: close\r\n\r\n"
                    b"no WebSocket on this proxy\n"
                )
                await writer.drain()
                return
            self.forwarded += 1
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(upstream)
            upstream.write(head)
            await asyncio.gather(self._pump(reader, upstream), self._pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a link that broke is what this proxy forwards
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.transport.abort()
                    self._writers.discard(w)
            self._tasks.discard(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()  # one side ended: end both, as a proxy does


# ----------------------------------------------------------------------
# The test page

HOST_PATH = "/healthz"
"""The document the harness runs in: any page the server itself serves gives the page the
server's origin (a document Playwright made up would count as a public site, and Chromium's
local network access checks would then refuse its connections to 127.0.0.1)."""

HARNESS = """
let rtchat;
try {
  rtchat = await import("/rtchat.js");
} catch (error) {
  window.loadError = String(error);
  throw error;
}

const t = { client: null, received: [], states: [], gaps: [], pending: [], errors: [] };
window.t = t;
window.rtchat = rtchat;

/** A client of `url`; everything it handles on event "m" is recorded, in order. */
t.start = async (url, options) => {
  const client = new rtchat.Client(url, options);
  t.client = client;
  client.onStateChange((state) => t.states.push({ state, transport: client.transport }));
  client.onGap((gap) => t.gaps.push(JSON.parse(JSON.stringify(gap ?? null))));
  client.on("m", (data, meta) => {
    t.received.push({ data, room: meta.room, offset: meta.offset, sender: meta.sender });
  });
  await client.connect();
  return { transport: client.transport, session: client.sessionId ?? null };
};

/** Publish without waiting; `t.settle()` waits for everything so published. */
t.publishMany = (room, values) => {
  for (const value of values) t.pending.push(t.client.publish(room, "m", value));
};
t.settle = async () => {
  const offsets = await Promise.all(t.pending);
  t.pending = [];
  return offsets;
};
t.outstanding = () => t.pending.length;
"""


class Tab:
    """One page running ``HARNESS`` at ``origin``, and its rtchat client."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console: list[tuple[str, str]] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.console.append(("pageerror", str(error))))

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append((message.type, message.text))

    @classmethod
    async def open(cls, page: Page, origin: str) -> Tab:
        """Open ``origin``'s ``HOST_PATH`` in ``page`` and run ``HARNESS`` in it."""
        tab = cls(page)
        await page.goto(f"{origin}{HOST_PATH}", timeout=STEP * 1000)
        await page.add_script_tag(content=HARNESS, type="module")
        await page.wait_for_function(
            "window.t !== undefined || window.loadError !== undefined", timeout=STEP * 1000
        )
        if await page.evaluate("window.t === undefined"):
            error = await page.evaluate("window.loadError")
            raise AssertionError(f"the page could not import /rtchat.js: {error}; {tab.console}")
        return tab

    async def js(self, expression: str, arg: Any = None) -> Any:
        """Evaluate a JS function ``expression`` on ``arg``, awaiting a returned promise."""
        return await self.page.evaluate(expression, arg)

    async def wait(self, predicate: str, arg: Any = None, timeout: float = STEP) -> None:
        """Wait until the JS function ``predicate(arg)`` is true."""
        try:
            await self.page.wait_for_function(predicate, arg=arg, timeout=timeout * 1000)
        except Exception as exc:
            state = await self.page.evaluate(
                "() => JSON.stringify({states: t.states, received: t.received.length,"
                " gaps: t.gaps, pending: t.pending.length})"
            )
            raise AssertionError(
                f"not within {timeout}s: {predicate}({arg!r}); page: {state}; "
                f"console: {self.console[-20:]}"
            ) from exc

    async def start(self, url: str, **options: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.js("([u, o]) => t.start(u, o)", [url, options])
        return result

    async def received(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = await self.js("() => t.received")
        return items

    async def wait_received(self, count: int, timeout: float = STEP) -> list[dict[str, Any]]:
        await self.wait("(n) => t.received.length >= n", count, timeout)
        return await self.received()

    async def states(self) -> list[dict[str, Any]]:
        states: list[dict[str, Any]] = await self.js("() => t.states")
        return states

    async def wait_state(self, state: str, count: int = 1, timeout: float = STEP) -> None:
        """Wait until ``state`` was reported at least ``count`` times."""
        await self.wait(
            "([s, n]) => t.states.filter((x) => x.state === s).length >= n", [state, count], timeout
        )

    async def transport(self) -> str | None:
        transport: str | None = await self.js("() => t.client.transport")
        return transport

    async def close(self) -> None:
        await self.js("async () => { if (t.client) await t.client.close(); }")

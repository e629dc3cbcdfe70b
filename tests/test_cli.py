"""The ``rtchat`` command line, run as a real subprocess against a real server.

Nothing here sleeps for luck: a test waits for the line that says the
subprocess is ready (``joined ROOM`` on stderr) and for the output it expects,
each with a timeout. Every subprocess is killed and reaped in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from rtchat_sdk import Client
from rtchat_sdk.cli import main
from tests.conftest import make_server

if TYPE_CHECKING:
    from server_ref import Context, Server

ROOT = Path(__file__).resolve().parent.parent
LINE_TIMEOUT = 10.0


class Proc:
    """A running subprocess whose output is read line by line, with timeouts."""

    def __init__(self, proc: asyncio.subprocess.Process, args: tuple[str, ...]) -> None:
        self.proc = proc
        self.args = args
        self.out: list[str] = []
        self.err: list[str] = []

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def _describe(self) -> str:
        return f"{self.args!r}\n--- stdout:\n{self.stdout}--- stderr:\n{self.stderr}"

    async def _line(self, err: bool, timeout: float) -> str:
        reader = self.proc.stderr if err else self.proc.stdout
        assert reader is not None
        try:
            raw = await asyncio.wait_for(reader.readline(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no output line within {timeout}s from {self._describe()}"
            ) from None
        if not raw:
            await self.proc.wait()
            raise AssertionError(
                f"output ended (exit {self.proc.returncode}) from {self._describe()}"
            )
        line = raw.decode()
        (self.err if err else self.out).append(line)
        return line.rstrip("\n")

    async def stdout_line(self, timeout: float = LINE_TIMEOUT) -> str:
        return await self._line(False, timeout)

    async def stdout_json(self, timeout: float = LINE_TIMEOUT) -> Any:
        return json.loads(await self.stdout_line(timeout))

    async def wait_for(
        self, text: str, *, stderr: bool = False, timeout: float = LINE_TIMEOUT
    ) -> str:
        """Read lines until one contains ``text``; returns that line."""
        async with asyncio.timeout(timeout):
            while True:
                line = await self._line(stderr, timeout)
                if text in line:
                    return line

    async def finish(self, timeout: float = LINE_TIMEOUT) -> int:
        """Wait for the exit; collects the rest of the output. Returns the exit status."""
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        except TimeoutError:
            raise AssertionError(f"did not exit within {timeout}s: {self._describe()}") from None
        self.out.append(out.decode())
        self.err.append(err.decode())
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.communicate()


@contextlib.asynccontextmanager
async def spawn(*args: str) -> AsyncIterator[Proc]:
    """Run ``python ARGS`` from the repository root; killed and reaped on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    running = Proc(proc, args)
    try:
        yield running
    finally:
        await running.kill()


def rtchat(*args: str) -> contextlib.AbstractAsyncContextManager[Proc]:
    return spawn("-m", "rtchat_sdk.cli", *args)


async def run_rtchat(*args: str, timeout: float = LINE_TIMEOUT) -> tuple[int, str, str]:
    """Run ``rtchat ARGS`` to its end; returns (exit status, stdout, stderr)."""
    async with rtchat(*args) as proc:
        code = await proc.finish(timeout)
        return code, proc.stdout, proc.stderr


def assert_one_error_line(stderr: str, starts: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(starts), stderr


# ----------------------------------------------------------------------
# listen


@pytest.mark.timeout(30)
async def test_listen_prints_deliveries_published_by_another_client(server: Server) -> None:
    async with rtchat("listen", server.url, "--room", "lobby", "--count", "2") as listener:
        assert await listener.wait_for("joined lobby", stderr=True) == "joined lobby"
        async with Client(server.url) as client:
            await client.join("lobby")
            first = await client.publish("lobby", "chat.message", {"text": "héllo"})
            second = await client.publish("lobby", "chat.typing", [1, None, True])
            assert await listener.stdout_json() == {
                "event": "chat.message",
                "data": {"text": "héllo"},
                "room": "lobby",
                "ns": "/",
                "sender": client.session_id,
                "stream": "room:/:lobby",
                "offset": first,
            }
            assert await listener.stdout_json() == {
                "event": "chat.typing",
                "data": [1, None, True],
                "room": "lobby",
                "ns": "/",
                "sender": client.session_id,
                "stream": "room:/:lobby",
                "offset": second,
            }
        assert await listener.finish() == 0
        assert listener.stdout.count("\n") == 2


@pytest.mark.timeout(30)
async def test_listen_several_rooms_in_a_namespace(server: Server) -> None:
    server.namespace("/x")
    args = ("listen", server.url, "--ns", "/x", "--room", "a", "--room", "b", "--count", "2")
    async with rtchat(*args) as listener:
        await listener.wait_for("joined a", stderr=True)
        await listener.wait_for("joined b", stderr=True)
        async with Client(server.url) as client:
            await client.join("a")  # same room name in "/": not what the listener hears
            await client.publish("a", "noise", 0)
            x = client.namespace("/x")
            await x.join("a")
            await x.join("b")
            await x.publish("a", "e", "to a")
            await x.publish("b", "e", "to b")
            got = [await listener.stdout_json(), await listener.stdout_json()]
        assert [(d["ns"], d["room"], d["data"], d["stream"]) for d in got] == [
            ("/x", "a", "to a", "room:/x:a"),
            ("/x", "b", "to b", "room:/x:b"),
        ]
        assert await listener.finish() == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_listen_exits_0_on_interrupt(server: Server, sig: signal.Signals) -> None:
    async with rtchat("listen", server.url, "--room", "lobby") as listener:
        await listener.wait_for("joined lobby", stderr=True)
        listener.proc.send_signal(sig)
        assert await listener.finish() == 0
        assert "Traceback" not in listener.stderr
        assert listener.stdout == ""


@pytest.mark.timeout(30)
async def test_listen_without_reconnect_exits_1_when_the_server_goes(server: Server) -> None:
    url = server.url
    async with rtchat("listen", url, "--room", "lobby", "--no-reconnect") as listener:
        await listener.wait_for("joined lobby", stderr=True)
        await server.close()
        assert await listener.finish() == 1
        assert "Traceback" not in listener.stderr
        assert f"rtchat: error: connection to {url} closed" in listener.stderr


@pytest.mark.timeout(60)
async def test_listen_reconnects_to_a_restarted_server(server: Server) -> None:
    port = server.port
    async with rtchat("listen", server.url, "--room", "lobby", "--count", "2") as listener:
        await listener.wait_for("joined lobby", stderr=True)
        async with Client(server.url) as client:
            await client.join("lobby")
            await client.publish("lobby", "before", 1)
        assert (await listener.stdout_json())["event"] == "before"
        await server.close()
        await listener.wait_for("reconnecting", stderr=True)
        restarted = make_server()
        await restarted.start("127.0.0.1", port)
        try:
            await listener.wait_for("reconnected", stderr=True, timeout=30)
            async with Client(restarted.url) as client:
                await client.join("lobby")
                await client.publish("lobby", "after", 2)
            delivery = await listener.stdout_json()
            assert (delivery["event"], delivery["data"]) == ("after", 2)
            assert await listener.finish() == 0
        finally:
            await restarted.close()
        # A memory-only server lost the history: the listener says so.
        assert "gap" in listener.stderr


# ----------------------------------------------------------------------
# send


@pytest.mark.timeout(30)
async def test_send_arrives_at_a_listener(server: Server) -> None:
    async with rtchat("listen", server.url, "--room", "lobby", "--count", "1") as listener:
        await listener.wait_for("joined lobby", stderr=True)
        code, out, err = await run_rtchat(
            "send", server.url, "--room", "lobby", "chat.message", '{"text": "hi"}'
        )
        assert (code, err) == (0, "")
        sent = json.loads(out)
        assert list(sent) == ["offset"]
        delivery = await listener.stdout_json()
        assert delivery["event"] == "chat.message"
        assert delivery["data"] == {"text": "hi"}
        assert delivery["room"] == "lobby"
        assert delivery["offset"] == sent["offset"]
        assert await listener.finish() == 0


@pytest.mark.timeout(30)
async def test_send_offsets_increase(server: Server) -> None:
    offsets = []
    for text in ("one", "two"):
        code, out, _ = await run_rtchat("send", server.url, "--room", "r", "e", json.dumps(text))
        assert code == 0
        offsets.append(json.loads(out)["offset"])
    assert offsets[1] == offsets[0] + 1


@pytest.mark.timeout(30)
async def test_send_to_an_unknown_namespace_exits_1(server: Server) -> None:
    code, out, err = await run_rtchat("send", server.url, "--ns", "/nope", "--room", "r", "e", "1")
    assert (code, out) == (1, "")
    assert_one_error_line(err, "rtchat: error: unknown_namespace:")


# ----------------------------------------------------------------------
# request


@pytest.mark.timeout(30)
async def test_request_echo_prints_the_reply(server: Server) -> None:
    payload = {"a": [1, 2.5, None], "b": "ünïcode", "c": {"d": True}}
    code, out, err = await run_rtchat("request", server.url, "echo", json.dumps(payload))
    assert (code, err) == (0, "")
    assert out.count("\n") == 1
    assert json.loads(out) == payload


@pytest.mark.timeout(30)
async def test_request_without_payload_sends_null(server: Server) -> None:
    code, out, _ = await run_rtchat("request", server.url, "echo")
    assert (code, json.loads(out)) == (0, None)


@pytest.mark.timeout(30)
async def test_request_sends_the_user_as_auth(server: Server) -> None:
    @server.on("whoami")
    def whoami(ctx: Context) -> object:
        return {"user": ctx.user, "ns": ctx.ns}

    server.namespace("/x").on("whoami")(whoami)
    code, out, _ = await run_rtchat("request", server.url, "--user", "alice", "whoami")
    assert (code, json.loads(out)) == (0, {"user": "alice", "ns": "/"})
    code, out, _ = await run_rtchat("request", server.url, "--ns", "/x", "whoami")
    assert (code, json.loads(out)) == (0, {"user": None, "ns": "/x"})


@pytest.mark.timeout(30)
async def test_request_to_a_failing_handler_exits_1(server: Server) -> None:
    code, out, err = await run_rtchat("request", server.url, "fail", '{"why": "test"}')
    assert (code, out) == (1, "")
    assert_one_error_line(err, "rtchat: error: handler_error: ")
    assert "asked to fail with {'why': 'test'}" in err


@pytest.mark.timeout(30)
async def test_request_to_an_unknown_event_exits_1(server: Server) -> None:
    code, out, err = await run_rtchat("request", server.url, "no.such.event", "{}")
    assert (code, out) == (1, "")
    assert_one_error_line(err, "rtchat: error: unknown_event: ")
    assert "no.such.event" in err


@pytest.mark.timeout(30)
async def test_request_timeout_exits_1(server: Server) -> None:
    release = asyncio.Event()

    @server.on("stall")
    async def stall(ctx: Context, data: object) -> object:
        await release.wait()
        return data

    try:
        code, out, err = await run_rtchat("request", server.url, "stall", "{}", "--timeout", "0.3")
    finally:
        release.set()
    assert (code, out) == (1, "")
    assert_one_error_line(err, "rtchat: error: timeout: ")
    assert "'stall'" in err


# ----------------------------------------------------------------------
# presence and history


@pytest.fixture
async def presence_server() -> AsyncIterator[Server]:
    """A running server whose namespace "/" keeps presence and sends $join/$leave."""
    srv = make_server()
    srv.namespace("/", presence=True, presence_events=True)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.close()


@pytest.mark.timeout(30)
async def test_presence_prints_the_members_oldest_first(presence_server: Server) -> None:
    url = presence_server.url
    before = time.time()
    async with (
        Client(url, auth={"user": "ada"}, name="page/1") as ada,
        Client(url, name="bot/2") as bot,
    ):
        await ada.join("lobby")
        await bot.join("lobby")
        code, out, err = await run_rtchat("presence", url, "--room", "lobby")
        assert (code, err) == (0, "")
        members = [json.loads(line) for line in out.splitlines()]
        assert [{k: v for k, v in m.items() if k != "joined_at"} for m in members] == [
            {"session": ada.session_id, "user": "ada", "client": "page/1"},
            {"session": bot.session_id, "user": None, "client": "bot/2"},
        ]
        assert all(before - 1 <= m["joined_at"] <= time.time() + 1 for m in members)
        assert members[0]["joined_at"] <= members[1]["joined_at"]

        code, out, err = await run_rtchat("presence", url, "--room", "lobby", "--stats")
        assert (code, err) == (0, "")
        assert json.loads(out) == {"stream": "room:/:lobby", "sessions": 2, "users": 1}
    code, out, err = await run_rtchat("presence", url, "--room", "empty")
    assert (code, out, err) == (0, "", "")


@pytest.mark.timeout(30)
async def test_presence_where_the_namespace_keeps_none_exits_1(server: Server) -> None:
    code, out, err = await run_rtchat("presence", server.url, "--room", "lobby")
    assert (code, out) == (1, "")
    assert_one_error_line(err, "rtchat: error: not_enabled: ")


@pytest.mark.timeout(30)
async def test_history_prints_the_kept_entries_as_listen_does(server: Server) -> None:
    async with Client(server.url) as client:
        await client.join("lobby")
        offsets = [await client.publish("lobby", "chat.message", {"n": n}) for n in range(3)]
        sender = client.session_id
    code, out, err = await run_rtchat("history", server.url, "--room", "lobby")
    assert (code, err) == (0, "")
    assert [json.loads(line) for line in out.splitlines()] == [
        {
            "event": "chat.message",
            "data": {"n": n},
            "room": "lobby",
            "ns": "/",
            "sender": sender,
            "stream": "room:/:lobby",
            "offset": offset,
        }
        for n, offset in enumerate(offsets)
    ]

    code, out, err = await run_rtchat(
        "history", server.url, "--room", "lobby", "--limit", "2", "--reverse"
    )
    assert code == 0
    assert [json.loads(line)["data"] for line in out.splitlines()] == [{"n": 2}, {"n": 1}]
    assert err == "rtchat: more entries are kept beyond these 2\n"


@pytest.mark.timeout(30)
async def test_listen_prints_presence_events_and_history_the_same(
    presence_server: Server,
) -> None:
    url = presence_server.url
    async with rtchat("listen", url, "--room", "lobby", "--count", "3") as listener:
        await listener.wait_for("joined lobby", stderr=True)
        async with Client(url, auth={"user": "ada"}, name="page/1") as ada:
            await ada.join("lobby")
            sent = await ada.publish("lobby", "chat.message", "hi")
            await ada.leave("lobby")
            joined, said, left = [await listener.stdout_json() for _ in range(3)]
        who = {"session": ada.session_id, "user": "ada", "client": "page/1"}
        where = {"room": "lobby", "ns": "/", "stream": "room:/:lobby"}
        assert isinstance(joined.pop("joined_at"), float)
        assert joined == {"presence": "join", **who, **where, "offset": sent - 1}
        assert said["event"] == "chat.message"
        assert (said["data"], said["offset"]) == ("hi", sent)
        assert isinstance(left.pop("joined_at"), float)
        assert left == {"presence": "leave", **who, "reason": "left", **where, "offset": sent + 1}
        assert await listener.finish() == 0
        printed = [json.loads(line) for line in listener.stdout.splitlines()]

    code, out, err = await run_rtchat("history", url, "--room", "lobby")
    assert (code, err) == (0, "")
    kept = [json.loads(line) for line in out.splitlines()]
    assert kept[0]["presence"] == "join"  # the listener's own, which it was not sent
    assert kept[1:4] == printed


# ----------------------------------------------------------------------
# Failures before any server answers


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback URL where nothing listens: the port stays bound, never listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args",
    [
        ("request", "{url}", "echo", "{}"),
        ("send", "{url}", "--room", "r", "e", "{}"),
        ("listen", "{url}", "--room", "r"),
    ],
    ids=["request", "send", "listen"],
)
async def test_connection_refused_exits_1(refused_url: str, args: tuple[str, ...]) -> None:
    code, out, err = await run_rtchat(*(a.replace("{url}", refused_url) for a in args))
    assert (code, out) == (1, "")
    assert_one_error_line(err, f"rtchat: error: cannot connect to {refused_url}")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args",
    [
        ("request", "ws://127.0.0.1:9", "echo", "{not json"),
        ("send", "ws://127.0.0.1:9", "--room", "r", "e", "[1, 2"),
    ],
    ids=["request", "send"],
)
async def test_bad_json_exits_2(args: tuple[str, ...]) -> None:
    code, out, err = await run_rtchat(*args)
    assert (code, out) == (2, "")
    assert "Traceback" not in err
    assert "invalid JSON" in err


# ----------------------------------------------------------------------
# main() in process: usage errors need no subprocess


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["listen", "ws://127.0.0.1:9"], "--room"),
        (["listen", "http://127.0.0.1:9", "--room", "r"], "ws:// or wss://"),
        (["listen", "ws://127.0.0.1:9", "--room", "r", "--count", "0"], "at least 1"),
        (["request", "ws://127.0.0.1:9", "echo", "--timeout", "-1"], "positive"),
        (["request", "ws://127.0.0.1:9", "--ns", "x", "echo"], "namespace must start"),
        (["send", "ws://127.0.0.1:9", "e", "1"], "--room"),
        (["presence", "ws://127.0.0.1:9"], "--room"),
        (["history", "ws://127.0.0.1:9", "--room", "r", "--limit", "0"], "at least 1"),
        (["history", "ws://127.0.0.1:9", "--room", "r", "--limit", "10001"], "at most 10000"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


@pytest.mark.timeout(10)
def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("listen", "send", "request", "presence", "history"):
        assert command in out

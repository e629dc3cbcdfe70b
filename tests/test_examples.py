"""Each example in ``examples/`` runs to completion as a subprocess and does its job."""

from __future__ import annotations

import asyncio
import re
import signal
from typing import TYPE_CHECKING, Any

import pytest

from rtchat_sdk import Client, Delivery
from tests.test_cli import LINE_TIMEOUT, run_rtchat, spawn

if TYPE_CHECKING:
    from server_ref import Server


@pytest.mark.timeout(30)
async def test_echo_bot_answers_every_chat_message(server: Server) -> None:
    args = ("--url", server.url, "--room", "lobby", "--count", "2", "--duration", "20")
    async with spawn("examples/echo_bot.py", *args) as bot:
        await bot.wait_for("joined lobby")
        echoes: asyncio.Queue[tuple[Any, Delivery]] = asyncio.Queue()
        async with Client(server.url) as client:

            @client.on("chat.echo")
            def on_echo(data: Any, meta: Delivery) -> None:
                echoes.put_nowait((data, meta))

            await client.join("lobby")
            await client.publish("lobby", "chat.message", {"text": "one"})
            await client.publish("lobby", "chat.message", {"text": "two"})
            got = [await asyncio.wait_for(echoes.get(), LINE_TIMEOUT) for _ in range(2)]
        assert [data for data, _ in got] == [
            {"text": "echo: one", "to": client.session_id},
            {"text": "echo: two", "to": client.session_id},
        ]
        assert all(meta.room == "lobby" and meta.sender != client.session_id for _, meta in got)
        assert await bot.finish() == 0
        assert "echoed 'one'" in bot.stdout
        assert "echoed 'two'" in bot.stdout
        assert "echo bot done: 2 echo(es)" in bot.stdout


@pytest.mark.timeout(30)
async def test_echo_bot_stops_after_its_duration(server: Server) -> None:
    args = ("--url", server.url, "--count", "5", "--duration", "0.2")
    async with spawn("examples/echo_bot.py", *args) as bot:
        assert await bot.finish() == 0
        assert "echo bot done: 0 echo(es)" in bot.stdout


@pytest.mark.timeout(30)
async def test_chat_two_users_hear_each_other(server: Server) -> None:
    async with spawn("examples/chat.py", "--url", server.url, "--messages", "4") as chat:
        assert await chat.finish(20) == 0, chat.stderr
        out = chat.stdout
    for i in range(1, 5):
        assert f"alice heard bob: 'message {i} from bob'" in out
        assert f"bob heard alice: 'message {i} from alice'" in out
    # Nobody hears their own messages.
    assert "alice heard alice" not in out
    assert "bob heard bob" not in out
    assert "done: alice heard 4 and bob heard 4 message(s)" in out


@pytest.mark.timeout(30)
async def test_typed_bot_gets_typed_replies() -> None:
    async with spawn("examples/typed_bot.py", "--port", "0") as bot:
        assert await bot.finish(20) == 0, bot.stderr
        out = bot.stdout
    assert re.search(r"server listening on ws://127\.0\.0\.1:\d+", out)
    assert "GetUser(id=1) -> User(id=1, name='Ada Lovelace', email='ada@example.org')" in out
    assert "GetUser(id=2) -> Alan Turing <alan@example.org>" in out
    assert "GetUser(id=42) -> RemoteError code='not_found'" in out
    assert "HandlerError code='invalid_payload'" in out
    assert "typed bot done" in out
    assert "Traceback" not in bot.stderr


@pytest.mark.timeout(30)
async def test_room_page_shows_history_then_live_with_presence() -> None:
    async with spawn("examples/room_page.py", "--port", "0", "--last", "3") as page:
        assert await page.finish(20) == 0, page.stderr
        out = page.stdout
    before = re.findall(r"before #\d+: (message \d+)", out)
    live = re.findall(r"live   #\d+: (message \d+)", out)
    assert before == ["message 8", "message 9", "message 10"]
    assert live == ["message 11", "message 12"]  # 11 was sent between history and join
    assert "present: ann, bob" in out
    assert "cat joined lobby" in out
    assert "cat left lobby (left)" in out
    assert "room page done: 3 from history, 2 live, none twice" in out
    assert "Traceback" not in page.stderr


@pytest.mark.timeout(60)
async def test_examples_and_cli_against_python_m_server_ref() -> None:
    """What examples/README.md says: they run against the reference server's command."""
    async with spawn("-m", "server_ref", "--host", "127.0.0.1", "--port", "0") as srv:
        line = await srv.wait_for("listening on ws://")
        match = re.search(r"ws://[^\s]+", line)
        assert match is not None, line
        url = match.group(0)

        code, out, err = await run_rtchat("request", url, "echo", '{"built": "in"}')
        assert (code, out, err) == (0, '{"built": "in"}\n', "")

        async with spawn("examples/chat.py", "--url", url, "--messages", "2") as chat:
            assert await chat.finish(20) == 0, chat.stderr
            assert "done: alice heard 2 and bob heard 2 message(s)" in chat.stdout

        srv.proc.send_signal(signal.SIGINT)
        assert await srv.finish(20) == 0

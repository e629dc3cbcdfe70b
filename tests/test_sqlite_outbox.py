"""The persistent SQLite outbox: unit tests, and a client killed with SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import tempfile
import textwrap
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtchat_sdk import (
    BufferFull,
    Outbox,
    OutboxFileError,
    OutboxInUse,
    OutboxStorageError,
    OverflowPolicy,
    SqliteOutbox,
)
from rtchat_sdk import sqlite_outbox as so
from rtchat_sdk.core import ClientSession, Dropped
from rtchat_sdk.outbox import HandledPosition, OutboxEntry
from server_ref import Context, Server
from tests.faultproxy import FaultProxy
from tests.helpers import frames, open_session, reply, welcome

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture
def opened() -> Iterator[list[SqliteOutbox]]:
    """Outboxes a test opened; closed at the end whatever happens."""
    outboxes: list[SqliteOutbox] = []
    yield outboxes
    for outbox in outboxes:
        outbox.close()


def entry(
    message_id: int, size: int = 1, kind: str = "emit", expires_at: float | None = None
) -> OutboxEntry:
    return OutboxEntry(message_id, kind, "x" * size, expires_at)


def snapshot(outbox: Outbox) -> list[tuple[int, str, str, float | None]]:
    return [(e.id, e.kind, e.text, e.expires_at) for e in outbox]


# --------------------------------------------------------------------------
# Persistence


@pytest.mark.timeout(10)
def test_entries_survive_reopen_in_order_with_kind_and_text(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    with SqliteOutbox(path) as first:
        assert first.load_state() is None  # a fresh file
        for i, kind in [(3, "emit"), (4, "request"), (5, "publish"), (6, "join"), (7, "leave")]:
            first.add(OutboxEntry(i, kind, f'{{"id":{i},"k":"{kind}"}}'))
        assert first.remove(5) is not None
        expected = snapshot(first)
        assert first.ids() == [3, 4, 6, 7]
    second = SqliteOutbox(path)
    opened.append(second)
    assert snapshot(second) == expected
    assert second.ids() == [3, 4, 6, 7]
    assert len(second) == 4
    assert second.bytes == sum(len(t) for _, _, t, _ in expected)
    assert second.get(4) == OutboxEntry(4, "request", '{"id":4,"k":"request"}')
    assert 5 not in second


@pytest.mark.timeout(10)
def test_next_id_survives_even_when_the_outbox_is_empty(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    with SqliteOutbox(path) as first:
        session = ClientSession(outbox=first)
        open_session(session)
        ids = [session.emit("/", "e", i, now=0)[0] for i in range(3)]
        for i in ids:
            session.receive_text(reply(i), 0)
        assert len(first) == 0
    second = SqliteOutbox(path)
    opened.append(second)
    state = second.load_state()
    assert state is not None
    assert state.next_id == 4
    again = ClientSession(outbox=second)
    assert again.emit("/", "e", None, now=0)[0] == 4  # never 1: the server knows 1..3


@pytest.mark.timeout(10)
def test_session_token_streams_and_rooms_survive(path: Path, opened: list[SqliteOutbox]) -> None:
    with SqliteOutbox(path) as first:
        first.save_session("s1", "tok", {("/", "lobby"): "room:/:lobby", ("/a", "x"): "room:/a:x"})
        first.save_stream("room:/:lobby", HandledPosition("e1", 7, "/", "lobby"))
        first.save_stream("inbox:s1", HandledPosition("e0", 2, "/", None))
        first.save_stream("room:/a:x", HandledPosition("e2", 1, "/a", "x"))
        first.save_stream("room:/:lobby", HandledPosition("e1", 9, "/", "lobby"))  # moved on
        first.save_stream("room:/a:x", None)  # no longer followed
        first.save_session("s1", "tok2", {("/", "lobby"): "room:/:lobby"})  # left /a x
    second = SqliteOutbox(path)
    opened.append(second)
    state = second.load_state()
    assert state is not None
    assert (state.session_id, state.token) == ("s1", "tok2")
    assert state.rooms == {("/", "lobby"): "room:/:lobby"}
    assert state.streams == {
        "room:/:lobby": HandledPosition("e1", 9, "/", "lobby"),
        "inbox:s1": HandledPosition("e0", 2, "/", None),
    }
    assert state.next_id == 1


@pytest.mark.timeout(10)
def test_expiry_keeps_its_wall_clock_deadline_across_a_restart(
    path: Path, opened: list[SqliteOutbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    wall = [1_000_000.0]
    monkeypatch.setattr(so, "time", types.SimpleNamespace(time=lambda: wall[0]))
    with SqliteOutbox(path, clock=lambda: 50.0) as first:
        first.add(entry(1, expires_at=80.0))  # 30 s left
        first.add(entry(2))  # never expires
    wall[0] += 10.0  # the process was down 10 s; the new one's clock starts elsewhere
    second = SqliteOutbox(path, clock=lambda: 7.0)
    opened.append(second)
    restored = second.get(1)
    assert restored is not None
    assert restored.expires_at == pytest.approx(27.0)  # 20 s left on the new clock
    assert second.get(2) == entry(2)


@pytest.mark.timeout(10)
def test_evictions_and_the_new_entry_are_one_transaction(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    with SqliteOutbox(path, max_messages=3, policy="drop_oldest") as first:
        for i in range(1, 4):
            first.add(entry(i))
        dropped = first.add(entry(4))
        assert [e.id for e in dropped] == [1]
    second = SqliteOutbox(path, max_messages=3, policy="drop_oldest")
    opened.append(second)
    assert second.ids() == [2, 3, 4]


@pytest.mark.timeout(10)
def test_a_failed_write_leaves_memory_and_file_unchanged(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    outbox = SqliteOutbox(path)
    opened.append(outbox)
    outbox.add(entry(1))
    with pytest.raises(OutboxStorageError):
        outbox.add(entry(1))  # same id: the INSERT fails, the transaction rolls back
    assert outbox.ids() == [1]
    assert outbox.bytes == 1
    state = outbox.load_state()
    assert state is not None
    assert state.next_id == 2


@pytest.mark.timeout(10)
def test_restored_entries_above_lower_limits_are_all_kept(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    with SqliteOutbox(path) as first:
        for i in range(1, 6):
            first.add(entry(i))
    second = SqliteOutbox(path, max_messages=2)
    opened.append(second)
    assert second.ids() == [1, 2, 3, 4, 5]
    assert not second.fits(1)
    with pytest.raises(BufferFull):
        second.add(entry(6))


@pytest.mark.timeout(10)
def test_closed_outbox_refuses_changes_but_still_reads(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = SqliteOutbox(path)
    outbox.add(entry(1))
    outbox.add(entry(2))
    outbox.close()
    outbox.close()  # idempotent
    assert outbox.closed
    assert outbox.ids() == [1, 2]
    with pytest.raises(OutboxStorageError, match="closed"):
        outbox.add(entry(3))
    with caplog.at_level(logging.WARNING, logger="rtchat_sdk"):
        assert outbox.remove(1) is not None  # forgotten in memory, failure logged
    assert "cannot delete message 1" in caplog.text
    assert outbox.ids() == [2]


@pytest.mark.timeout(10)
def test_usable_from_the_thread_the_client_loop_runs_in(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    outbox = SqliteOutbox(path)  # SyncClient makes it here and uses it in its loop thread
    opened.append(outbox)
    errors: list[BaseException] = []

    def use() -> None:
        try:
            outbox.add(entry(1))
            outbox.save_stream("s", HandledPosition("e", 1, "/", None))
            outbox.remove(1)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join(5)
    assert errors == []
    state = outbox.load_state()
    assert state is not None
    assert state.next_id == 2


# --------------------------------------------------------------------------
# Limits and policies: the same behaviour as the in-memory Outbox

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(min_value=1, max_value=40)),
        st.tuples(st.just("remove"), st.integers(min_value=0, max_value=30)),
    ),
    max_size=40,
)


def apply(outbox: Outbox, ops: list[tuple[str, int]]) -> list[Any]:
    """Run ``ops``; returns what each one returned or raised."""
    results: list[Any] = []
    next_id = 1
    for op, arg in ops:
        if op == "add":
            try:
                dropped = outbox.add(entry(next_id, size=arg))
                results.append(("added", [e.id for e in dropped]))
            except BufferFull as exc:
                results.append(("full", str(exc)))
            next_id += 1
        else:
            ids = outbox.ids()
            target = ids[arg % len(ids)] if ids else 999
            removed = outbox.remove(target)
            results.append(("removed", None if removed is None else removed.id))
        results.append((outbox.ids(), outbox.bytes, len(outbox), outbox.fits(5)))
    return results


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", list(OverflowPolicy))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_limits_and_policies_behave_like_the_memory_outbox(
    policy: OverflowPolicy, ops: list[tuple[str, int]]
) -> None:
    limits: dict[str, Any] = {"max_messages": 4, "max_bytes": 50, "policy": policy}
    memory = Outbox(**limits)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "o.db"
        with SqliteOutbox(file, **limits) as persistent:
            assert apply(persistent, ops) == apply(memory, ops)
        with SqliteOutbox(file, **limits) as reopened:
            assert snapshot(reopened) == snapshot(memory)
            assert reopened.bytes == memory.bytes


@pytest.mark.timeout(10)
def test_a_message_that_can_never_fit_is_refused_and_not_written(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    outbox = SqliteOutbox(path, max_bytes=10, policy="drop_oldest")
    opened.append(outbox)
    outbox.add(entry(1, size=5))
    with pytest.raises(BufferFull, match="byte limit"):
        outbox.add(entry(2, size=11))
    assert outbox.ids() == [1]
    state = outbox.load_state()
    assert state is not None
    assert state.next_id == 2


@pytest.mark.timeout(10)
def test_bad_limits_are_refused(path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SqliteOutbox(path, max_messages=0)
    with pytest.raises(ValueError, match="not a valid"):
        SqliteOutbox(path, policy="sometimes")
    assert not path.exists()  # refused before the file is made


# --------------------------------------------------------------------------
# Files that are not ours, and files in use


@pytest.mark.timeout(10)
def test_a_file_that_is_not_sqlite_gives_a_clear_error_and_is_left_alone(path: Path) -> None:
    junk = b"this is not a database, just some bytes " * 200
    path.write_bytes(junk)
    with pytest.raises(OutboxFileError, match="not an rtchat outbox") as info:
        SqliteOutbox(path)
    assert isinstance(info.value, ValueError)
    assert path.read_bytes() == junk


@pytest.mark.timeout(10)
def test_a_foreign_sqlite_file_gives_a_clear_error(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(OutboxFileError, match="not an rtchat outbox"):
        SqliteOutbox(path)
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]
    finally:
        db.close()


@pytest.mark.timeout(10)
def test_a_newer_schema_version_is_refused(path: Path) -> None:
    SqliteOutbox(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={so.SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(OutboxFileError, match="newer"):
        SqliteOutbox(path)


@pytest.mark.timeout(10)
def test_an_empty_file_is_a_fresh_outbox(path: Path, opened: list[SqliteOutbox]) -> None:
    path.write_bytes(b"")
    outbox = SqliteOutbox(path)
    opened.append(outbox)
    assert outbox.load_state() is None
    assert len(outbox) == 0


@pytest.mark.timeout(10)
def test_a_second_outbox_on_a_live_file_is_refused(path: Path) -> None:
    first = SqliteOutbox(path)
    try:
        first.add(entry(1))
        with pytest.raises(OutboxInUse, match="in use"):
            SqliteOutbox(path)
        first.add(entry(2))  # the first one is unharmed
    finally:
        first.close()
    with SqliteOutbox(path) as again:  # closed: the file is free
        assert again.ids() == [1, 2]


# --------------------------------------------------------------------------
# A ClientSession on a reopened outbox


def connect_as(session: ClientSession, session_id: str, token: str) -> None:
    """``open_session`` with a chosen session id and token."""
    session.connection_made(0)
    session.receive_text(welcome(session=session_id, token=token), 0)
    session.data_to_send()
    session.events_received()


@pytest.mark.timeout(10)
def test_session_on_a_reopened_outbox_resumes_and_resends_in_order(path: Path) -> None:
    with SqliteOutbox(path) as first:
        old = ClientSession(outbox=first)
        connect_as(old, "s1", "tok-1")
        old.join("/", "lobby", now=0)
        old.receive_text(reply(1, {"stream": "room:/:lobby", "epoch": "e1", "offset": 3}), 0)
        frames(old)
        old.emit("/", "a", 1, now=0)
        old.request("/", "b", 2, now=0)
        old.publish("/", "lobby", "c", 3, now=0)
        assert [f["id"] for f in frames(old)] == [2, 3, 4]
        old.receive_text(reply(2), 0)  # 2 is answered; 3 and 4 are not
        kept = {e.id: e.text for e in first}
        assert list(kept) == [3, 4]
        # the process dies here: nothing else is written

    with SqliteOutbox(path) as second:
        new = ClientSession(outbox=second)
        assert new.session_id == "s1"
        assert new.rooms == {("/", "lobby"): "room:/:lobby"}
        new.connection_made(0)
        (hello,) = frames(new)
        assert hello["type"] == "hello"
        assert hello["resume"]["token"] == "tok-1"
        assert hello["resume"]["last_reply"] == 2
        lobby = [s for s in hello["resume"]["streams"] if s["stream"] == "room:/:lobby"]
        assert [(s["epoch"], s["offset"], s["room"]) for s in lobby] == [("e1", 3, "lobby")]
        new.receive_text(welcome(session="s1", token="tok-1", resumed=True), 0)
        assert new.data_to_send() == [kept[3], kept[4]]  # the saved frames, byte for byte
        message_id, _ = new.emit("/", "d", 4, now=0)
        assert message_id == 5
        assert [f["id"] for f in frames(new)] == [5]


@pytest.mark.timeout(10)
def test_session_expired_on_the_server_resends_under_the_new_session(path: Path) -> None:
    with SqliteOutbox(path) as first:
        old = ClientSession(outbox=first)
        connect_as(old, "s1", "tok-1")
        old.join("/", "lobby", now=0)
        old.receive_text(reply(1, {"stream": "room:/:lobby", "epoch": "e1", "offset": 0}), 0)
        old.publish("/", "lobby", "c", 1, now=0)
    with SqliteOutbox(path) as second:
        new = ClientSession(outbox=second)
        new.connection_made(0)
        frames(new)
        new.receive_text(welcome(session="s2", token="tok-2", resumed=False), 0)
        assert [(f["type"], f["id"]) for f in frames(new)] == [("publish", 2)]
    with SqliteOutbox(path) as third:
        state = third.load_state()
        assert state is not None
        assert (state.session_id, state.token) == ("s2", "tok-2")
        assert state.rooms == {("/", "lobby"): "room:/:lobby"}
        assert "inbox:s1" not in state.streams  # the old inbox is reported lost
        assert third.ids() == [2]


@pytest.mark.timeout(10)
def test_drop_oldest_through_the_session_is_persisted(path: Path) -> None:
    with SqliteOutbox(path, max_messages=2, policy=OverflowPolicy.DROP_OLDEST) as outbox:
        s = ClientSession(outbox=outbox)
        s.emit("/", "e", 1, now=0)
        s.emit("/", "e", 2, now=0)
        _, dropped = s.emit("/", "e", 3, now=0)
        assert dropped == [Dropped(1, "emit")]
    with SqliteOutbox(path) as reopened:
        assert reopened.ids() == [2, 3]


# --------------------------------------------------------------------------
# A client process killed with SIGKILL, then started again on the same file

CHILD = textwrap.dedent(
    """
    import asyncio
    import sys

    from rtchat_sdk import Client, ConnectionState, ReconnectPolicy, SqliteOutbox


    async def committed(outbox, count):
        # Until `count` messages are in the file (next_id is saved with each).
        while True:
            state = outbox.load_state()
            if state is not None and state.next_id > count:
                return
            await asyncio.sleep(0.01)


    async def main(url, path, mode, na, nb, nc):
        outbox = SqliteOutbox(path)
        client = Client(
            url,
            outbox=outbox,
            reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=0.2),
            retry_first_connect=True,
        )
        tasks = []

        def queue(start, stop):
            for i in range(start, stop):
                tasks.append(asyncio.create_task(client.emit("work", i)))

        try:
            if mode == "resume":
                print("restored", *outbox.ids(), flush=True)
            await client.connect()
            print("connected", client.session_id, flush=True)
            if mode == "resume":
                while client.outbox_size:
                    await asyncio.sleep(0.01)
                print("done", client.counters["sent"], flush=True)
                return
            loop = asyncio.get_running_loop()
            commands = asyncio.StreamReader()
            await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(commands), sys.stdin
            )
            queue(0, na)  # A: sent and processed; the reply of the last one is lost
            await committed(outbox, na)
            print("A", flush=True)
            assert (await commands.readline()).strip() == b"B"
            queue(na, na + nb)  # B: written into a link that discards everything
            await committed(outbox, na + nb)
            while client.counters["sent"] < na + nb:
                await asyncio.sleep(0.01)
            print("B", flush=True)
            assert (await commands.readline()).strip() == b"C"
            while client.state is ConnectionState.CONNECTED:
                await asyncio.sleep(0.01)
            queue(na + nb, na + nb + nc)  # C: queued while disconnected
            await committed(outbox, na + nb + nc)
            print("C", flush=True)
            await asyncio.Event().wait()  # until SIGKILL
        finally:
            await client.close()
            outbox.close()


    url, path, mode, na, nb, nc = sys.argv[1:]
    asyncio.run(main(url, path, mode, int(na), int(nb), int(nc)))
    """
)


class Child:
    """One run of the child script, with line-by-line reading of what it says."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr

    async def line(self) -> list[str]:
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(20):
                raw = await self.proc.stdout.readline()
        except TimeoutError:
            raise AssertionError(
                f"child said nothing; stderr:\n{self.stderr.read_text()}"
            ) from None
        if not raw:
            raise AssertionError(f"child ended; stderr:\n{self.stderr.read_text()}")
        return raw.decode().split()

    async def say(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


@pytest.mark.timeout(90)
async def test_client_killed_with_sigkill_delivers_its_queue_exactly_once_after_restart(
    server: Server, tmp_path: Path
) -> None:
    na, nb, nc = 20, 20, 20
    total = na + nb + nc
    seen: list[int] = []
    a_processed = asyncio.Event()
    proxy = FaultProxy(server.port)
    await proxy.start()

    @server.on("work")
    def work(ctx: Context, data: int) -> None:
        seen.append(data)
        if data == na - 1:
            proxy.blackhole(True)  # its reply (at least) never reaches the client
            a_processed.set()

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    db = tmp_path / "client-outbox.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children: list[Child] = []

    async def start(mode: str) -> Child:
        stderr = tmp_path / f"{mode}.stderr"
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                proxy.url,
                str(db),
                mode,
                str(na),
                str(nb),
                str(nc),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=tmp_path,
                env=env,
            )
        child = Child(proc, stderr)
        children.append(child)
        return child

    try:
        first = await start("queue")
        hello = await first.line()
        assert hello[0] == "connected"
        session_id = hello[1]
        assert await first.line() == ["A"]
        async with asyncio.timeout(20):
            await a_processed.wait()
        await first.say("B")
        assert await first.line() == ["B"]
        proxy.refuse(True)
        proxy.drop()
        await first.say("C")
        assert await first.line() == ["C"]
        await first.kill()
        assert first.proc.returncode == -9
        # A was processed; B went into the black hole; C never left the client.
        assert seen == list(range(na))

        second = await start("resume")  # the proxy still refuses: it has to retry
        restored = await second.line()
        assert restored[0] == "restored"
        ids = [int(i) for i in restored[1:]]
        # message i has id i + 1; at least A's last, all of B and C are still queued
        assert ids == list(range(ids[0], total + 1))
        assert ids[0] <= na
        proxy.blackhole(False)
        proxy.refuse(False)
        assert await second.line() == ["connected", session_id]  # the old session resumed
        # each restored message went out once from the new process
        assert await second.line() == ["done", str(len(ids))]
        async with asyncio.timeout(20):
            assert await second.proc.wait() == 0
        assert seen == list(range(total))  # every message exactly once, in order
    finally:
        for child in children:
            await child.kill()
            if child.proc.stdin is not None:
                child.proc.stdin.close()
        await proxy.close()

"""The real server hub run without asyncio: a test driver with a fake clock.

``HubNet`` carries out the hub's commands as the asyncio driver does, except
that calls wait in ``pending`` until the test answers them (``answer``), in
any order it likes, so a test decides what happens while an operation waits
(a live entry during a replay, a second frame during a hello). The broker is
the real ``MemoryBroker`` on the same fake clock; its coroutines never
suspend, so each is run to completion in one step (``run_now``). Handlers are
the app's own, in real ``Namespace`` objects; sync handlers only.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Coroutine
from functools import partial
from typing import Any

from rtchat_sdk import protocol as p
from server_ref.app import Namespace
from server_ref.broker import MemoryBroker, StreamEntry
from server_ref.calls import handle_now as handle_at_once
from server_ref.calls import run_call
from server_ref.config import ServerConfig
from server_ref.core.commands import (
    Batching,
    Call,
    Close,
    Deliver,
    Finished,
    Identity,
    Send,
)
from server_ref.core.hub import Hub

__all__ = ["HubNet", "run_now"]


def run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends; its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the coroutine suspended: not a memory-only call")


class HubNet:
    """A hub, a memory broker, app namespaces and a fake clock, driven by the test."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        broker: MemoryBroker | None = None,
        users: dict[str, str | Identity] | None = None,
        auto: bool = True,
        answer_now: bool = False,
        handle_now: bool = False,
    ) -> None:
        self.now = 1000.0
        self.config = config or ServerConfig()
        self.broker = broker or MemoryBroker(
            history_size=self.config.history_size,
            history_seconds=self.config.history_seconds,
            dedupe_size=self.config.dedupe_size,
            clock=lambda: self.now,
        )
        self.namespaces: dict[str, Namespace] = {p.DEFAULT_NAMESPACE: Namespace("/")}
        self.users = users
        """Tokens to users (or identities, with claims); when set, the hub asks an
        authenticator that uses it."""
        self.hub = Hub(
            self.config,
            namespaces=self.namespaces,
            node="node-1",
            authenticates=users is not None,
            new_session=self._new_session,
            answer_now=self.broker.answer_now if answer_now else None,
            # As Server does: a sync handler runs inside the hub's step, not as a call.
            handle_now=partial(handle_at_once, self.namespaces, _NoHost()) if handle_now else None,
        )
        self._sessions_made = 0
        self.auto = auto
        """Answer every call at once; when False they wait in ``pending``."""
        self.sent: dict[int, list[str]] = defaultdict(list)
        self.closed: dict[int, int] = {}
        self.batching: set[int] = set()
        self.finished: dict[int, tuple[Any, BaseException | None]] = {}
        self.pending: list[Call] = []
        self.calls: list[Call] = []
        """Every call the hub asked for, in order."""

    def _new_session(self) -> tuple[str, str]:
        """Numbered session ids and tokens, so runs replay exactly."""
        self._sessions_made += 1
        return f"session-{self._sessions_made}", f"token-{self._sessions_made}"

    # ------------------------------------------------------------------
    # Inputs

    def open(self) -> int:
        conn = self.hub.connection_opened(self.now)
        self.run()
        return conn

    def send(self, conn: int, frame: dict[str, Any] | str) -> None:
        text = frame if isinstance(frame, str) else json.dumps(frame)
        self.hub.text_received(conn, text, self.now)
        self.run()

    def hello(self, **fields: Any) -> tuple[int, dict[str, Any]]:
        """A new connection that says hello; returns it and its welcome."""
        conn = self.open()
        self.send(conn, {"type": "hello", "protocol": p.PROTOCOL_VERSION, **fields})
        welcome = self.frames(conn)[0]
        assert welcome["type"] == "welcome", welcome
        return conn, welcome

    def close(self, conn: int, peer_code: int | None = p.CloseCode.NORMAL) -> None:
        self.hub.connection_closed(conn, peer_code, self.now)
        self.run()

    def advance(self, seconds: float) -> None:
        """Move the clock, handling each deadline at its time as the driver's timer does."""
        end = self.now + seconds
        while (when := self.hub.get_timer()) is not None and when <= end:
            self.now = max(self.now, when)
            self.hub.handle_timer(self.now)
            self.run()
        self.now = end

    def publish(self, stream: str, entry_text_data: Any, *, sender: str | None = None) -> int:
        """Append to a stream from outside (another publisher, the app)."""
        from server_ref.broker import Draft

        ns, room = p.DEFAULT_NAMESPACE, None
        if stream.startswith("room:"):
            _, ns, room = stream.split(":", 2)
        draft = Draft.message(
            stream,
            ns=ns,
            room=room,
            event="m",
            data=entry_text_data,
            sender=sender,
            echo=False,
            max_bytes=self.config.max_frame_bytes,
        )
        entry: StreamEntry = run_now(self.broker.append(stream, draft))
        self.run()
        return entry.offset

    # ------------------------------------------------------------------
    # Outputs

    def frames(self, conn: int) -> list[dict[str, Any]]:
        """What was written to ``conn`` since the last look, decoded."""
        out, self.sent[conn] = self.sent[conn], []
        return [json.loads(text) for text in out]

    # ------------------------------------------------------------------
    # The driver

    def run(self) -> None:
        """Carry out the hub's commands (and, when ``auto``, answer its calls)."""
        while True:
            commands = self.hub.take_commands()
            if not commands:
                if self.auto and self.pending:
                    self._answer(0)
                    continue
                return
            for cmd in commands:
                if isinstance(cmd, Send):
                    if cmd.conn not in self.closed:
                        self.sent[cmd.conn].extend(cmd.frames)
                elif isinstance(cmd, Deliver):
                    for conn in cmd.conns:
                        if conn not in self.closed:
                            self.sent[conn].append(cmd.text)
                elif isinstance(cmd, Close):
                    self.closed.setdefault(cmd.conn, cmd.code)
                elif isinstance(cmd, Batching):
                    self.batching.add(cmd.conn)
                elif isinstance(cmd, Finished):
                    self.finished[cmd.op] = (cmd.result, cmd.error)
                else:
                    self.calls.append(cmd)
                    self.pending.append(cmd)

    def answer(self, index: int = 0) -> Call:
        """Carry out the pending call at ``index`` and hand its outcome to the hub."""
        call = self._answer(index)
        self.run()
        return call

    def _answer(self, index: int) -> Call:
        call = self.pending.pop(index)
        try:
            result = run_now(self._outcome(call))
        except Exception as exc:
            self.hub.call_failed(call.op, exc, self.now)
        else:
            self.hub.call_done(call.op, result, self.now)
        return call

    def answer_all(self) -> None:
        while self.pending:
            self.answer(0)

    def _outcome(self, call: Call) -> Coroutine[Any, Any, Any]:
        return run_call(
            call,
            broker=self.broker,
            namespaces=self.namespaces,
            host=_NoHost(),
            authenticate=self._authenticate if self.users is not None else None,
            listener=self._on_entry,
        )

    def _authenticate(self, auth: dict[str, Any] | None) -> str | Identity | None:
        assert self.users is not None
        return self.users.get((auth or {}).get("token", ""))

    def _on_entry(self, entry: StreamEntry) -> None:
        self.hub.entry_appended(entry)


class _NoHost:
    """Handlers under HubNet do not call back into the server."""

    async def join_session(self, session_id: str, ns: str, room: str) -> tuple[str, int]:
        raise NotImplementedError

    async def leave_session(self, session_id: str, ns: str, room: str) -> None:
        raise NotImplementedError

    async def publish(
        self,
        room: str,
        event: Any,
        data: Any = None,
        *,
        ns: str = p.DEFAULT_NAMESPACE,
        sender: str | None = None,
        echo: bool = False,
    ) -> int:
        raise NotImplementedError

    async def send_to(
        self, session_id: str, event: Any, data: Any = None, *, ns: str = p.DEFAULT_NAMESPACE
    ) -> int:
        raise NotImplementedError

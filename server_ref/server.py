"""The reference server: an asyncio driver over websockets.asyncio.server.

Per connection, one reader loop feeds frames to the sans-I/O
``ConnectionCore`` and acts on what it returns, one frame at a time, so a
client's messages are processed in the order it sent them. Sessions outlive
connections for ``session_ttl`` seconds so a client can resume; streams live
behind the ``Broker``. A delivery is encoded once for all members of a room.

Everything a connection is sent takes one path, ``_frame``: the frame is
queued for the connection and reaches the socket at the end of the
event-loop pass (``_write_pending``), so what one pass produced for a
connection (the replies to messages that arrived together, the deliveries of
a batch of publishes) leaves in one ``send()`` system call instead of one
each, and, for a client that accepts batches, in one WebSocket message. The
reader waits for the socket to drain when the transport says its buffer is
full, as ``ws.send()`` did for each frame; a room member whose unsent data
passes ``max_pending_bytes`` is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from rtchat_sdk import protocol as p
from rtchat_sdk.errors import ValidationFailed
from rtchat_sdk.events import Event, event_name

from .app import Context, Namespace
from .broker import Broker, Draft, MemoryBroker, SessionRecord, StreamEntry
from .config import ServerConfig
from .core.connection import ConnectionCore, error_frame, reply_frame, unsendable_answer
from .errors import FrameTooLarge, HandlerFailure

__all__ = ["Authenticator", "FrameTooLarge", "Server", "ServerConfig"]

log = logging.getLogger("server_ref")

Authenticator = Callable[[dict[str, Any] | None], "str | Awaitable[str | None] | None"]
"""Gets ``hello.auth``; returns the user identity, or None to refuse."""


class _Session:
    """A session as this node holds it: the shared record plus local live state."""

    __slots__ = ("conn", "expiry", "held", "id", "inbox", "lock", "record", "replaying")

    def __init__(self, record: SessionRecord) -> None:
        self.record = record
        self.id = record.id
        self.inbox = p.inbox_stream(record.id)
        self.lock = asyncio.Lock()
        self.conn: _Connection | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.replaying = False
        self.held: list[StreamEntry] = []


_WRITE_NOW_BYTES = 64 * 1024
"""Unwritten bytes past which ``_frame`` writes at once instead of at the end of the pass."""


class _Connection:
    __slots__ = (
        "batch",
        "batch_bytes",
        "batching",
        "busy",
        "core",
        "session",
        "timer",
        "unwritten",
        "ws",
    )

    def __init__(self, ws: ServerConnection, core: ConnectionCore) -> None:
        self.ws = ws
        self.core = core
        self.session: _Session | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False
        self.unwritten = 0
        """Bytes framed (or batched) and not yet handed to the transport."""
        self.batching = False
        """The client's ``hello`` said it accepts batches (a JSON array of frames)."""
        self.batch: list[bytes] = []
        """Encoded frames waiting to go out as one message, when batching."""
        self.batch_bytes = 0


class Server:
    """An embeddable rtchat server.

    ``await server.start(host, port)`` ... ``await server.close()``, or
    ``async with server.serving(host, port):``.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        broker: Broker | None = None,
        authenticate: Authenticator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or ServerConfig()
        self.broker = broker or MemoryBroker(
            history_size=self.config.history_size,
            history_seconds=self.config.history_seconds,
            dedupe_size=self.config.dedupe_size,
            clock=clock,
        )
        self.node = secrets.token_hex(8)
        """This node's id: the owner of the sessions whose connections it holds."""
        self._authenticate = authenticate
        self._clock = clock
        self._namespaces: dict[str, Namespace] = {p.DEFAULT_NAMESPACE: Namespace("/")}
        self._sessions: dict[str, _Session] = {}
        self._members: dict[str, set[_Session]] = {}
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ws_server: WsServer | None = None
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unwritten: list[_Connection] = []  # connections with frames not yet written
        self._closing = False
        self._heartbeat = p.HeartbeatInfo(
            interval=self.config.heartbeat_interval, timeout=self.config.heartbeat_timeout
        )
        self._limits = p.Limits(
            max_frame_bytes=self.config.max_frame_bytes,
            max_in_flight=self.config.max_in_flight,
            history_size=self.config.history_size,
            history_seconds=self.config.history_seconds,
            session_ttl=self.config.session_ttl,
        )

    # ------------------------------------------------------------------
    # Handlers and namespaces

    def namespace(self, path: str) -> Namespace:
        """The namespace at ``path``, created on first use."""
        ns = self._namespaces.get(path)
        if ns is None:
            ns = self._namespaces[path] = Namespace(path)
        return ns

    def on(self, event: str | type[Event]) -> Callable[[Any], Any]:
        """Register a handler in the default namespace ``/``."""
        return self._namespaces[p.DEFAULT_NAMESPACE].on(event)

    # ------------------------------------------------------------------
    # Running

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port 0)."""
        if self._port is None:
            raise RuntimeError("server is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 8765) -> None:
        """Start listening; returns once the socket is bound."""
        self._loop = asyncio.get_running_loop()
        await self.broker.start(self._clock)
        await self.broker.watch_replaced(self.node, self._replaced)
        self._ws_server = await serve(
            self._handle,
            host,
            port,
            max_size=self.config.max_frame_bytes,
            ping_interval=None,  # rtchat's own heartbeats run at the app level
            compression="deflate" if self.config.compression else None,
        )
        self._port = next(iter(self._ws_server.sockets)).getsockname()[1]
        log.debug("rtchat server listening on %s:%s", host, self.port)

    @contextlib.asynccontextmanager
    async def serving(self, host: str = "127.0.0.1", port: int = 8765) -> AsyncIterator[Server]:
        """Run the server for the duration of an ``async with`` block."""
        await self.start(host, port)
        try:
            yield self
        finally:
            await self.close()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every session with GOING_AWAY, release the broker.

        Clients get ``timeout`` seconds to answer the close; then their
        connections are aborted.
        """
        if self._closing:
            return
        self._closing = True
        if self._ws_server is not None:
            self._ws_server.close(close_connections=False)
        notice = error_frame(
            p.ErrorCode.SHUTTING_DOWN,
            "server is shutting down",
            retry_after=self.config.shutdown_retry_after,
        )
        conns = list(self._connections)
        for c in conns:
            self._send(c, [notice])
            self._seal(c)
        closing = asyncio.gather(
            *(c.ws.close(p.CloseCode.GOING_AWAY, "server shutting down") for c in conns),
            return_exceptions=True,
        )
        try:
            await asyncio.wait_for(closing, timeout)
        except TimeoutError:
            for c in conns:
                if c.ws.transport is not None:
                    c.ws.transport.abort()
        if self._ws_server is not None:
            await self._ws_server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for session in self._sessions.values():
            if session.expiry is not None:
                session.expiry.cancel()
        await self.broker.unwatch_replaced(self.node)
        await self.broker.close()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------
    # Server-side API

    async def publish(
        self,
        room: str,
        event: str | Event,
        data: Any = None,
        *,
        ns: str = p.DEFAULT_NAMESPACE,
        sender: str | None = None,
        echo: bool = False,
    ) -> int:
        """Append to a room's stream and deliver to its members; returns the offset.

        Raises ``FrameTooLarge`` or, for data holding NaN or an infinity,
        ``ValidationFailed``; nothing is appended then.
        """
        entry = await self._append(
            p.room_stream(ns, room), ns, room, event, data, sender=sender, echo=echo
        )
        return entry.offset

    async def send_to(
        self,
        session_id: str,
        event: str | Event,
        data: Any = None,
        *,
        ns: str = p.DEFAULT_NAMESPACE,
    ) -> int:
        """Append to one session's inbox and deliver it; returns the offset (raises as publish)."""
        entry = await self._append(p.inbox_stream(session_id), ns, None, event, data, sender=None)
        return entry.offset

    async def join_session(self, session_id: str, ns: str, room: str) -> tuple[str, int]:
        session = self._sessions[session_id]
        stream = p.room_stream(ns, room)
        epoch, offset = await self.broker.position(stream)
        if (ns, room) not in session.record.rooms:
            session.record.rooms[(ns, room)] = (epoch, offset)
            await self.broker.save_session(session.record, None)
            await self._add_member(stream, session)
        return epoch, offset

    async def leave_session(self, session_id: str, ns: str, room: str) -> None:
        session = self._sessions[session_id]
        if session.record.rooms.pop((ns, room), None) is not None:
            await self.broker.save_session(session.record, None)
            await self._remove_member(p.room_stream(ns, room), session)

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    async def _append(
        self,
        stream: str,
        ns: str,
        room: str | None,
        event: str | Event,
        data: Any,
        *,
        sender: str | None,
        echo: bool = False,
        key: str | None = None,
    ) -> StreamEntry:
        draft = Draft.message(
            stream,
            ns=ns,
            room=room,
            event=event_name(event),
            data=p.jsonable(event if isinstance(event, Event) else data),
            sender=sender,
            echo=echo,
            max_bytes=self.config.max_frame_bytes,
        )
        return await self.broker.append(stream, draft, key=key)

    # ------------------------------------------------------------------
    # Membership and fan-out

    async def _add_member(self, stream: str, session: _Session) -> None:
        members = self._members.get(stream)
        if members is None:
            members = self._members[stream] = set()
            members.add(session)
            await self.broker.subscribe(stream, self._deliver)
        members.add(session)

    async def _remove_member(self, stream: str, session: _Session) -> None:
        members = self._members.get(stream)
        if members is None:
            return
        members.discard(session)
        if not members:
            del self._members[stream]
            await self.broker.unsubscribe(stream, self._deliver)

    def _deliver(self, entry: StreamEntry) -> None:
        """Write one appended entry to every local member that should get it."""
        members = self._members.get(entry.stream)
        if not members:
            return
        data = entry.text.encode()
        for session in members:
            if entry.sender == session.id and not entry.echo:
                continue
            if session.replaying:
                session.held.append(entry)
                continue
            conn = session.conn
            if conn is None:
                continue  # detached: it will replay from history on resume
            if self._too_slow(conn):
                continue
            self._frame(conn, data)

    def _too_slow(self, conn: _Connection) -> bool:
        """Disconnect a consumer whose unsent data passed the limit."""
        if conn.core.close_code is not None:
            return True  # already cut off: nothing more may reach it before it resumes
        transport = conn.ws.transport
        if (
            transport is None
            or transport.get_write_buffer_size() + conn.unwritten <= self.config.max_pending_bytes
        ):
            return False
        conn.core.close(p.CloseCode.SLOW_CONSUMER, "too much unsent data; resume to catch up")
        self._spawn(self._close_connection(conn))
        return True

    # ------------------------------------------------------------------
    # Connections

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_connection(self, conn: _Connection) -> None:
        self._seal(conn)  # what was queued goes before the close frame
        code = conn.core.close_code or p.CloseCode.NORMAL
        await conn.ws.close(code, conn.core.close_reason)

    async def _handle(self, ws: ServerConnection) -> None:
        if self._closing:
            await ws.close(p.CloseCode.GOING_AWAY, "server shutting down")
            return
        if len(self._connections) >= self.config.max_connections:
            retry = self.config.overload_retry_after
            await ws.send(
                error_frame(
                    p.ErrorCode.OVERLOADED,
                    f"server is at its limit of {self.config.max_connections} connections",
                    retry_after=retry,
                )
            )
            await ws.close(p.CloseCode.TRY_AGAIN_LATER, f"overloaded; retry after {retry}s")
            return
        now = self._clock()
        conn = _Connection(
            ws,
            ConnectionCore(
                now,
                heartbeat=self._heartbeat,
                handshake_timeout=self.config.handshake_timeout,
                max_bad_frames=self.config.max_bad_frames,
            ),
        )
        self._connections.add(conn)
        self._arm_timer(conn)
        try:
            async for text in ws:
                frame = conn.core.receive_text(text, self._clock())
                if frame is not None:
                    conn.busy = True
                    try:
                        await self._dispatch(conn, frame)
                    finally:
                        conn.busy = False
                await self._flush(conn)
                if conn.core.close_code is not None:
                    await self._close_connection(conn)
                    break
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(conn)
            if conn.timer is not None:
                conn.timer.cancel()
            await self._detach(conn)

    async def _flush(self, conn: _Connection) -> None:
        """Send what the core produced; wait while the peer's buffer is full."""
        frames = conn.core.data_to_send()
        if frames:
            self._send(conn, frames)
            ws = conn.ws
            if ws.paused:  # the transport is above its high-water mark: back-pressure
                self._write(conn)
                try:
                    await ws.drain()
                except Exception:  # the connection was lost: the reader sees it next
                    log.debug("connection lost while draining", exc_info=True)

    def _send(self, conn: _Connection, frames: list[str]) -> None:
        for text in frames:
            self._frame(conn, text.encode())

    def _frame(self, conn: _Connection, data: bytes) -> None:
        """Queue one encoded frame for the connection; it reaches the socket this loop pass.

        The one way anything is written. A connection that is no longer open
        gets nothing (``ws.send()`` refused too). For a client that accepts
        batches, the frames of one pass go out as one message (a JSON array,
        at most ``max_frame_bytes``), which the client decodes in one call.
        """
        protocol = conn.ws.protocol
        if protocol.state is not State.OPEN:
            return
        if conn.batching:
            if conn.batch and conn.batch_bytes + len(data) + 2 > self.config.max_frame_bytes:
                self._seal(conn)
            conn.batch.append(data)
            conn.batch_bytes += len(data) + 1
        else:
            protocol.send_text(data)
        if not conn.unwritten:  # the first frame since the last write: one is due
            if not self._unwritten:
                assert self._loop is not None  # set by start(), before any connection
                self._loop.call_soon(self._write_pending)
            self._unwritten.append(conn)
        conn.unwritten += len(data)
        if conn.unwritten >= _WRITE_NOW_BYTES:
            self._write(conn)

    def _seal(self, conn: _Connection) -> None:
        """Frame the batched frames as one WebSocket message (a lone frame as itself)."""
        batch = conn.batch
        if not batch:
            return
        protocol = conn.ws.protocol
        if protocol.state is State.OPEN:
            protocol.send_text(batch[0] if len(batch) == 1 else p.encode_batch(batch))
        batch.clear()
        conn.batch_bytes = 0

    def _write_pending(self) -> None:
        """End of the loop pass: write out every connection's frames."""
        conns, self._unwritten = self._unwritten, []
        for conn in conns:
            self._write(conn)

    def _write(self, conn: _Connection) -> None:
        """Hand everything framed for the connection to its transport, in one write."""
        if conn.unwritten == 0:
            return  # written already (a large batch, or back-pressure)
        conn.unwritten = 0
        self._seal(conn)
        ws = conn.ws
        transport = ws.transport
        # One frame per item; ws.send_data() would make one write (one send()
        # system call) of each. An empty item asks for a half-close after the
        # data (websockets writes its own at once, so it is hardly ever here).
        chunks = ws.protocol.data_to_send()
        try:
            if all(chunks):
                transport.write(b"".join(chunks))
                return
            for chunk in chunks:
                if chunk:
                    transport.write(chunk)
                elif transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
        except Exception:  # as websockets does: a connection we cannot write to is dead
            log.debug("write failed", exc_info=True)
            transport.abort()

    def _arm_timer(self, conn: _Connection) -> None:
        when = conn.core.get_timer()
        if when is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - self._clock())
        conn.timer = loop.call_at(loop.time() + delay, self._on_timer, conn)

    def _on_timer(self, conn: _Connection) -> None:
        conn.timer = None
        now = self._clock()
        if conn.busy:
            conn.core.keepalive(now)  # a slow handler, not a silent peer
        conn.core.handle_timer(now)
        pending = conn.core.data_to_send()
        if pending:
            self._send(conn, pending)
        if conn.core.close_code is not None:
            self._spawn(self._close_connection(conn))
            return
        self._arm_timer(conn)

    # ------------------------------------------------------------------
    # Sessions

    async def _detach(self, conn: _Connection) -> None:
        """The connection is gone: keep the session for resume, or end it."""
        session = conn.session
        if session is None or session.conn is not conn:
            return
        session.conn = None
        goodbye = conn.ws.protocol.close_rcvd
        if (goodbye is not None and goodbye.code == p.CloseCode.NORMAL) or self._closing:
            # The client said goodbye (nothing to resume), or this node is stopping
            # (the record stays in the broker for its TTL so another node can resume it).
            if not self._closing:
                await self.broker.delete_session(session.record)
            else:
                session.record.owner = None
                await self.broker.save_session(session.record, self.config.session_ttl)
            await self._drop_local(session)
            return
        session.record.owner = None
        await self.broker.save_session(session.record, self.config.session_ttl)
        loop = asyncio.get_running_loop()
        session.expiry = loop.call_later(self.config.session_ttl, self._expire_local, session)

    def _expire_local(self, session: _Session) -> None:
        session.expiry = None
        self._spawn(self._drop_local(session))

    async def _drop_local(self, session: _Session) -> None:
        """Forget this node's live state of a session (its record expires on its own)."""
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        if session.conn is not None:
            return  # resumed meanwhile
        self._sessions.pop(session.id, None)
        for ns, room in list(session.record.rooms):
            await self._remove_member(p.room_stream(ns, room), session)
        await self._remove_member(session.inbox, session)

    def _replaced(self, session_id: str) -> None:
        """Another node resumed one of our sessions: close its connection here with 4006."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        old, session.conn = session.conn, None
        if old is not None:
            old.session = None
            old.core.close(p.CloseCode.SESSION_REPLACED, "session resumed on another connection")
            self._spawn(self._close_connection(old))
        self._spawn(self._drop_local(session))

    async def _hello(self, conn: _Connection, hello: p.HelloFrame) -> None:
        conn.batching = hello.batch
        user = await self._identify(conn, hello)
        if conn.core.close_code is not None:
            return
        now = self._clock()
        record = None
        if hello.resume is not None:
            record = await self.broker.load_session(hello.resume.token)
            if record is not None and record.user != user:
                record = None  # a token is bound to its user: nobody else resumes it
        if record is None:
            record = SessionRecord(secrets.token_hex(8), secrets.token_urlsafe(32), user)
            refused: list[p.StreamPosition] = []
            if hello.resume is not None:
                refused = await self._restore_rooms(record, hello.resume)
                if hello.resume.session is not None:
                    record.previous.append(hello.resume.session)
            record.owner = self.node
            await self.broker.save_session(record, None)
            session = await self._local_session(record)
            await self._attach(
                conn, session, resumed=False, now=now, resume=hello.resume, refused=refused
            )
            return
        previous_owner, record.owner = record.owner, self.node
        await self.broker.save_session(record, None)
        if previous_owner is not None and previous_owner != self.node:
            await self.broker.replace(previous_owner, record.id)
        session = await self._local_session(record)
        old = session.conn
        if old is not None and old is not conn:
            old.session = None
            old.core.close(p.CloseCode.SESSION_REPLACED, "session resumed on another connection")
            self._spawn(self._close_connection(old))
        assert hello.resume is not None
        await self.broker.forget_replies(record.id, hello.resume.last_reply)
        await self._attach(conn, session, resumed=True, now=now, resume=hello.resume)

    async def _restore_rooms(
        self, record: SessionRecord, resume: p.ResumeInfo
    ) -> list[p.StreamPosition]:
        """Put a new session in the rooms a client followed under its lost session.

        Each room is checked like a join; returns the positions refused.
        """
        refused: list[p.StreamPosition] = []
        for position in resume.streams:
            if position.room is None or position.ns is None:
                continue
            ns = self._namespaces.get(position.ns)
            ctx = Context(self, record.id, record.user, position.ns)
            if (
                ns is None
                or position.stream != p.room_stream(position.ns, position.room)
                or not await self._may_join(ns, ctx, position.room)
            ):
                refused.append(position)
                continue
            record.rooms[(position.ns, position.room)] = (position.epoch, position.offset)
        return refused

    async def _may_join(self, ns: Namespace, ctx: Context, room: str) -> bool:
        """A join check that raises refuses the join instead of failing the handshake."""
        try:
            return await ns.may_join(ctx, room)
        except Exception:
            log.exception("join check for %r in %r raised", room, ns.path)
            return False

    async def _local_session(self, record: SessionRecord) -> _Session:
        """This node's live session for a record, made (with memberships) if new here."""
        session = self._sessions.get(record.id)
        if session is None:
            session = self._sessions[record.id] = _Session(record)
            await self._add_member(session.inbox, session)
            for ns, room in record.rooms:
                await self._add_member(p.room_stream(ns, room), session)
        else:
            session.record = record
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        return session

    async def _identify(self, conn: _Connection, hello: p.HelloFrame) -> str | None:
        if self._authenticate is None:
            user = (hello.auth or {}).get("user")
            return user if isinstance(user, str) else None
        try:
            result = self._authenticate(hello.auth)
            if isinstance(result, Awaitable):
                result = await result
        except Exception as exc:  # an authenticator bug must not kill the server
            log.exception("authenticate raised")
            result = None
            reason = f"authentication failed: {type(exc).__name__}"
        else:
            reason = "credentials were refused"
        if result is None:
            conn.core.refuse(p.ErrorCode.UNAUTHORIZED, reason, p.CloseCode.UNAUTHORIZED)
        return result

    async def _attach(
        self,
        conn: _Connection,
        session: _Session,
        *,
        resumed: bool,
        now: float,
        resume: p.ResumeInfo | None = None,
        refused: list[p.StreamPosition] | None = None,
    ) -> None:
        conn.session = session
        session.conn = conn
        session.replaying = True
        session.held = []
        inbox_epoch, inbox_offset = await self.broker.position(session.inbox)
        conn.core.accept(
            p.WelcomeFrame(
                protocol=p.PROTOCOL_VERSION,
                session=session.id,
                token=session.record.token,
                resumed=resumed,
                heartbeat=self._heartbeat,
                limits=self._limits,
                inbox=p.StreamPosition(
                    stream=session.inbox, epoch=inbox_epoch, offset=inbox_offset
                ),
            ),
            now,
        )
        for position in refused or ():
            conn.core.send(
                p.encode(
                    p.GapFrame(
                        stream=position.stream,
                        ns=position.ns or p.DEFAULT_NAMESPACE,
                        room=position.room,
                        epoch=position.epoch,
                        offset=position.offset,
                        reason="not_rejoined",
                    )
                )
            )
        covered = {session.inbox: inbox_offset}
        try:
            if resume is not None:
                covered.update(await self._replay(conn, session, resume))
            await self._flush(conn)
            # Live entries held back while we replayed: those the replay did not
            # cover, in order. Until none is left, new ones keep being held, so no
            # live entry can overtake a replayed one.
            while session.held:
                held, session.held = session.held, []
                for entry in held:
                    if entry.offset > covered.get(entry.stream, 0):
                        covered[entry.stream] = entry.offset
                        conn.core.send(entry.text)
                        await self._flush(conn)
        finally:
            session.replaying = False
            session.held = []
        if conn.timer is not None:
            conn.timer.cancel()
        self._arm_timer(conn)

    async def _replay(
        self, conn: _Connection, session: _Session, resume: p.ResumeInfo
    ) -> dict[str, int]:
        """Queue what each of the session's streams holds past the client's position.

        Returns, per stream, the offset the replay reached.
        """
        covered: dict[str, int] = {}
        # Our own publishes come back only with echo, including those of the
        # lost sessions this one replaced (the client presents that id too).
        own = {session.id, *session.record.previous}
        if resume.session is not None:
            own.add(resume.session)
        given = {s.stream: s for s in resume.streams}
        wanted: dict[str, tuple[str, str | None, str, int]] = {}
        for (room_ns, room_name), (room_epoch, room_offset) in session.record.rooms.items():
            wanted[p.room_stream(room_ns, room_name)] = (
                room_ns,
                room_name,
                room_epoch,
                room_offset,
            )
        wanted[session.inbox] = (p.DEFAULT_NAMESPACE, None, "", 0)
        for stream, (ns, room, epoch, offset) in wanted.items():
            position = given.get(stream)
            if position is not None:
                epoch, offset = position.epoch, position.offset
            elif not epoch:
                epoch, offset = (await self.broker.position(stream))[0], 0
            replay = await self.broker.read_since(stream, epoch, offset)
            if replay.gap is not None:
                conn.core.send(
                    p.encode(
                        p.GapFrame(
                            stream=stream,
                            ns=ns,
                            room=room,
                            epoch=replay.epoch,
                            offset=replay.gap_offset,
                            reason=replay.gap,
                        )
                    )
                )
            for entry in replay.entries:
                if entry.echo or entry.sender not in own:
                    conn.core.send(entry.text)
            covered[stream] = replay.offset
        return covered

    # ------------------------------------------------------------------
    # Frames

    async def _dispatch(self, conn: _Connection, frame: p.ClientFrame) -> None:
        if isinstance(frame, p.HelloFrame):
            await self._hello(conn, frame)
            return
        session = conn.session
        assert session is not None
        assert not isinstance(frame, p.PingFrame | p.PongFrame)
        async with session.lock:
            processed, stored = await self.broker.recall_reply(session.id, frame.id)
            if processed:
                conn.core.send(
                    stored
                    if stored is not None
                    else error_frame(
                        p.ErrorCode.DUPLICATE_ID,
                        f"message {frame.id} was already processed and its reply is no longer held",
                        frame.id,
                    )
                )
                return
            reply = await self._process(session, frame)
            await self.broker.remember_reply(session.id, frame.id, reply)
            conn.core.send(reply)

    async def _process(
        self,
        session: _Session,
        frame: p.EmitFrame | p.RequestFrame | p.JoinFrame | p.LeaveFrame | p.PublishFrame,
    ) -> str:
        """Carry out one client message; returns the encoded reply or error frame."""
        ns = self._namespaces.get(frame.ns)
        if ns is None:
            return error_frame(
                p.ErrorCode.UNKNOWN_NAMESPACE, f"no namespace {frame.ns!r} on this server", frame.id
            )
        ctx = Context(self, session.id, session.record.user, frame.ns)
        try:
            data: Any = None
            if isinstance(frame, p.RequestFrame):
                data = await ns.call(ctx, frame.event, frame.data)
            elif isinstance(frame, p.EmitFrame):
                await ns.call(ctx, frame.event, frame.data)
            elif isinstance(frame, p.JoinFrame):
                if not await ns.may_join(ctx, frame.room):
                    raise HandlerFailure(p.ErrorCode.UNAUTHORIZED, f"may not join {frame.room!r}")
                epoch, offset = await self.join_session(session.id, frame.ns, frame.room)
                data = {
                    "stream": p.room_stream(frame.ns, frame.room),
                    "epoch": epoch,
                    "offset": offset,
                }
            elif isinstance(frame, p.LeaveFrame):
                await self.leave_session(session.id, frame.ns, frame.room)
            else:
                if (frame.ns, frame.room) not in session.record.rooms:
                    raise HandlerFailure(
                        p.ErrorCode.NOT_IN_ROOM, f"join room {frame.room!r} before publishing to it"
                    )
                stream = p.room_stream(frame.ns, frame.room)
                entry = await self._append(
                    stream,
                    frame.ns,
                    frame.room,
                    frame.event,
                    frame.data,
                    sender=session.id,
                    echo=frame.echo,
                    key=f"{session.id}:{frame.id}",
                )
                data = {"stream": stream, "epoch": entry.epoch, "offset": entry.offset}
            return reply_frame(frame.id, data)
        except HandlerFailure as exc:
            try:
                return error_frame(exc.code, exc.message, frame.id, details=exc.details)
            except ValidationFailed as bad:
                return unsendable_answer(frame, f"its error details: {bad}")
        except FrameTooLarge as exc:
            return error_frame(p.ErrorCode.TOO_LARGE, str(exc), frame.id)
        except ValidationFailed as exc:  # NaN or an infinity, from the encoders
            return unsendable_answer(frame, str(exc))
        except Exception as exc:  # never let one message kill the connection
            log.exception("processing %s %s failed", frame.type, frame.id)
            return error_frame(p.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", frame.id)

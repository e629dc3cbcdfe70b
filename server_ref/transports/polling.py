"""HTTP long polling (PROTOCOL.md §1.1): the server's connections carried by GETs and POSTs.

``Polling`` keeps the polling connections of one server, by ``sid``. Each is a
``PollConnection`` (a ``Transport``): frames the server writes wait in
``pending`` until a poll takes them as the next numbered batch; a batch is
kept until a later poll acknowledges it (``ack``), so an answer lost on the
way is sent again, unchanged. One poll is held at a time: a new one answers
the held one empty. A connection with no request for ``poll_idle_timeout``
is dropped, as a broken WebSocket would be.

The HTTP side is the caller's (``asgi.py``): it parses the request and
calls ``open``, ``poll``, ``post`` or ``goodbye``, which return the status
and the JSON body to answer with. A request for a connection another node
holds is answered by that node (``polling_nodes.py``), so a client's requests
may land on any node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from rtchat_sdk import protocol as p

from ..config import ServerConfig
from ..errors import BrokerUnavailable
from .addresses import trusted_networks
from .base import Endpoint, Transport
from .polling_nodes import UNKNOWN, Forwarder, Reply

__all__ = ["PollConnection", "Polling", "Reply"]


class PollConnection(Transport):
    """One polling connection: its unsent frames, its unacknowledged batches, its held poll."""

    kind = "polling"

    def __init__(self, sid: str, config: ServerConfig, now: float) -> None:
        self.sid = sid
        self.conn = 0
        self.batching = False  # a poll's answer is always an array: batches are implicit
        self._config = config
        self.pending: list[str] = []
        self._pending_bytes = 0
        self.batches: dict[int, tuple[list[str], dict[str, Any] | None]] = {}
        """Sent and not acknowledged: number -> (frames, close or None)."""
        self.cursor = 0
        """The number of the newest batch made."""
        self.closing: dict[str, Any] | None = None
        """``{"code", "reason"}`` once the server closed it (sent with the last batch)."""
        self.finished = False
        self.last_seen = now
        self._held: asyncio.Future[bool] | None = None
        self.posting = asyncio.Lock()
        """Held while a POST's frames are fed: a resent POST (its answer was lost, maybe
        while it was still being fed) waits its turn, so frames stay in order."""

    # Transport

    def write(self, data: bytes) -> None:
        if self.closing is not None or self.finished:
            return
        self.pending.append(data.decode())
        self._pending_bytes += len(data)
        self._wake(True)

    def pending_bytes(self) -> int:
        return self._pending_bytes + sum(
            len(frame) for frames, _ in self.batches.values() for frame in frames
        )

    async def close(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = {"code": code, "reason": reason}
            self._wake(True)

    def abort(self) -> None:
        self.finished = True
        self._wake(False)

    # Polls

    def _wake(self, value: bool) -> None:
        held, self._held = self._held, None
        if held is not None and not held.done():
            held.set_result(value)

    @property
    def holding(self) -> bool:
        """A poll is held, waiting for frames."""
        return self._held is not None

    def supersede(self) -> None:
        """A newer poll came: the held one answers empty."""
        self._wake(False)

    async def wait(self, timeout: float) -> bool:
        """Hold this poll until there is something to send (True), or not (False)."""
        if self.pending or self.closing is not None:
            return True
        held = self._held = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(held, timeout)
        except TimeoutError:
            return False
        finally:
            if self._held is held:
                self._held = None

    def next_batch(self) -> tuple[int, list[str], dict[str, Any] | None]:
        """Make batch ``cursor + 1`` from what is pending (within the limits)."""
        frames: list[str] = []
        size = 0
        limit, max_bytes = self._config.poll_max_frames, self._config.max_frame_bytes
        while self.pending and len(frames) < limit:
            frame = self.pending[0]
            if frames and size + len(frame) + 2 > max_bytes:
                break
            frames.append(self.pending.pop(0))
            size += len(frame) + 1
            self._pending_bytes -= len(frame)
        close = self.closing if not self.pending else None
        self.cursor += 1
        self.batches[self.cursor] = (frames, close)
        return self.cursor, frames, close


class Polling:
    """Every polling connection of one server, and the requests that drive them."""

    def __init__(
        self,
        endpoint: Endpoint,
        config: ServerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._endpoint = endpoint
        self._config = config
        self._clock = clock
        self.connections: dict[str, PollConnection] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.max_body_bytes = config.max_frame_bytes
        self.trusted = trusted_networks(config.trusted_proxies)
        """The proxies whose ``X-Forwarded-For`` names the client (``addresses.py``)."""
        """A request body past this is refused (413) and not read further."""
        self.nodes = Forwarder(endpoint, config.poll_timeout)
        """Requests for other nodes' connections, and theirs for ours."""

    async def open(
        self, body: bytes, bearer: str | None = None, address: str | None = None
    ) -> Reply:
        """Open a connection with the hello in ``body`` (``bearer``: the token of the
        request's ``Authorization: Bearer`` header, if any; ``address``: the client's,
        counted against ``max_connections_per_address``)."""
        frames = self._frames(body)
        if isinstance(frames, tuple):
            return frames
        if not frames or not isinstance(frames[0], dict) or frames[0].get("type") != "hello":
            return 400, {"error": "the first request of a polling connection holds a hello"}
        try:
            await self.nodes.serve(self._local)  # before a sid another node may be asked for
        except BrokerUnavailable:
            return 503, {"error": "unavailable"}
        pc = PollConnection(self.nodes.new_sid(), self._config, self._clock())
        pc.bearer = bearer
        pc.address = address
        pc.conn = self._endpoint.opened(pc)
        self.connections[pc.sid] = pc
        self._start_sweeper()
        await self._feed(pc, frames)
        return 200, {"sid": pc.sid}

    async def poll(self, sid: str, ack: int) -> Reply:
        if self.nodes.holds(sid):
            return await self._poll(sid, ack)
        return await self.nodes.forward("GET", sid, str(ack))

    async def post(self, sid: str, body: bytes) -> Reply:
        if self.nodes.holds(sid):
            return await self._post(sid, body)
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return 400, {"error": "the body is not JSON"}
        return await self.nodes.forward("POST", sid, text)

    async def goodbye(self, sid: str) -> Reply:
        if self.nodes.holds(sid):
            return await self._goodbye(sid)
        return await self.nodes.forward("DELETE", sid, "")

    def release(self, sid: str) -> None:
        """The client of ``sid``'s held poll went away: answer that poll (empty) now."""
        pc = self.connections.get(sid)
        if pc is not None:
            pc.supersede()

    async def _local(self, method: str, sid: str, arg: str) -> Reply:
        """A request another node forwarded, for a connection of this one."""
        if method == "GET":
            return await self._poll(sid, int(arg))
        if method == "POST":
            return await self._post(sid, arg.encode())
        return await self._goodbye(sid)

    async def _poll(self, sid: str, ack: int) -> Reply:
        pc = self.connections.get(sid)
        if pc is None or pc.finished:
            return UNKNOWN
        pc.last_seen = self._clock()
        for number in [n for n in pc.batches if n <= ack]:
            del pc.batches[number]
        if ack + 1 in pc.batches:  # sent before, its answer lost: the same batch again
            frames, close = pc.batches[ack + 1]
            return 200, self._answer(ack + 1, frames, close)
        if ack != pc.cursor:
            return 400, {"error": f"ack {ack} is not a batch of this connection"}
        pc.supersede()
        if not await pc.wait(self._config.poll_timeout):
            pc.last_seen = self._clock()
            return 200, {"cursor": ack, "frames": []}
        await asyncio.sleep(0)  # what the server writes in this loop pass joins the batch
        if pc.cursor != ack or pc.finished:  # a newer poll took it meanwhile
            return 200, {"cursor": ack, "frames": []}
        pc.last_seen = self._clock()
        cursor, frames, close = pc.next_batch()
        if close is not None:
            await self._finish(pc, None)
        return 200, self._answer(cursor, frames, close)

    async def _post(self, sid: str, body: bytes) -> Reply:
        pc = self.connections.get(sid)
        if pc is None or pc.finished:
            return UNKNOWN
        pc.last_seen = self._clock()
        frames = self._frames(body)
        if isinstance(frames, tuple):
            return frames
        async with pc.posting:
            await self._feed(pc, frames)
        return 200, {"ok": True}

    async def _goodbye(self, sid: str) -> Reply:
        pc = self.connections.get(sid)
        if pc is None or pc.finished:
            return UNKNOWN
        await self._finish(pc, p.CloseCode.NORMAL)
        return 200, {"ok": True}

    async def close_all(self) -> None:
        await self.nodes.unserve()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for pc in list(self.connections.values()):
            await self._finish(pc, None)

    # ------------------------------------------------------------------

    def _frames(self, body: bytes) -> list[Any] | Reply:
        """The body's frames, or the error answer (nothing of it is taken then)."""
        if len(body) > self._config.max_frame_bytes:
            return 413, {"error": f"body over max_frame_bytes ({self._config.max_frame_bytes})"}
        try:
            frames = json.loads(body)
        except (ValueError, RecursionError):  # nested past Python's limit: not JSON to us
            return 400, {"error": "the body is not JSON"}
        if not isinstance(frames, list) or not all(isinstance(f, dict) for f in frames):
            return 400, {"error": "the body must be a JSON array of frames (objects)"}
        if len(frames) > self._config.poll_max_frames:
            return 413, {"error": f"more than poll_max_frames ({self._config.poll_max_frames})"}
        return frames

    async def _feed(self, pc: PollConnection, frames: list[Any]) -> None:
        for frame in frames:
            if pc.finished:
                return
            await self._endpoint.received(pc.conn, json.dumps(frame, separators=(",", ":")))

    @staticmethod
    def _answer(cursor: int, frames: list[str], close: dict[str, Any] | None) -> bytes:
        """The poll answer, around the frames' encoded text (each frame is JSON already)."""
        tail = "" if close is None else f',"close":{json.dumps(close)}'
        return f'{{"cursor":{cursor},"frames":[{",".join(frames)}]{tail}}}'.encode()

    async def _finish(self, pc: PollConnection, peer_code: int | None) -> None:
        """The connection is over: the server is told once, and the sid is forgotten."""
        if pc.finished and pc.sid not in self.connections:
            return
        pc.abort()
        self.connections.pop(pc.sid, None)
        await self._endpoint.closed(pc.conn, peer_code)

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="rtchat-poll-sweeper")

    async def _sweep(self) -> None:
        """Drop connections silent for ``poll_idle_timeout`` (no goodbye: resumable)."""
        idle = self._config.poll_idle_timeout
        while self.connections:
            await asyncio.sleep(min(idle / 4, 5.0))
            now = self._clock()
            for pc in list(self.connections.values()):
                if not pc.holding and now - pc.last_seen > idle:
                    await self._finish(pc, None)

"""Test helpers: build server frames and drive a ClientSession by hand; collect
what a real Client handles, and prove nothing extra came."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

from rtchat_sdk import Client
from rtchat_sdk import protocol as p
from rtchat_sdk.core import ClientSession, SessionEvent
from server_ref import Server


def welcome(
    *,
    session: str = "s1",
    token: str = "tok",
    resumed: bool = False,
    interval: float = 20.0,
    timeout: float = 10.0,
    max_in_flight: int = 1000,
) -> str:
    return p.encode(
        p.WelcomeFrame(
            protocol=1,
            session=session,
            token=token,
            resumed=resumed,
            heartbeat=p.HeartbeatInfo(interval=interval, timeout=timeout),
            limits=p.Limits(
                max_frame_bytes=1 << 20,
                max_in_flight=max_in_flight,
                history_size=1000,
                history_seconds=300,
                session_ttl=300,
            ),
            inbox=p.StreamPosition(stream=f"inbox:{session}", epoch="e0", offset=0),
        )
    )


def reply(message_id: int, data: Any = None) -> str:
    return p.encode(p.ReplyFrame(id=message_id, data=data))


def message(stream: str, offset: int, data: Any = None, *, epoch: str = "e1") -> str:
    return p.encode(
        p.MessageFrame(stream=stream, epoch=epoch, offset=offset, room="r", event="ev", data=data)
    )


def frames(session: ClientSession) -> list[dict[str, Any]]:
    """What the session wants written, parsed."""
    return [json.loads(text) for text in session.data_to_send()]


def events(session: ClientSession) -> list[SessionEvent]:
    return session.events_received()


def open_session(session: ClientSession, now: float = 0.0, **kw: Any) -> None:
    """Connect, answer the hello with a welcome, and clear the outputs."""
    session.connection_made(now)
    session.receive_text(welcome(**kw), now)
    session.data_to_send()
    session.events_received()


SENTINEL = "--sentinel--"
"""Published by ``Inbox.settle`` after everything else; tests never send it."""


class Inbox:
    """Collects a client's deliveries of one event; a test waits for a count or settles."""

    def __init__(self, client: Client, event: str = "m") -> None:
        self.event = event
        self.items: list[Any] = []
        self._changed = asyncio.Event()
        client.on(event)(self._add)

    def _add(self, data: Any) -> None:
        self.items.append(data)
        self._changed.set()

    async def _until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    async def wait_for(self, count: int) -> list[Any]:
        """Wait until at least ``count`` items came (more may follow: see ``settle``)."""
        await self._until(lambda: len(self.items) >= count)
        return self.items

    async def settle(self, server: Server, room: str = "r") -> list[Any]:
        """Everything handled before a sentinel that ``server`` publishes to ``room`` now.

        A room's stream is delivered in order, so once the sentinel is handled
        everything the stream held before it has been handled too, duplicates
        included, which ``wait_for`` (it returns at a count) cannot see.
        Asserts that the sentinel came once; call it when the client is
        connected, after everything the test published.
        """
        await server.publish(room, self.event, SENTINEL)
        await self._until(lambda: SENTINEL in self.items)
        before = self.items.index(SENTINEL)
        assert self.items[before:] == [SENTINEL], self.items[before:]
        return self.items[:before]


async def http_get(url: str, path: str) -> tuple[int, dict[str, Any]]:
    """A plain HTTP GET to the server at ``url`` (ws://host:port): status, JSON body."""
    host, port = url.removeprefix("ws://").rstrip("/").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)  # the server closes after answering
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server that must keep it across restarts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

"""A small HTTP CONNECT proxy for tests, on 127.0.0.1: records what it was asked.

Only what a WebSocket client needs: read ``CONNECT host:port HTTP/1.1`` and
its headers, dial the target (loopback only), answer ``200``, then copy
bytes both ways. ``refuse=True`` answers ``403`` instead. Every task it
starts is tracked and stopped by ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["ConnectProxy"]


class ConnectProxy:
    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.requests: list[str] = []
        """The request target of each CONNECT, e.g. ``127.0.0.1:8765``."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _track(self, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._track(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            self.requests.append(target)
            host, _, port = target.rpartition(":")
            if method != "CONNECT" or self.refuse or host not in ("127.0.0.1", "localhost"):
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            self._track(up_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(self._copy(reader, up_writer), self._copy(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

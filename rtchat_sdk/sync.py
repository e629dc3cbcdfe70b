"""A blocking client for scripts that are not async.

``SyncClient`` runs an ordinary ``Client`` on an event loop in a background
thread and waits for each call's result, so the guarantees are the same::

    with SyncClient("ws://127.0.0.1:8765") as client:
        client.join("lobby")
        client.publish("lobby", "chat.message", {"text": "hi"})
        print(client.request("echo", {"n": 1}))

Handlers registered with ``on`` run in that background thread, one after
another, so they must not block for long and must not call the blocking
methods of the same client (that would wait on the thread they run in).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, overload

from pydantic import BaseModel

from .client import Client, ConnectionState, NamespaceClient
from .errors import ClientClosed
from .events import Event

__all__ = ["SyncClient", "SyncNamespace"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
H = TypeVar("H", bound=Callable[..., Any])


class _LoopThread:
    """An event loop running in a daemon thread until stopped."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="rtchat-sync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking call from a handler would deadlock; use the Client")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncNamespace:
    """The blocking API bound to one namespace."""

    def __init__(self, runner: _LoopThread, target: NamespaceClient) -> None:
        self._runner = runner
        self._target = target

    def join(self, room: str) -> None:
        self._runner.call(self._target.join(room))

    def leave(self, room: str) -> None:
        self._runner.call(self._target.leave(room))

    def publish(
        self, room: str, event: str | Event, data: Any = None, *, echo: bool = False
    ) -> int:
        return self._runner.call(self._target.publish(room, event, data, echo=echo))

    def emit(self, event: str | Event, data: Any = None) -> None:
        self._runner.call(self._target.emit(event, data))

    @overload
    def request(
        self,
        event: str | Event,
        data: Any = None,
        *,
        response: type[M],
        timeout: float | None = None,
    ) -> M: ...

    @overload
    def request(
        self,
        event: str | Event,
        data: Any = None,
        *,
        response: None = None,
        timeout: float | None = None,
    ) -> Any: ...

    def request(
        self,
        event: str | Event,
        data: Any = None,
        *,
        response: type[M] | None = None,
        timeout: float | None = None,
    ) -> Any:
        return self._runner.call(
            self._target.request(event, data, response=response, timeout=timeout)
        )

    def on(self, event: str | type[Event]) -> Callable[[H], H]:
        """Register a handler; it runs in the client's background thread."""
        return self._target.on(event)


class SyncClient(SyncNamespace):
    """A blocking ``Client``: same arguments, same guarantees, no ``await``."""

    def __init__(self, url: str | list[str], **options: Any) -> None:
        self._runner = _LoopThread()
        self._client = self._runner.call(_make_client(url, options))
        super().__init__(self._runner, self._client)
        self._closed = False

    @property
    def client(self) -> Client:
        """The underlying async client (its loop runs in another thread)."""
        return self._client

    @property
    def state(self) -> ConnectionState:
        return self._client.state

    @property
    def session_id(self) -> str | None:
        return self._client.session_id

    @property
    def counters(self) -> dict[str, int]:
        return self._client.counters

    def connect(self) -> None:
        if self._closed:
            raise ClientClosed("this client was closed; make a new one")
        self._runner.call(self._client.connect())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.call(self._client.close())
        finally:
            self._runner.stop()

    def namespace(self, path: str) -> SyncNamespace:
        return SyncNamespace(self._runner, self._client.namespace(path))

    def __enter__(self) -> SyncClient:
        try:
            self.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _make_client(url: str | list[str], options: dict[str, Any]) -> Client:
    """Build the Client inside the loop thread, where its primitives belong."""
    return Client(url, **options)

"""A blocking client for scripts that are not async.

``SyncClient`` runs an ordinary ``Client`` on an event loop in a background
thread and waits for each call's result, so the guarantees are the same::

    with SyncClient("ws://127.0.0.1:8765") as client:
        client.join("lobby")
        client.publish("lobby", "chat.message", {"text": "hi"})
        print(client.request("echo", {"n": 1}))

The blocking API follows the async one by construction: each method is made
from the ``Client`` method of the same name by ``_blocking`` (async: run it on
the loop and wait) or ``_same`` (not async: call it as it is), which keep its
parameters and docstring; ``tests/test_sync_client.py`` checks that every
public member of ``Client`` has its twin here, with the same parameters.

Handlers and callbacks registered with ``on``, ``on_error``, ``on_gap``,
``on_state_change`` and ``on_attempt`` run in that background thread, one
after another, so they must not block for long and must not call the blocking
methods of the same client (that would wait on the thread they run in).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar, overload

from pydantic import BaseModel

from .aio import Client, ConnectionState, NamespaceClient
from .errors import ClientClosed
from .events import Event

__all__ = ["SyncClient", "SyncNamespace"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T", bound=BaseModel)


class _LoopThread:
    """An event loop running in a daemon thread until stopped."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="rtchat-sync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, R]) -> R:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking call from a handler would deadlock; use the Client")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _blocking(
    method: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncNamespace, P], R]:
    """The blocking twin of an async method: run it on the loop, wait for its result."""
    name = method.__name__

    def call(self: SyncNamespace, /, *args: P.args, **kwargs: P.kwargs) -> R:
        coro: Coroutine[Any, Any, R] = getattr(self._target, name)(*args, **kwargs)
        return self._runner.call(coro)

    functools.update_wrapper(call, method)
    return call


def _same(method: Callable[Concatenate[Any, P], R]) -> Callable[Concatenate[SyncNamespace, P], R]:
    """A method that does not wait (registering a callback): called as it is."""
    name = method.__name__

    def call(self: SyncNamespace, /, *args: P.args, **kwargs: P.kwargs) -> R:
        result: R = getattr(self._target, name)(*args, **kwargs)
        return result

    functools.update_wrapper(call, method)
    return call


class SyncNamespace:
    """The blocking API bound to one namespace."""

    def __init__(self, runner: _LoopThread, target: NamespaceClient) -> None:
        self._runner = runner
        self._target = target

    @property
    def path(self) -> str:
        return self._target.path

    join = _blocking(NamespaceClient.join)
    leave = _blocking(NamespaceClient.leave)
    presence = _blocking(NamespaceClient.presence)
    presence_stats = _blocking(NamespaceClient.presence_stats)
    history = _blocking(NamespaceClient.history)
    on_join = _same(NamespaceClient.on_join)
    on_leave = _same(NamespaceClient.on_leave)
    publish = _blocking(NamespaceClient.publish)
    emit = _blocking(NamespaceClient.emit)
    on = _same(NamespaceClient.on)
    off = _same(NamespaceClient.off)

    # ``request`` is overloaded (the reply's type follows ``response``), which a
    # generated twin cannot carry; it is written out, and checked like the rest.
    @overload
    def request(
        self,
        event: str | Event,
        data: Any = None,
        *,
        response: type[T],
        timeout: float | None = None,
    ) -> T: ...

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
        response: type[T] | None = None,
        timeout: float | None = None,
    ) -> Any:
        return self._runner.call(
            self._target.request(event, data, response=response, timeout=timeout)
        )

    request.__doc__ = NamespaceClient.request.__doc__


class SyncClient(SyncNamespace):
    """A blocking ``Client``: same arguments, same methods, same guarantees, no ``await``."""

    def __init__(self, url: str | list[str], **options: Any) -> None:
        runner = _LoopThread()
        try:
            client = runner.call(_make_client(url, options))
        except BaseException:
            runner.stop()
            raise
        super().__init__(runner, client)
        self._client = client
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
    def transport(self) -> str | None:
        return self._client.transport

    @property
    def rtt(self) -> float | None:
        return self._client.rtt

    @property
    def outbox_size(self) -> int:
        return self._client.outbox_size

    @property
    def counters(self) -> dict[str, int]:
        return self._client.counters

    ping = _blocking(Client.ping)
    flush = _blocking(Client.flush)
    on_error = _same(Client.on_error)
    on_gap = _same(Client.on_gap)
    on_state_change = _same(Client.on_state_change)
    on_attempt = _same(Client.on_attempt)

    def connect(self) -> None:
        """Connect and wait for the server's welcome (or raise why not)."""
        if self._closed:
            raise ClientClosed("this client was closed; make a new one")
        self._runner.call(self._client.connect())

    def close(self) -> None:
        """Close for good, then stop the background loop and its thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.call(self._client.close())
        finally:
            self._runner.stop()

    def namespace(self, path: str) -> SyncNamespace:
        """The same API on another namespace, over the same connection."""
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

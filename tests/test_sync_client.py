"""The blocking wrapper, used from a plain thread as a script would."""

from __future__ import annotations

import asyncio
import inspect
import queue
from typing import Any

import pytest

from rtchat_sdk import Client, ClientClosed, ConnectionState, NamespaceClient, UnknownEvent
from rtchat_sdk.sync import SyncClient, SyncNamespace
from server_ref import Server

pytestmark = pytest.mark.timeout(20)


def script(url: str) -> dict[str, Any]:
    """What a non-async user writes."""
    got: queue.Queue[Any] = queue.Queue()
    with SyncClient(url) as alice, SyncClient(url) as bob:
        bob.on("chat")(got.put)
        alice.join("lobby")
        bob.join("lobby")
        offset = alice.publish("lobby", "chat", {"text": "hi"})
        reply = alice.request("echo", {"n": 1})
        try:
            alice.request("missing")
        except UnknownEvent as exc:
            error = exc.code
        state = alice.state
    return {
        "offset": offset,
        "reply": reply,
        "error": error,
        "delivered": got.get(timeout=5),
        "state": state,
        "after": alice.state,
    }


async def test_blocking_client_from_a_thread(server: Server) -> None:
    result = await asyncio.to_thread(script, server.url)
    assert result == {
        "offset": 1,
        "reply": {"n": 1},
        "error": "unknown_event",
        "delivered": {"text": "hi"},
        "state": ConnectionState.CONNECTED,
        "after": ConnectionState.CLOSED,
    }


async def test_closed_sync_client_refuses_calls(server: Server) -> None:
    def run() -> None:
        client = SyncClient(server.url)
        client.connect()
        client.close()
        with pytest.raises(ClientClosed):
            client.connect()

    await asyncio.to_thread(run)


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


@pytest.mark.parametrize(
    ("async_cls", "sync_cls", "extra"),
    [(Client, SyncClient, {"client", "path"}), (NamespaceClient, SyncNamespace, {"path"})],
)
def test_the_blocking_api_has_every_member_of_the_async_one(
    async_cls: type, sync_cls: type, extra: set[str]
) -> None:
    """``extra``: ``path`` is an attribute of each async namespace object, a
    property here; ``client`` gives the async client behind a SyncClient."""
    assert _public(sync_cls) == _public(async_cls) | extra


@pytest.mark.parametrize(
    ("async_cls", "sync_cls"), [(Client, SyncClient), (NamespaceClient, SyncNamespace)]
)
def test_each_blocking_member_takes_what_the_async_one_takes(
    async_cls: type, sync_cls: type
) -> None:
    for name in sorted(_public(async_cls)):
        theirs, ours = (
            inspect.getattr_static(async_cls, name),
            inspect.getattr_static(sync_cls, name),
        )
        if isinstance(theirs, property):
            assert isinstance(ours, property), name
            their_type = inspect.signature(theirs.fget).return_annotation  # type: ignore[arg-type]
            our_type = inspect.signature(ours.fget).return_annotation  # type: ignore[arg-type]
            assert our_type == their_type, name
            continue
        their_sig, our_sig = inspect.signature(theirs), inspect.signature(ours)
        assert list(our_sig.parameters.values())[1:] == list(their_sig.parameters.values())[1:], (
            name
        )
        if not inspect.iscoroutinefunction(theirs) and name != "namespace":
            assert our_sig.return_annotation == their_sig.return_annotation, name
        assert bool(ours.__doc__) >= bool(theirs.__doc__), name  # documented too


async def test_the_blocking_api_covers_what_was_missing(server: Server) -> None:
    """rtt, ping, flush, off, the callbacks, outbox_size, expires_in: all there."""
    await asyncio.to_thread(_use_what_was_missing, server.url)


def _use_what_was_missing(url: str) -> None:
    with SyncClient(url) as client:
        gaps: list[object] = []
        states: list[ConnectionState] = []
        errors: list[Exception] = []
        attempts: list[tuple[int, str]] = []
        client.on_gap(gaps.append)
        client.on_state_change(states.append)
        client.on_error(errors.append)
        client.on_attempt(lambda attempt, url: attempts.append((attempt, url)))
        rtt = client.ping()
        assert rtt >= 0.0
        assert client.rtt == rtt
        client.join("r")
        assert client.publish("r", "chat", {"n": 1}, expires_in=5.0) == 1
        client.emit("echo", {"n": 2}, expires_in=5.0)
        client.flush(timeout=5.0)
        assert client.outbox_size == 0

        def handler(data: object) -> None:
            pass

        client.on("chat")(handler)
        client.off("chat", handler)
        room = client.namespace("/")
        assert room.path == "/"
        assert room.publish("r", "chat", {"n": 3}, expires_in=5.0) == 2
    assert states[-1] is ConnectionState.CLOSED
    assert gaps == []
    assert errors == []
    assert attempts == []  # registered after the first attempt

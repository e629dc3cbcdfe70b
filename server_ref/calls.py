"""Carrying out the calls the hub asks for: the one place a call becomes app or broker code.

The server's driver (``server.py``) and the tests' network (``tests/hubnet.py``)
both use these, so a handler, a check or a broker method runs the same way
under either.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import CoroutineType
from typing import Any

from .app import Context, Host, Namespace
from .broker import Broker, EntryListener
from .broker.base import LATER
from .core.commands import Authorize, BrokerCall, Call, Handle, Identity

__all__ = ["WITH_LISTENER", "Authenticator", "handle_now", "run_call"]

Authenticator = Callable[
    [dict[str, Any] | None], "str | Identity | Awaitable[str | Identity | None] | None"
]
"""Gets ``hello.auth`` (with ``token`` from an ``Authorization: Bearer`` header when
the hello has none); returns the user, an ``Identity`` (user, claims, expiry), or None
to refuse; or raises ``CredentialsRefused`` to refuse with a reason (``auth.py``)."""

WITH_LISTENER = frozenset({"subscribe", "unsubscribe"})
"""Broker methods that take the node's entry listener as their last argument."""


async def run_call(
    call: Call,
    *,
    broker: Broker,
    namespaces: dict[str, Namespace],
    host: Host,
    authenticate: Authenticator | None,
    listener: EntryListener,
) -> Any:
    """Carry out one call the hub asked for; its result (or its exception)."""
    if isinstance(call, BrokerCall):
        method = getattr(broker, call.method)
        if call.method in WITH_LISTENER:
            return await method(*call.args, listener)
        return await method(*call.args)
    if isinstance(call, Handle):
        if call.started is not None:  # begun by handle_now
            return await call.started
        ctx = Context(host, call.session_id, call.user, call.ns, call.claims)
        return await namespaces[call.ns].call(ctx, call.event, call.data)
    if isinstance(call, Authorize):
        ctx = Context(host, call.session_id, call.user, call.ns, call.claims)
        return await namespaces[call.ns].authorize(call.action, ctx, call.room, call.event)
    assert authenticate is not None  # the hub asks only when there is an authenticator
    result = authenticate(call.auth)
    if isinstance(result, Awaitable):
        result = await result
    return result


def handle_now(namespaces: dict[str, Namespace], host: Host, call: Handle) -> Any:
    """The hub's ``handle_now``: a handler's reply at once when it needs no awaiting.

    Safe to run inside the hub's step: what a handler can reach of the server
    (``Context``, ``Server``) that changes hub state is a coroutine, so it runs
    after the step. An ``async def`` handler's call is begun (its coroutine made,
    not run) and left in ``call.started`` for ``run_call``; the answer is ``LATER``.
    """
    ctx = Context(host, call.session_id, call.user, call.ns, call.claims)
    result = namespaces[call.ns].call_nowait(ctx, call.event, call.data)
    if type(result) is CoroutineType:
        call.started = result
        return LATER
    return result

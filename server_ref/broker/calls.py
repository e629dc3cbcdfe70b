"""Calls between nodes, the part every broker shares: the ``max_calls`` bound each
way, how a handler's outcome becomes an answer, and the tasks that answer.

A broker carries a call its own way (the memory broker: a task in this
process; Redis: pub/sub) and uses ``Calls`` for the rest, so both behave the
same at the limit: past ``max_calls`` calls made and awaited, ``making``
raises ``CallsBusy`` at once; past ``max_calls`` being answered, a call is
answered ``busy`` without running its handler, and its caller raises
``CallsBusy`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Iterator
from typing import Any

from .base import CallFailed, CallHandler, CallsBusy

__all__ = ["Calls"]

log = logging.getLogger("server_ref")

OK, BUSY, ERROR = "ok", "busy", "error"
"""The kinds of answer: the handler's, the callee's limit, the handler raised."""


class Calls:
    """One broker's calls in flight: counted, bounded, their answering tasks owned."""

    def __init__(self, max_calls: int) -> None:
        if max_calls < 1:
            raise ValueError("max_calls must be positive")
        self.max_calls = max_calls
        self.made = 0
        """Calls this broker made and awaits."""
        self.answering = 0
        """Calls this broker's handlers are answering."""
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def making(self) -> Iterator[None]:
        """Count one call made for the ``with`` block; ``CallsBusy`` at the limit."""
        if self.made >= self.max_calls:
            raise CallsBusy(f"{self.max_calls} calls in flight from this node (max_calls)")
        self.made += 1
        try:
            yield
        finally:
            self.made -= 1

    async def answer(self, handler: CallHandler, payload: str) -> tuple[str, str]:
        """The (kind, text) answer to one call: the handler's, or ``busy`` at the limit."""
        if self.answering >= self.max_calls:
            return BUSY, ""
        self.answering += 1
        try:
            return OK, await handler(payload)
        except Exception as exc:
            log.exception("a node call's handler raised")
            return ERROR, repr(exc)
        finally:
            self.answering -= 1

    @staticmethod
    def outcome(node: str, kind: str, text: str) -> str:
        """What the caller gets for an answer: its text, or the error it stands for."""
        if kind == OK:
            return text
        if kind == BUSY:
            raise CallsBusy(f"node {node} is answering max_calls calls already")
        raise CallFailed(f"node {node} could not answer: {text}")

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` (answering a call) in a task ``close`` stops."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Stop the calls being answered."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

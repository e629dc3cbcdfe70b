"""Calls between nodes over Redis pub/sub: a request on the callee's channel, its
answer on the caller's, matched by a call id.

* A node serves its calls on ``<prefix>:call:<node>``. A caller publishes
  ``<its answers channel>\\n<call id>\\n<payload>`` there; PUBLISH counts the
  subscribers that got it, so none means no node serves that address (its
  process is gone and Redis closed its connection): ``NodeGone`` at once, not
  after a timeout.
* The answer, ``<call id>\\n<kind>\\n<text>`` (``calls``: ok, busy, error),
  comes on the caller's answers channel, one per broker (random), which
  every node subscribes at start.
* Pub/sub keeps nothing: a request or an answer published while a relay is
  reconnecting is lost, and the caller gets ``CallTimeout``. What goes this
  way must be safe to ask again (the polling requests are: a batch is resent
  until acknowledged, frames are deduped by id).

Both channels ride the relay's one pub/sub connection (``Relay.listen``), so
its probes vouch for them as for the streams.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .base import CallHandler, CallTimeout, NodeGone
from .calls import Calls
from .redis_relay import Relay

__all__ = ["NodeCalls"]

log = logging.getLogger("server_ref.redis")


class NodeCalls:
    """One broker's calls to other nodes, and the nodes it answers for."""

    def __init__(self, redis: Redis, relay: Relay, prefix: str, calls: Calls) -> None:
        self._redis = redis
        self._relay = relay
        self._prefix = prefix
        self._calls = calls
        self._answers = f"{prefix}:answer:{secrets.token_hex(8)}"
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[tuple[str, str]]] = {}

    def _channel(self, node: str) -> str:
        return f"{self._prefix}:call:{node}"

    async def start(self) -> None:
        """Subscribe this broker's answers channel (calls can be made once it returns)."""
        await self._relay.listen(self._answers, self._answered)

    async def close(self) -> None:
        for answer in self._waiting.values():
            answer.cancel()
        await self._calls.close()

    # ------------------------------------------------------------------
    # Calling

    async def call(self, node: str, payload: str, timeout: float) -> str:
        with self._calls.making():
            call_id = str(next(self._ids))
            answer = self._waiting[call_id] = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    request = f"{self._answers}\n{call_id}\n{payload}"
                    if not await self._redis.publish(self._channel(node), request):
                        raise NodeGone(f"no node serves {node!r}")
                    kind, text = await answer
            except TimeoutError as exc:
                raise CallTimeout(f"no answer from node {node!r} within {timeout}s") from exc
            finally:
                self._waiting.pop(call_id, None)
        return Calls.outcome(node, kind, text)

    def _answered(self, data: str) -> None:
        call_id, kind, text = data.split("\n", 2)
        answer = self._waiting.get(call_id)
        if answer is not None and not answer.done():  # else: its caller gave up
            answer.set_result((kind, text))

    # ------------------------------------------------------------------
    # Answering

    async def serve(self, node: str, handler: CallHandler) -> None:
        await self._relay.listen(self._channel(node), lambda data: self._requested(handler, data))

    async def unserve(self, node: str) -> None:
        await self._relay.unlisten(self._channel(node))

    def _requested(self, handler: CallHandler, data: str) -> None:
        reply_to, call_id, payload = data.split("\n", 2)
        self._calls.spawn(self._answer(handler, reply_to, call_id, payload))

    async def _answer(
        self, handler: CallHandler, reply_to: str, call_id: str, payload: str
    ) -> None:
        kind, text = await self._calls.answer(handler, payload)
        try:
            await self._redis.publish(reply_to, f"{call_id}\n{kind}\n{text}")
        except (RedisError, OSError) as exc:  # a lost answer: the caller's timeout covers it
            log.debug("could not answer a node call: %r", exc)

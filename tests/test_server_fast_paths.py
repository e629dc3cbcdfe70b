"""The server's hot-path shortcuts behave exactly like the plain code they replace."""

from __future__ import annotations

import pytest

from server_ref.broker import MemoryBroker

pytestmark = pytest.mark.timeout(10)


async def test_dedupe_eviction_keeps_the_newest_replies_across_forgets_and_rewrites() -> None:
    size = 5
    broker = MemoryBroker(dedupe_size=size)
    model: dict[int, str] = {}  # the plain reference: a dict evicting its first key

    async def remember(i: int, reply: str) -> None:
        await broker.remember_reply("s", i, reply)
        model[i] = reply
        if len(model) > size:
            del model[next(iter(model))]

    async def forget(upto: int) -> None:
        await broker.forget_replies("s", upto)
        for i in [i for i in model if i <= upto]:
            del model[i]

    for i in range(1, 8):
        await remember(i, f"r{i}")
    await forget(4)
    await remember(3, "again")  # an id below the highest, written again
    await remember(7, "rewritten")  # an id already held keeps its place
    for i in range(8, 14):
        await remember(i, f"r{i}")
        await forget(i - 3 if i % 4 == 0 else 0)
    for i in range(1, 15):
        processed, reply = await broker.recall_reply("s", i)
        assert processed == (i <= 13)
        assert reply == model.get(i)

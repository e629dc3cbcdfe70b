"""The Broker contract, on the in-memory broker with a fake clock."""

from __future__ import annotations

import pytest

from server_ref.broker import MemoryBroker, SessionRecord, StreamEntry

pytestmark = pytest.mark.timeout(10)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def text(epoch: str, offset: int) -> str:
    return f"{epoch}:{offset}"


async def fill(broker: MemoryBroker, stream: str, count: int) -> list[StreamEntry]:
    return [await broker.append(stream, text, sender="s") for _ in range(count)]


async def test_append_numbers_entries_and_builds_their_frame_once() -> None:
    broker = MemoryBroker()
    built: list[tuple[str, int]] = []

    def build(epoch: str, offset: int) -> str:
        built.append((epoch, offset))
        return f"frame-{offset}"

    first = await broker.append("a", build, sender="x", echo=True)
    second = await broker.append("a", build, sender=None)
    other = await broker.append("b", build, sender=None)
    assert (first.offset, second.offset, other.offset) == (1, 2, 1)
    assert first.epoch == second.epoch != other.epoch
    assert (first.text, first.sender, first.echo) == ("frame-1", "x", True)
    assert built == [(first.epoch, 1), (first.epoch, 2), (other.epoch, 1)]
    assert await broker.position("a") == (first.epoch, 2)


async def test_listeners_get_each_entry_in_order_until_unsubscribed() -> None:
    broker = MemoryBroker()
    seen: list[int] = []

    def listener(entry: StreamEntry) -> None:
        seen.append(entry.offset)

    broker.subscribe("a", listener)
    await fill(broker, "a", 3)
    broker.unsubscribe("a", listener)
    await fill(broker, "a", 1)
    assert seen == [1, 2, 3]


async def test_read_since_returns_what_follows_a_position() -> None:
    broker = MemoryBroker()
    entries = await fill(broker, "a", 5)
    epoch = entries[0].epoch
    replay = await broker.read_since("a", epoch, 2)
    assert [e.offset for e in replay.entries] == [3, 4, 5]
    assert (replay.gap, replay.offset) == (None, 5)
    assert (await broker.read_since("a", epoch, 5)).entries == []


async def test_history_bounded_by_count_reports_trimmed() -> None:
    broker = MemoryBroker(history_size=3)
    entries = await fill(broker, "a", 10)
    replay = await broker.read_since("a", entries[0].epoch, 2)
    assert replay.gap == "trimmed"
    assert replay.gap_offset == 7
    assert [e.offset for e in replay.entries] == [8, 9, 10]


async def test_history_bounded_by_age_reports_trimmed() -> None:
    clock = FakeClock()
    broker = MemoryBroker(history_seconds=60, clock=clock)
    old = await fill(broker, "a", 2)
    clock.now += 61
    await fill(broker, "a", 1)
    replay = await broker.read_since("a", old[0].epoch, 0)
    assert (replay.gap, replay.gap_offset) == ("trimmed", 2)
    assert [e.offset for e in replay.entries] == [3]


async def test_unknown_epoch_replays_the_whole_current_epoch_after_a_gap() -> None:
    broker = MemoryBroker()
    await fill(broker, "a", 2)
    replay = await broker.read_since("a", "from-a-previous-life", 40)
    assert (replay.gap, replay.gap_offset) == ("epoch_changed", 0)
    assert [e.offset for e in replay.entries] == [1, 2]


async def test_sessions_expire_at_their_ttl_and_not_while_attached() -> None:
    clock = FakeClock()
    broker = MemoryBroker(clock=clock)
    record = SessionRecord("id1", "token1", "ann")
    await broker.save_session(record, None)
    clock.now += 10_000
    assert await broker.load_session("token1") is record
    await broker.save_session(record, 30)
    clock.now += 29.9
    assert await broker.load_session("token1") is record
    clock.now += 0.1
    assert await broker.load_session("token1") is None
    assert await broker.load_session("unknown") is None


async def test_dedupe_records_replies_and_evicts_the_oldest() -> None:
    broker = MemoryBroker(dedupe_size=2)
    assert await broker.recall_reply("s", 1) == (False, None)
    for i in (1, 2, 3):
        await broker.remember_reply("s", i, f"reply{i}")
    assert await broker.recall_reply("s", 3) == (True, "reply3")
    assert await broker.recall_reply("s", 1) == (True, None)  # processed, reply evicted
    assert await broker.recall_reply("s", 4) == (False, None)
    await broker.forget_replies("s", 2)
    assert await broker.recall_reply("s", 2) == (True, None)
    assert await broker.recall_reply("other", 1) == (False, None)


async def test_deleting_a_session_drops_its_dedupe_records() -> None:
    broker = MemoryBroker()
    record = SessionRecord("id1", "token1", None)
    await broker.save_session(record, None)
    await broker.remember_reply("id1", 1, "r")
    await broker.delete_session(record)
    assert await broker.load_session("token1") is None
    assert await broker.recall_reply("id1", 1) == (False, None)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        MemoryBroker(history_size=0)

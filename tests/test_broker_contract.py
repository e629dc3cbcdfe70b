"""The Broker contract, run on every implementation (memory and Redis) with a fake clock.

Each test takes ``make``: it builds and starts a broker of the implementation
under test with the given limits and clock. A new broker adds itself to
``IMPLEMENTATIONS``. Listeners may be called after ``append`` returns (Redis
pub/sub), so the tests wait for what they expect, with a timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from rtchat_sdk import protocol as p
from server_ref.broker import (
    Broker,
    CallFailed,
    CallsBusy,
    CallTimeout,
    Draft,
    MemoryBroker,
    NodeGone,
    SessionRecord,
    StreamEntry,
)
from server_ref.broker.base import Page
from server_ref.broker.redis import RedisBroker
from server_ref.errors import BrokerUnavailable, FrameTooLarge
from tests.helpers import free_port
from tests.redis_support import Collected, OwnRedis, cleanup, new_prefix, require_redis
from tests.test_pages import model_page

pytestmark = pytest.mark.timeout(20)

Make = Callable[..., Awaitable[Broker]]
IMPLEMENTATIONS = ("memory", "redis")


@pytest.fixture(params=IMPLEMENTATIONS)
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """``await make(clock=..., **limits)``: a started broker; all are closed after the test."""
    made: list[Broker] = []
    url = await require_redis() if request.param == "redis" else ""
    prefix = new_prefix()

    async def factory(*, clock: Any = None, **limits: Any) -> Broker:
        broker: Broker
        if request.param == "memory":
            broker = MemoryBroker(clock=clock, **limits)
        else:
            broker = RedisBroker(url, prefix=prefix, clock=clock, **limits)
        await broker.start()
        made.append(broker)
        return broker

    try:
        yield factory
    finally:
        for broker in made:
            await broker.close()
        if url:
            await cleanup(url, prefix)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def draft(stream: str, data: Any = None, *, sender: str | None = "s", echo: bool = False) -> Draft:
    return Draft.message(
        stream,
        ns="/",
        room="r",
        event="e",
        data=data,
        sender=sender,
        echo=echo,
        max_bytes=1 << 20,
    )


async def fill(broker: Broker, stream: str, count: int) -> list[StreamEntry]:
    return [await broker.append(stream, draft(stream)) for _ in range(count)]


def model_text(entry: StreamEntry, data: Any, sender: str | None) -> str:
    return p.encode(
        p.MessageFrame(
            stream=entry.stream,
            epoch=entry.epoch,
            offset=entry.offset,
            ns="/",
            room="r",
            event="e",
            data=data,
            sender=sender,
        )
    )


async def test_append_numbers_entries_and_renders_their_frame_as_the_model_does(
    make: Make,
) -> None:
    broker = await make()
    first = await broker.append("a", draft("a", {"x": "é"}, sender="x", echo=True))
    second = await broker.append("a", draft("a", [1, 2], sender=None))
    other = await broker.append("b", draft("b", sender=None))
    assert (first.offset, second.offset, other.offset) == (1, 2, 1)
    assert first.epoch == second.epoch != other.epoch
    assert (first.sender, first.echo) == ("x", True)
    assert first.text == model_text(first, {"x": "é"}, "x")
    assert second.text == model_text(second, [1, 2], None)
    assert await broker.position("a") == (first.epoch, 2)


async def test_append_is_idempotent_by_key(make: Make) -> None:
    broker = await make()
    first = await broker.append("a", draft("a", 1), key="s:1")
    again = await broker.append("a", draft("a", 1), key="s:1")
    second = await broker.append("a", draft("a", 2), key="s:2")
    assert again == first
    assert (first.offset, second.offset) == (1, 2)
    assert [e.offset for e in (await broker.read_since("a", first.epoch, 0)).entries] == [1, 2]


async def test_append_over_the_size_limit_numbers_nothing(make: Make) -> None:
    broker = await make()
    big = Draft.message(
        "a", ns="/", room="r", event="e", data="x" * 200, sender=None, echo=False, max_bytes=200
    )
    with pytest.raises(FrameTooLarge):
        await broker.append("a", big)
    assert (await broker.position("a"))[1] == 0
    assert (await broker.append("a", draft("a"))).offset == 1


async def test_the_memory_broker_takes_the_servers_clock_when_started_with_it() -> None:
    clock = FakeClock()
    broker = MemoryBroker(history_seconds=60)
    await broker.start(clock)
    old = await fill(broker, "a", 1)
    clock.now += 61
    replay = await broker.read_since("a", old[0].epoch, 0)
    assert (replay.gap, replay.gap_offset) == ("trimmed", 1)


async def test_replace_reaches_the_owning_node_only(make: Make) -> None:
    broker = await make()
    seen_a: Collected[str] = Collected()
    seen_b: Collected[str] = Collected()
    await broker.watch_replaced("a", seen_a)
    await broker.watch_replaced("b", seen_b)
    await broker.replace("b", "s0")
    await seen_b.until(lambda items: len(items) >= 1)
    await broker.unwatch_replaced("b")
    await broker.replace("b", "s2")
    await broker.replace("a", "s1")
    assert await seen_a.until(lambda items: len(items) >= 1) == ["s1"]
    assert seen_b.items == ["s0"]  # one node's replacements come in order: s2 before s1
    record = SessionRecord("id1", "token1", None, owner="a")
    await broker.save_session(record, None)
    loaded = await broker.load_session("token1")
    assert loaded is not None
    assert loaded.owner == "a"


async def test_listeners_get_each_entry_in_order_until_unsubscribed(make: Make) -> None:
    broker = await make()
    seen: Collected[StreamEntry] = Collected()
    await broker.subscribe("a", seen)
    await fill(broker, "a", 3)
    await seen.until(lambda items: len(items) >= 3)
    await broker.unsubscribe("a", seen)
    await fill(broker, "a", 1)
    other: Collected[StreamEntry] = Collected()
    await broker.subscribe("b", other)  # entries of one stream come in order; so "a"'s 4th
    await fill(broker, "b", 1)  # ... would have come before this, had it been delivered
    await other.until(lambda items: len(items) >= 1)
    assert [e.offset for e in seen.items] == [1, 2, 3]


async def test_read_since_returns_what_follows_a_position(make: Make) -> None:
    broker = await make()
    entries = await fill(broker, "a", 5)
    epoch = entries[0].epoch
    replay = await broker.read_since("a", epoch, 2)
    assert [e.offset for e in replay.entries] == [3, 4, 5]
    assert (replay.gap, replay.offset) == (None, 5)
    assert (await broker.read_since("a", epoch, 5)).entries == []


async def test_history_bounded_by_count_reports_trimmed(make: Make) -> None:
    broker = await make(history_size=3)
    entries = await fill(broker, "a", 10)
    replay = await broker.read_since("a", entries[0].epoch, 2)
    assert replay.gap == "trimmed"
    assert replay.gap_offset == 7
    assert [e.offset for e in replay.entries] == [8, 9, 10]


async def test_history_bounded_by_age_reports_trimmed(make: Make) -> None:
    clock = FakeClock()
    broker = await make(history_seconds=60, clock=clock)
    old = await fill(broker, "a", 2)
    clock.now += 61
    await fill(broker, "a", 1)
    replay = await broker.read_since("a", old[0].epoch, 0)
    assert (replay.gap, replay.gap_offset) == ("trimmed", 2)
    assert [e.offset for e in replay.entries] == [3]


async def test_unknown_epoch_replays_the_whole_current_epoch_after_a_gap(make: Make) -> None:
    broker = await make()
    await fill(broker, "a", 2)
    replay = await broker.read_since("a", "from-a-previous-life", 40)
    assert (replay.gap, replay.gap_offset) == ("epoch_changed", 0)
    assert [e.offset for e in replay.entries] == [1, 2]


async def test_sessions_expire_at_their_ttl_and_not_while_attached(make: Make) -> None:
    clock = FakeClock()
    broker = await make(clock=clock)
    record = SessionRecord("id1", "token1", "ann")
    await broker.save_session(record, None)
    clock.now += 10_000
    assert await broker.load_session("token1") == record
    await broker.save_session(record, 30)
    clock.now += 29.9
    assert await broker.load_session("token1") == record
    clock.now += 0.1
    assert await broker.load_session("token1") is None
    assert await broker.load_session("unknown") is None


async def test_dedupe_records_replies_and_evicts_the_oldest(make: Make) -> None:
    broker = await make(dedupe_size=2)
    assert await broker.recall_reply("s", 1) == (False, None)
    for i in (1, 2, 3):
        await broker.remember_reply("s", i, f"reply{i}")
    assert await broker.recall_reply("s", 3) == (True, "reply3")
    assert await broker.recall_reply("s", 1) == (True, None)  # processed, reply evicted
    assert await broker.recall_reply("s", 4) == (False, None)
    await broker.forget_replies("s", 2)
    assert await broker.recall_reply("s", 2) == (True, None)
    assert await broker.recall_reply("other", 1) == (False, None)


async def test_deleting_a_session_drops_its_dedupe_records(make: Make) -> None:
    broker = await make()
    record = SessionRecord("id1", "token1", None)
    await broker.save_session(record, None)
    await broker.remember_reply("id1", 1, "r")
    await broker.delete_session(record)
    assert await broker.load_session("token1") is None
    assert await broker.recall_reply("id1", 1) == (False, None)


async def test_limits_must_be_positive(make: Make) -> None:
    with pytest.raises(ValueError, match="positive"):
        await make(history_size=0)


async def test_an_id_between_processed_ones_was_not_processed(make: Make) -> None:
    """Message 3 was answered ``unavailable`` (never run) while 1, 2 and 4 were processed."""
    broker = await make(dedupe_size=10)
    for i in (1, 2, 4):
        await broker.remember_reply("s", i, f"reply{i}")
    assert await broker.recall_reply("s", 3) == (False, None)
    assert await broker.recall_reply("s", 4) == (True, "reply4")
    await broker.forget_replies("s", 2)  # the client holds replies up to 2
    assert await broker.recall_reply("s", 1) == (True, None)
    assert await broker.recall_reply("s", 3) == (False, None)


# ----------------------------------------------------------------------
# History (PROTOCOL §7.6)


def page_of(page: Page) -> tuple[list[int], str | None, bool]:
    return [e.offset for e in page.entries], page.gap, page.more


async def read(
    broker: Broker, since: tuple[str, int] | None, limit: int, reverse: bool = False
) -> tuple[list[int], str | None, bool]:
    """Stream "a"'s page: its offsets in reading order, its gap and ``more``."""
    return page_of(await broker.history("a", since, limit, reverse))


async def test_history_pages_forward_and_back_from_since_or_the_ends(make: Make) -> None:
    broker = await make()
    empty = await broker.history("a", None, 10, True)  # an empty page at the stream's position
    assert (page_of(empty), empty.offset) == (([], None, False), 0)
    assert await read(broker, None, 10) == ([], None, False)
    entries = await fill(broker, "a", 5)
    assert empty.epoch == entries[0].epoch
    epoch = entries[0].epoch
    whole = await broker.history("a", None, 10, False)
    assert (whole.epoch, whole.offset) == (epoch, 5)
    assert whole.entries == entries  # the stored entries themselves, text and all
    assert await read(broker, None, 2) == ([1, 2], None, True)
    assert await read(broker, (epoch, 2), 2) == ([3, 4], None, True)
    assert await read(broker, (epoch, 3), 10) == ([4, 5], None, False)
    assert await read(broker, (epoch, 5), 10) == ([], None, False)
    assert await read(broker, None, 2, True) == ([5, 4], None, True)
    assert await read(broker, (epoch, 4), 2, True) == ([3, 2], None, True)
    assert await read(broker, (epoch, 3), 10, True) == ([2, 1], None, False)
    assert await read(broker, (epoch, 1), 10, True) == ([], None, False)


async def test_history_since_another_epoch_or_past_the_newest_reads_as_none(make: Make) -> None:
    broker = await make()
    epoch = (await fill(broker, "a", 3))[0].epoch
    for since in (("from-a-previous-life", 2), (epoch, 4)):
        assert await read(broker, since, 2) == ([1, 2], "epoch_changed", True)
        assert await read(broker, since, 2, True) == ([3, 2], "epoch_changed", True)


async def test_history_bounded_by_count_starts_at_the_oldest_kept(make: Make) -> None:
    broker = await make(history_size=3)
    epoch = (await fill(broker, "a", 10))[0].epoch
    assert await read(broker, (epoch, 2), 10) == ([8, 9, 10], "trimmed", False)
    assert await read(broker, None, 10) == ([8, 9, 10], None, False)
    assert await read(broker, (epoch, 9), 5, True) == ([8], "trimmed", False)
    assert await read(broker, (epoch, 10), 2, True) == ([9, 8], None, False)


async def test_history_bounded_by_age_counts_old_entries_as_trimmed(make: Make) -> None:
    clock = FakeClock()
    broker = await make(history_seconds=60, clock=clock)
    epoch = (await fill(broker, "a", 7))[0].epoch
    clock.now += 61
    await fill(broker, "a", 3)
    assert await read(broker, (epoch, 0), 10) == ([8, 9, 10], "trimmed", False)
    assert await read(broker, None, 10, True) == ([10, 9, 8], None, False)
    assert await read(broker, (epoch, 9), 3, True) == ([8], "trimmed", False)
    clock.now += 61
    page = await broker.history("a", None, 10, False)
    assert (page_of(page), page.offset) == (([], None, False), 10)


async def test_history_agrees_with_the_paging_model_for_every_read(make: Make) -> None:
    """Entries 1..4 dropped by count, 5 and 6 by age, 7..10 kept: every since, limit and
    direction gives the page the brute-force model of PROTOCOL §7.6 gives."""
    clock = FakeClock()
    broker = await make(history_size=6, history_seconds=60, clock=clock)
    epoch = (await fill(broker, "a", 6))[0].epoch
    clock.now += 30
    await fill(broker, "a", 4)
    clock.now += 31
    sinces = [None, ("other", 3), *((epoch, offset) for offset in range(13))]
    for since in sinces:
        for limit in range(1, 9):
            for reverse in (False, True):
                page = await broker.history("a", since, limit, reverse)
                expected = model_page(epoch, 7, 10, since, limit, reverse)
                assert page_of(page) == expected, (since, limit, reverse)
                assert (page.epoch, page.offset) == (epoch, 10)


# ----------------------------------------------------------------------
# Presence (PROTOCOL §7.5)


def member(session: str, user: str | None = None, joined_at: float = 0.0) -> p.PresenceMember:
    return p.PresenceMember(session=session, user=user, client="c", joined_at=joined_at)


async def test_presence_add_stamps_new_members_and_keeps_present_ones(make: Make) -> None:
    broker = await make()
    first, new = await broker.presence_add("a", member("s1", "ann"), 30)
    assert (new, first.session, first.user, first.client) == (True, "s1", "ann", "c")
    assert first.joined_at > 0  # stamped by the broker
    renewed = member("s1", "ann").model_copy(update={"client": "other"})
    assert await broker.presence_add("a", renewed, 30) == (first, False)
    given, new = await broker.presence_add("a", member("s2", joined_at=5.0), 30)
    assert (given.joined_at, new) == (5.0, True)
    assert await broker.presence("a") == [given, first]
    assert await broker.presence("b") == []


async def test_presence_remove_says_whether_the_session_was_there(make: Make) -> None:
    broker = await make()
    await broker.presence_add("a", member("s1"), 30)
    await broker.presence_add("a", member("s2"), 30)
    assert await broker.presence_remove("a", "s1")
    assert not await broker.presence_remove("a", "s1")
    assert not await broker.presence_remove("never", "s1")
    assert [m.session for m in await broker.presence("a")] == ["s2"]
    assert await broker.presence_remove("a", "s2")
    assert await broker.presence("a") == []
    assert await broker.presence_stats("a") == (0, 0)


async def test_presence_lists_oldest_first_and_counts_distinct_named_users(make: Make) -> None:
    broker = await make()
    for session, user, joined_at in (("s3", "ann", 20), ("s2", "ann", 10), ("s1", None, 10)):
        await broker.presence_add("a", member(session, user, joined_at), 30)
    await broker.presence_add("a", member("s0", "bob", 30), 30)
    await broker.presence_add("b", member("s5", "cat"), 30)
    assert [m.session for m in await broker.presence("a")] == ["s1", "s2", "s3", "s0"]
    assert await broker.presence_stats("a") == (4, 2)  # ann twice, one anonymous
    assert await broker.presence_stats("b") == (1, 1)
    assert await broker.presence_stats("empty") == (0, 0)


async def test_presence_entries_expire_at_their_ttl_by_the_brokers_clock(make: Make) -> None:
    clock = FakeClock()
    broker = await make(clock=clock)
    await broker.presence_add("a", member("s1", "ann"), 30)
    await broker.presence_add("a", member("s2", "bob"), 60)
    clock.now += 29.9
    assert [m.session for m in await broker.presence("a")] == ["s1", "s2"]
    clock.now += 0.1
    assert [m.session for m in await broker.presence("a")] == ["s2"]
    assert await broker.presence_stats("a") == (1, 1)
    assert not await broker.presence_remove("a", "s1")
    _, new = await broker.presence_add("a", member("s1", "ann"), 30)
    assert new  # it had expired: it enters again
    clock.now += 30
    assert await broker.presence("a") == []


async def test_presence_refresh_renews_members_and_adds_missing_ones(make: Make) -> None:
    clock = FakeClock()
    broker = await make(clock=clock)
    first, _ = await broker.presence_add("a", member("s1", "ann"), 30)
    await broker.presence_add("a", member("s2"), 30)
    clock.now += 20
    await broker.presence_refresh([], 30)
    await broker.presence_refresh(
        [("a", member("s1", "ann")), ("a", member("s3", joined_at=7.0)), ("b", first)], 30
    )
    clock.now += 20  # s2 was not renewed: gone; the others were, at +20
    assert await broker.presence("a") == [member("s3", joined_at=7.0), first]
    assert await broker.presence("b") == [first]
    clock.now += 10
    assert await broker.presence("a") == []


@pytest.mark.parametrize("make", ["redis"], indirect=True)
async def test_redis_presence_keys_expire_with_their_latest_member(make: Make) -> None:
    """Without any node left to drop them, the presence keys go by their own PEXPIRE."""
    broker = await make()
    assert isinstance(broker, RedisBroker)
    keys = broker.reads._presence_keys("a")
    await broker.presence_add("a", member("s1"), 0.6)
    await broker.presence_add("a", member("s2"), 0.2)
    assert all([300 < await broker.redis.pttl(key) <= 600 for key in keys])  # the latest's TTL
    async with asyncio.timeout(5):
        while await broker.redis.exists(*keys):  # noqa: ASYNC110 (Redis expires them: no event)
            await asyncio.sleep(0.05)
    await broker.presence_add("a", member("s1"), 30)
    await broker.presence_remove("a", "s1")  # the last member out takes the keys with it
    assert await broker.redis.exists(*keys) == 0


async def test_presence_refresh_of_many_members_in_one_call(make: Make) -> None:
    broker = await make()
    sessions = [f"s{i:04}" for i in range(1_200)]  # more than one script's chunk (Redis)
    members = [("a", member(s, f"u{i % 7}", 1.0)) for i, s in enumerate(sessions)]
    await broker.presence_refresh([*members, ("b", member("x"))], 30)
    assert await broker.presence_stats("a") == (1_200, 7)
    assert [m.session for m in await broker.presence("a")] == sessions
    assert await broker.presence_stats("b") == (1, 0)


async def test_redis_reads_raise_broker_unavailable_when_redis_is_gone() -> None:
    own = OwnRedis(free_port())
    await own.start()
    broker = RedisBroker(own.url, connect_timeout=1.0)
    try:
        await broker.start()
        await own.stop()
        for name, args in (
            ("history", ("a", None, 10, False)),
            ("presence_add", ("a", member("s2"), 30)),
            ("presence_refresh", ([("a", member("s1"))], 30)),
            ("presence_remove", ("a", "s1")),
            ("presence", ("a",)),
            ("presence_stats", ("a",)),
        ):
            with pytest.raises(BrokerUnavailable):
                await getattr(broker, name)(*args)
    finally:
        await broker.close()
        await own.stop()


# ----------------------------------------------------------------------
# Calls between nodes


async def two_nodes(make: Make, **limits: Any) -> tuple[Broker, Broker]:
    """A caller's broker and a callee's: one in-process broker serves both nodes, as
    several servers of one process share it; Redis nodes each have their own."""
    caller = await make(**limits)
    if isinstance(caller, MemoryBroker):
        return caller, caller
    return caller, await make(**limits)


class Gate:
    """A handler that holds each call until released; it records what it was called with."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = asyncio.Event()

    async def __call__(self, payload: str) -> str:
        self.calls.append(payload)
        self.started.set()
        await self.release.wait()
        self.finished.set()
        return f"done {payload}"


async def test_a_call_reaches_the_node_served_and_brings_back_its_answer(make: Make) -> None:
    caller, callee = await two_nodes(make)

    async def shout(payload: str) -> str:
        return payload.upper()

    await callee.serve_node("n1", shout)
    payload = "a line\nanother, é, " + "x" * 100_000  # newlines, non-ASCII, a large body
    assert await caller.call_node("n1", payload, 5.0) == payload.upper()
    gate = Gate()
    gate.release.set()
    await callee.serve_node("n1", gate)  # served again: the new handler answers
    assert await caller.call_node("n1", "p", 5.0) == "done p"


async def test_a_call_to_a_node_nobody_serves_fails_at_once(make: Make) -> None:
    caller, callee = await two_nodes(make)
    gate = Gate()
    gate.release.set()
    await callee.serve_node("n1", gate)
    await callee.unserve_node("n1")
    started = time.monotonic()
    for node in ("n1", "never-served"):
        with pytest.raises(NodeGone):
            await caller.call_node(node, "p", 10.0)
    assert time.monotonic() - started < 2.0  # not after the timeout
    assert gate.calls == []


async def test_a_call_unanswered_in_time_times_out_and_its_handler_still_runs(
    make: Make,
) -> None:
    caller, callee = await two_nodes(make)
    gate = Gate()
    await callee.serve_node("n1", gate)
    with pytest.raises(CallTimeout):
        await caller.call_node("n1", "p", 0.3)
    assert isinstance(CallTimeout("x"), TimeoutError)
    gate.release.set()
    await asyncio.wait_for(gate.finished.wait(), 5)  # not cut short by the caller's timeout
    assert gate.calls == ["p"]


async def test_a_handler_that_raises_fails_the_call(make: Make) -> None:
    caller, callee = await two_nodes(make)

    async def broken(payload: str) -> str:
        raise RuntimeError("no")

    await callee.serve_node("n1", broken)
    with pytest.raises(CallFailed, match="RuntimeError") as failed:
        await caller.call_node("n1", "p", 5.0)
    assert not isinstance(failed.value, CallTimeout | NodeGone | CallsBusy)


async def test_calls_in_flight_are_bounded_by_max_calls_on_both_sides(make: Make) -> None:
    caller, callee = await two_nodes(make, max_calls=1)
    gate = Gate()
    await callee.serve_node("n1", gate)
    held = asyncio.ensure_future(caller.call_node("n1", "first", 0.5))
    await asyncio.wait_for(gate.started.wait(), 5)
    with pytest.raises(CallsBusy, match="from this node"):  # the caller's limit: at once
        await caller.call_node("n1", "second", 5.0)
    with pytest.raises(CallTimeout):
        await held
    # The caller has none in flight now; the callee still answers "first": busy.
    with pytest.raises(CallsBusy, match="answering"):
        await caller.call_node("n1", "third", 5.0)
    gate.release.set()
    await asyncio.wait_for(gate.finished.wait(), 5)
    assert await caller.call_node("n1", "fourth", 5.0) == "done fourth"
    assert gate.calls == ["first", "fourth"]  # what was refused never ran

"""``pages.span``, the history paging rule every broker shares (PROTOCOL §7.6).

The examples pin the rule's cases; the properties compare it with a brute-force
model that says the rule in terms of lists (what was ever appended, what is
kept) instead of arithmetic, and check that paging on from a page's edge
visits every kept entry once.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server_ref.broker.pages import Span, span

pytestmark = pytest.mark.timeout(60)

E = "e1"


def model_page(
    epoch: str,
    oldest: int,
    newest: int,
    since: tuple[str, int] | None,
    limit: int,
    reverse: bool,
) -> tuple[list[int], str | None, bool]:
    """The page's offsets in reading order, its gap and ``more``, by listing.

    Offsets 1..newest were appended, oldest..newest are kept. The entries asked
    for are those after ``since`` (before it, reverse), nearest first; the page
    is the first ``limit`` of them still kept. It is 'trimmed' when a ``since``
    was given and the page it would have been, had nothing been dropped, holds
    one that is gone; ``more`` when kept entries asked for lie beyond it.
    """
    kept = set(range(oldest, newest + 1))
    gap: str | None = None
    after: int | None = None
    if since is not None:
        if since[0] != epoch or since[1] > newest:
            gap = "epoch_changed"
        else:
            after = since[1]
    existed = range(1, newest + 1)
    if reverse:
        asked = [o for o in reversed(existed) if after is None or o < after]
    else:
        asked = [o for o in existed if after is None or o > after]
    available = [o for o in asked if o in kept]
    page = available[:limit]
    if after is not None and any(o not in kept for o in asked[:limit]):
        gap = "trimmed"
    return page, gap, len(available) > limit


def offsets(page: Span, reverse: bool) -> list[int]:
    read = list(range(page.lo, page.hi + 1))
    return read[::-1] if reverse else read


def test_forward_pages_start_after_since_or_at_the_oldest() -> None:
    assert span(E, 1, 5, None, 2, False) == Span(1, 2, None, True)
    assert span(E, 1, 5, (E, 2), 2, False) == Span(3, 4, None, True)
    assert span(E, 1, 5, (E, 3), 10, False) == Span(4, 5, None, False)
    assert offsets(span(E, 1, 5, (E, 5), 10, False), False) == []  # up to date


def test_reverse_pages_end_before_since_or_at_the_newest() -> None:
    assert offsets(span(E, 1, 5, None, 2, True), True) == [5, 4]
    assert span(E, 1, 5, None, 2, True).more
    page = span(E, 1, 5, (E, 4), 10, True)
    assert (offsets(page, True), page.gap, page.more) == ([3, 2, 1], None, False)
    assert offsets(span(E, 1, 5, (E, 1), 10, True), True) == []  # the first entry: none before


def test_another_epoch_or_a_position_past_the_newest_is_epoch_changed_and_reads_as_none() -> None:
    for since in (("old", 3), (E, 6)):
        forward = span(E, 1, 5, since, 2, False)
        assert (forward.lo, forward.hi, forward.gap) == (1, 2, "epoch_changed")
        back = span(E, 1, 5, since, 2, True)
        assert (back.lo, back.hi, back.gap) == (4, 5, "epoch_changed")


def test_entries_no_longer_kept_are_trimmed_and_the_page_starts_at_the_nearest_kept() -> None:
    assert span(E, 8, 10, (E, 2), 5, False) == Span(8, 10, "trimmed", False)
    assert span(E, 8, 10, (E, 6), 5, False).gap == "trimmed"  # 7 is gone
    assert span(E, 8, 10, (E, 7), 5, False).gap is None  # 8 is kept
    assert span(E, 8, 10, None, 5, False).gap is None  # from the oldest kept: nothing asked for
    assert span(E, 8, 10, (E, 10), 5, True) == Span(8, 9, "trimmed", False)  # 5..7 gone
    assert span(E, 8, 10, (E, 10), 2, True).gap is None  # 8, 9: both kept
    assert span(E, 8, 10, None, 5, True).gap is None  # from the newest: nothing asked for


def test_an_empty_stream_and_one_whose_entries_all_aged_out() -> None:
    for reverse in (False, True):
        assert offsets(span(E, 1, 0, None, 5, reverse), reverse) == []
        assert not span(E, 1, 0, None, 5, reverse).more
        aged = span(E, 5, 4, None, 5, reverse)  # 1..4 appended, none kept
        assert (offsets(aged, reverse), aged.gap, aged.more) == ([], None, False)
    assert span(E, 5, 4, (E, 2), 5, False).gap == "trimmed"
    assert span(E, 1, 0, (E, 0), 5, False).gap is None


positions = st.integers(min_value=0, max_value=40)


@st.composite
def reads(draw: st.DrawFn) -> tuple[int, int, tuple[str, int] | None, int, bool]:
    newest = draw(st.integers(min_value=0, max_value=30))
    oldest = draw(st.integers(min_value=1, max_value=newest + 1))
    since = draw(st.none() | st.tuples(st.sampled_from([E, "other"]), positions))
    limit = draw(st.integers(min_value=1, max_value=35))
    return oldest, newest, since, limit, draw(st.booleans())


@settings(max_examples=500, deadline=None)
@given(reads())
def test_span_agrees_with_the_brute_force_model(
    read: tuple[int, int, tuple[str, int] | None, int, bool],
) -> None:
    oldest, newest, since, limit, reverse = read
    page = span(E, oldest, newest, since, limit, reverse)
    assert (offsets(page, reverse), page.gap, page.more) == model_page(
        E, oldest, newest, since, limit, reverse
    )
    if page.lo <= page.hi:
        assert oldest <= page.lo <= page.hi <= newest
        assert page.hi - page.lo + 1 <= limit


@settings(max_examples=500, deadline=None)
@given(
    st.integers(min_value=0, max_value=30),
    st.integers(min_value=0, max_value=31),
    st.integers(min_value=1, max_value=7),
    st.booleans(),
)
def test_paging_on_from_each_pages_edge_visits_every_kept_entry_once(
    newest: int, drop: int, limit: int, reverse: bool
) -> None:
    """Forward from the oldest with ``since`` = the last shown; back with ``since`` = the
    oldest shown (PROTOCOL §7.6): together the pages are the kept entries, in order.

    Only the last page back may say 'trimmed': it was cut short by the oldest kept."""
    oldest = min(drop, newest) + 1
    seen: list[int] = []
    since: tuple[str, int] | None = None
    for _ in range(newest + 2):
        page = span(E, oldest, newest, since, limit, reverse)
        read = offsets(page, reverse)
        seen += read
        if not page.more:
            assert page.gap is None or (reverse and oldest > 1 and page.gap == "trimmed")
            break
        assert page.gap is None
        since = (E, read[-1])
    kept = list(range(oldest, newest + 1))
    assert seen == (kept[::-1] if reverse else kept)

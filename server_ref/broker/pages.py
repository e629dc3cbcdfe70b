"""Which offsets a ``history`` read covers: the rule every broker shares.

Pure arithmetic over a stream's kept offsets (``oldest`` to ``newest``, with
``oldest == newest + 1`` when nothing is kept), so the memory and Redis
brokers page alike and the rule is tested once (PROTOCOL §7.6).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Span", "span"]


@dataclass(frozen=True, slots=True)
class Span:
    """The offsets ``lo`` to ``hi`` (inclusive; empty when ``lo > hi``) of one page."""

    lo: int
    hi: int
    gap: str | None
    more: bool


def span(
    epoch: str,
    oldest: int,
    newest: int,
    since: tuple[str, int] | None,
    limit: int,
    reverse: bool,
) -> Span:
    """The page of at most ``limit`` kept offsets that a read from ``since`` gets.

    Forward, the page starts after ``since`` (or at ``oldest``); reverse, it
    ends before ``since`` (or at ``newest``) and is read newest first. A
    ``since`` of another epoch, or past ``newest``, is 'epoch_changed' and
    reads as no ``since``; a forward start before ``oldest`` is 'trimmed'; a
    reverse page cut short by ``oldest`` when entries before it once existed
    is 'trimmed' too.
    """
    gap: str | None = None
    after: int | None = None
    if since is not None:
        since_epoch, offset = since
        if since_epoch != epoch or offset > newest:
            gap = "epoch_changed"
        else:
            after = offset
    if not reverse:
        start = oldest if after is None else after + 1
        if start < oldest:
            gap, start = gap or "trimmed", oldest
        hi = min(newest, start + limit - 1)
        return Span(start, hi, gap, hi < newest)
    end = newest if after is None else after - 1
    lo = max(oldest, end - limit + 1)
    if gap is None and after is not None and end >= 1 and oldest > 1 and end - limit + 1 < oldest:
        gap = "trimmed"  # the page wanted entries before the oldest kept, which existed
    return Span(lo, end, gap, lo > oldest)

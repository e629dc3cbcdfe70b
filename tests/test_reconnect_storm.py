"""A reconnection storm: 200 clients lose their server at the same instant.

With full jitter, each client waits ``uniform(0, initial_delay)`` before its
first retry (plus the ``retry_after`` a shutting-down server asks for), so
the attempts reach the server spread over that interval instead of as one
burst. The spread is measured on the schedule the backoff chose: each
client's wait, drawn when its connection was lost, added to that moment (and
the server's ``retry_after``). The attempts' actual times (``Client.on_attempt``)
would measure the clients' event loop too: 200 clients share one, and when the
replacement server's start starves it, timers that came due meanwhile fire in
one bunch (measured: 54 and 60 of 200 in one 50 ms window, on schedules that
were spread). The actual times still prove that nobody came back early.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from rtchat_sdk import Client, ConnectionState, ReconnectPolicy
from tests.helpers import free_port
from tests.test_server_kill import ServerProcess

CLIENTS = 200
INITIAL_DELAY = 1.0
"""Upper bound of the first retry wait (full jitter: uniform over [0, 1 s])."""
POLICY = ReconnectPolicy(initial_delay=INITIAL_DELAY, max_delay=2 * INITIAL_DELAY)
RETRY_AFTER = 2.0
"""What the server asks clients to wait when it shuts down gracefully.

Long enough that the replacement server has started (its imports take most
of a core for about a second on the 2-core test machine) before the first
retries: while it starts, the 200 clients' process can be starved for tens
of milliseconds, and the timers that came due meanwhile then fire in one
bunch — an artifact of 200 clients sharing one event loop, which measured 46
and 51 of 200 in one window with 0.5 s here, not a property of the backoff."""
SEED = 20_240_611
WINDOW = 0.05

# The bounds, for N = 200 first attempts after the outage, offsets x_i from it:
#
# * Full jitter makes x_i ~ uniform(0, D) with D = INITIAL_DELAY (a few ms of
#   event-loop latency on top). The empirical 10th and 90th percentiles of 200
#   uniform draws are Beta(20, 181)- and Beta(181, 20)-distributed: each has a
#   standard deviation of 0.021 D, so p90 - p10 is 0.8 D +- 0.03 D. Asking for
#   at least 0.5 D fails only on a 10-sigma event.
# * A 50 ms window expects 5% of the attempts (10 of 200), binomially; the
#   chance that any of the ~20 disjoint half-windows covering [0, D] holds 40
#   or more (the bound below: 20%) is below 1e-10.
# * Without jitter all 200 sleeps end at the same instant and their attempts
#   start in one pass of the event loop: measured here, all within 72 ms,
#   p90 - p10 = 0.06 s and 136 of 200 in one 50 ms window; both bounds fail.
#   "Equal jitter" (uniform(D/2, D)) measured p90 - p10 = 0.41 s and 34 in a
#   window: it fails the first bound. A retry_after taken as max(jitter,
#   retry_after) instead of added to it sends every client whose draw is below
#   it (half of them here) back at the same instant: the second bound fails.
MIN_SPREAD = 0.5 * INITIAL_DELAY
MAX_BURST = 0.20


@dataclass(frozen=True)
class RecordingPolicy(ReconnectPolicy):
    """``POLICY``, noting each wait it hands out and when (the loop's time)."""

    draws: list[tuple[float, float]] = field(default_factory=list)

    def delays(self) -> Iterator[float]:
        for delay in ReconnectPolicy.delays(self):
            self.draws.append((asyncio.get_running_loop().time(), delay))
            yield delay


@pytest.fixture
def seeded_random() -> Iterator[None]:
    """The backoff draws from the global ``random``: seed it, and restore it after."""
    state = random.getstate()
    random.seed(SEED)
    try:
        yield
    finally:
        random.setstate(state)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def max_in_window(times: list[float], width: float) -> int:
    """Most of ``times`` falling in any interval [t, t + width)."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[IO[bytes]]:
    with open(tmp_path / "server.log", "wb") as log:
        yield log


async def storm(log: IO[bytes], outage: signal.Signals) -> tuple[list[float], list[float]]:
    """Connect CLIENTS clients, take their server away with ``outage``, bring it
    back; returns, relative to the outage, each client's first attempt after it:
    when it happened, and when its backoff scheduled it."""
    loop = asyncio.get_running_loop()
    server = ServerProcess(free_port(), log, "--shutdown-retry-after", str(RETRY_AFTER))
    clients: list[Client] = []
    policies: list[RecordingPolicy] = []
    pause = RETRY_AFTER if outage is signal.SIGTERM else 0.0  # the server's retry_after
    try:
        await server.start()
        attempts: list[list[tuple[float, int]]] = [[] for _ in range(CLIENTS)]
        connected = asyncio.Event()
        attempted = asyncio.Event()

        def count_connected(state: ConnectionState) -> None:
            if all(c.state is ConnectionState.CONNECTED for c in clients):
                connected.set()

        for i in range(CLIENTS):
            policy = RecordingPolicy(initial_delay=POLICY.initial_delay, max_delay=POLICY.max_delay)
            policies.append(policy)
            client = Client(server.url, auth={"user": f"c{i}"}, reconnect=policy)

            def on_attempt(attempt: int, url: str, i: int = i) -> None:
                attempts[i].append((loop.time(), attempt))
                if all(attempts):
                    attempted.set()

            client.on_attempt(on_attempt)
            client.on_state_change(count_connected)
            clients.append(client)
        for batch in range(0, CLIENTS, 50):  # within the server's listen backlog
            await asyncio.gather(*(c.connect() for c in clients[batch : batch + 50]))
        for times in attempts:
            times.clear()
        for policy in policies:
            policy.draws.clear()
        attempted.clear()
        connected.clear()

        lost_at = loop.time()
        server.signal(outage)  # SIGKILL: connections reset; SIGTERM: shutting_down
        async with asyncio.timeout(10):
            await server.wait()
        await server.start()  # same port
        async with asyncio.timeout(15):
            await attempted.wait()  # every client tried at least once
            await connected.wait()  # and all are back
        # Counted from 1 again after the lost connection.
        assert [times[0][1] for times in attempts] == [1] * CLIENTS
        actual = [times[0][0] - lost_at for times in attempts]
        scheduled = [
            policy.draws[0][0] + policy.draws[0][1] + pause - lost_at for policy in policies
        ]
        return actual, scheduled
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await server.kill()


def check_spread(actual: list[float], offsets: list[float], earliest: float) -> str:
    """Nobody came back before ``earliest`` (actual times); the schedules are spread."""
    spread = percentile(offsets, 0.9) - percentile(offsets, 0.1)
    burst = max_in_window(offsets, WINDOW)
    summary = (
        f"first attempts after the outage: earliest actual {min(actual):.3f}s; scheduled: "
        f"min {min(offsets):.3f}s, "
        f"p10 {percentile(offsets, 0.1):.3f}s, p50 {percentile(offsets, 0.5):.3f}s, "
        f"p90 {percentile(offsets, 0.9):.3f}s, max {max(offsets):.3f}s; "
        f"p90-p10 {spread:.3f}s; at most {burst} of {len(offsets)} in any {WINDOW * 1000:.0f} ms"
    )
    print("\n" + summary)
    assert len(offsets) == len(actual) == CLIENTS
    assert min(actual) >= earliest, summary
    assert min(offsets) >= earliest, summary
    assert spread >= MIN_SPREAD, summary
    assert burst <= MAX_BURST * CLIENTS, summary
    return summary


@pytest.mark.timeout(40)
@pytest.mark.usefixtures("seeded_random")
async def test_killed_server_clients_spread_their_reconnects(server_log: IO[bytes]) -> None:
    actual, offsets = await storm(server_log, signal.SIGKILL)
    check_spread(actual, offsets, earliest=0.0)


@pytest.mark.timeout(40)
@pytest.mark.usefixtures("seeded_random")
async def test_server_shutting_down_clients_wait_retry_after_then_spread(
    server_log: IO[bytes],
) -> None:
    actual, offsets = await storm(server_log, signal.SIGTERM)
    # Everyone waited at least what the server asked for, then its own jitter.
    check_spread(actual, offsets, earliest=RETRY_AFTER)

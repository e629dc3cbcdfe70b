"""A stream that starts a new epoch under a connected client, with no gap frame.

The client drops a delivery as a duplicate only if it is at or below the last
offset handled *in the same epoch*. A new epoch restarts at offset 1, below
that offset: a filter that compared offsets alone would drop the new epoch's
messages silently. Here the room's stream is renumbered inside the broker
between two publishes, so the next delivery simply arrives in a new epoch,
live, on the same connection: no reconnect, no replay, no gap frame.
"""

from __future__ import annotations

import secrets

import pytest

from rtchat_sdk import Client, GapReported
from rtchat_sdk import protocol as p
from server_ref import MemoryBroker, Server
from tests.helpers import Inbox

pytestmark = pytest.mark.timeout(30)


class RenumberingBroker(MemoryBroker):
    """A memory broker that can start a stream's new epoch while it is in use."""

    def new_epoch(self, stream: str) -> str:
        """Forget the stream's history; its next entry is offset 1 of a new epoch.

        Its listeners stay, so members keep getting its live entries.
        """
        s = self._stream(stream)
        s.epoch = secrets.token_hex(8)
        s.offset = 0
        s.entries.clear()
        return s.epoch


async def test_a_new_epoch_without_a_gap_frame_is_delivered_not_dropped_as_duplicates() -> None:
    broker = RenumberingBroker()
    srv = Server(broker=broker)
    await srv.start("127.0.0.1", 0)
    stream = p.room_stream(p.DEFAULT_NAMESPACE, "r")
    try:
        async with Client(srv.url) as sender, Client(srv.url) as receiver:
            inbox = Inbox(receiver)
            gaps: list[GapReported] = []
            receiver.on_gap(gaps.append)
            await sender.join("r")
            await receiver.join("r")
            old = [await sender.publish("r", "m", f"old {i}") for i in range(3)]
            assert old == [1, 2, 3]
            await inbox.wait_for(3)  # the receiver stands at offset 3 of the old epoch
            epoch = broker.new_epoch(stream)
            new = [await sender.publish("r", "m", f"new {i}") for i in range(3)]
            assert new == [1, 2, 3]  # at or below where the receiver stands
            assert await inbox.settle(srv) == [
                *(f"old {i}" for i in range(3)),
                *(f"new {i}" for i in range(3)),
            ]
            assert receiver.counters["duplicates_dropped"] == 0
            # Loud, not silent: the new epoch is reported as a gap before offset 1.
            assert [(g.stream, g.reason, g.epoch, g.offset) for g in gaps] == [
                (stream, "epoch_changed", epoch, 0)
            ]
            assert receiver.counters["connections"] == 1  # all of it on one connection
    finally:
        await srv.close()

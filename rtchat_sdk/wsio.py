"""What the client's and the server's websockets drivers share: the one-write flush.

Both sides frame each outgoing frame with websockets' sans-I/O protocol
(``protocol.send_text``) and then hand everything framed to the socket in
one ``transport.write``, one ``send()`` system call, as websockets'
``broadcast()`` does: ``connection.send_data()`` would make one per frame.
Imports websockets only, nothing of the client's driver, so the server can
use it.
"""

from __future__ import annotations

from websockets.asyncio.connection import Connection

__all__ = ["write_framed"]


def write_framed(ws: Connection) -> None:
    """Write what websockets framed for ``ws`` in one ``transport.write``.

    An empty chunk among them is websockets' end-of-stream marker (a
    half-close after a close frame): then they go websockets' own way,
    ``send_data()``, which knows what to do with it.
    """
    protocol = ws.protocol
    chunks = protocol.data_to_send()
    if all(chunks):
        if chunks:
            ws.transport.write(b"".join(chunks))
        return
    protocol.writes[:0] = chunks
    ws.send_data()

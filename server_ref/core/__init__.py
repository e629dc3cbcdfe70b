"""The server's sans-I/O core: no asyncio, no sockets, no clock of its own.

``connection`` is one connection's protocol state (parsing, handshake,
heartbeats) and the fast encoders of the frames the server writes most;
``sessions`` owns sessions and room membership; ``replay`` numbers what a
resuming client missed; ``hub`` ties them together: it takes inputs with
``now`` and returns commands for its driver (``commands``).
"""

__all__: list[str] = []

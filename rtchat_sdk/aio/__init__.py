"""The asyncio driver of the client core, one job per module.

``client.py``: the public API (``Client``, namespaces), calls to futures and
events to callbacks; ``connection.py``: the ``Link`` — dial, read, write,
the core's one timer, backoff and reconnect; ``dispatcher.py``: deliveries
and gaps to the app's handlers, in order; ``handlers.py``: the registry
that validates payloads and calls handlers; ``endpoint.py``: URL checks,
proxy choice and the words for a failed dial.
"""

from ..core import ConnectionState
from .client import Client, NamespaceClient

__all__ = ["Client", "ConnectionState", "NamespaceClient"]

"""The asyncio driver of the client core: connection, dispatcher, public API.

``Client`` (``client.py``) runs a ``rtchat_sdk.core.ClientSession`` over
websockets; ``handlers.py`` calls the app's handlers for each delivery;
``endpoint.py`` checks URLs, picks proxies and explains failed dials.
"""

from .client import Client, ConnectionState, NamespaceClient

__all__ = ["Client", "ConnectionState", "NamespaceClient"]

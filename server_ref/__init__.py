"""The rtchat reference server: embeddable (``Server``) and runnable (``rtchat-server``).

Logs go to the ``server_ref`` logger; as a library it adds only a
``NullHandler``, so nothing is printed unless the app configures logging
(``rtchat-server`` does, to stderr).
"""

import logging
from typing import Any

from .app import Context, Namespace
from .broker import Broker, MemoryBroker
from .config import ServerConfig
from .server import Server

__all__ = [
    "Broker",
    "Context",
    "MemoryBroker",
    "Namespace",
    "RedisBroker",
    "Server",
    "ServerConfig",
]


def __getattr__(name: str) -> Any:
    """``RedisBroker`` on first use: redis-py is loaded only by those who scale out."""
    if name == "RedisBroker":
        from .broker.redis import RedisBroker

        return RedisBroker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


logging.getLogger("server_ref").addHandler(logging.NullHandler())

"""The rtchat reference server: embeddable (``Server``) and runnable (``rtchat-server``).

Logs go to the ``server_ref`` logger; as a library it adds only a
``NullHandler``, so nothing is printed unless the app configures logging
(``rtchat-server`` does, to stderr).
"""

import logging

from .app import Context, Namespace
from .broker import Broker, MemoryBroker
from .config import ServerConfig
from .server import Server

__all__ = ["Broker", "Context", "MemoryBroker", "Namespace", "Server", "ServerConfig"]

logging.getLogger("server_ref").addHandler(logging.NullHandler())

"""The rtchat reference server: embeddable (``Server``) and runnable (``rtchat-server``)."""

from .app import Context, Namespace
from .broker import Broker, MemoryBroker
from .server import Server, ServerConfig

__all__ = ["Broker", "Context", "MemoryBroker", "Namespace", "Server", "ServerConfig"]

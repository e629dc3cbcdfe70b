"""Where the server keeps streams: memory by default, Redis to scale out."""

from .base import Broker, FrameBuilder, Listener, Replay, SessionRecord, StreamEntry
from .memory import MemoryBroker

__all__ = [
    "Broker",
    "FrameBuilder",
    "Listener",
    "MemoryBroker",
    "Replay",
    "SessionRecord",
    "StreamEntry",
]

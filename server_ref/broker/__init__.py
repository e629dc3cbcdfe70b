"""Where the server keeps streams: memory by default, Redis to scale out."""

from .base import (
    Broker,
    Clock,
    Draft,
    Listener,
    ReplacedListener,
    Replay,
    SessionRecord,
    StreamEntry,
)
from .memory import MemoryBroker

__all__ = [
    "Broker",
    "Clock",
    "Draft",
    "Listener",
    "MemoryBroker",
    "ReplacedListener",
    "Replay",
    "SessionRecord",
    "StreamEntry",
]

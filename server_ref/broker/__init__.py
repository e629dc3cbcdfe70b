"""Where the server keeps streams: memory by default, Redis to scale out."""

from .base import (
    Broker,
    Clock,
    Draft,
    EntryListener,
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
    "EntryListener",
    "MemoryBroker",
    "ReplacedListener",
    "Replay",
    "SessionRecord",
    "StreamEntry",
]

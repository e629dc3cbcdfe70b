"""Where the server keeps streams: memory by default, Redis to scale out."""

from .base import (
    MAX_CALLS,
    Broker,
    CallFailed,
    CallHandler,
    CallsBusy,
    CallTimeout,
    Clock,
    Draft,
    EntryListener,
    NodeGone,
    ReplacedListener,
    Replay,
    SessionRecord,
    StreamEntry,
)
from .memory import MemoryBroker

__all__ = [
    "MAX_CALLS",
    "Broker",
    "CallFailed",
    "CallHandler",
    "CallTimeout",
    "CallsBusy",
    "Clock",
    "Draft",
    "EntryListener",
    "MemoryBroker",
    "NodeGone",
    "ReplacedListener",
    "Replay",
    "SessionRecord",
    "StreamEntry",
]

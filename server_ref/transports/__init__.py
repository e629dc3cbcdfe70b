"""Transports: what carries frames between clients and the hub (``base.py`` is the seam)."""

from .base import Endpoint, Listener, ListenerFactory, Transport
from .websocket import websocket_listener

__all__ = ["Endpoint", "Listener", "ListenerFactory", "Transport", "websocket_listener"]

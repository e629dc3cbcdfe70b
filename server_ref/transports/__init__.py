"""Transports: what carries frames between clients and the hub (``base.py`` is the seam)."""

from .base import Endpoint, Listener, Transport

__all__ = ["Endpoint", "Listener", "Transport"]

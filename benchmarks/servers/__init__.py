"""One small server program per implementation, each run as its own process.

Every program takes ``--host`` and ``--port`` (0: any free port) and prints a
line ending in ``ws://HOST:PORT`` once it listens; SIGTERM stops it
gracefully. ``benchmarks.impls`` knows how to start each one.
"""

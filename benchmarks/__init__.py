"""Benchmarks: rtchat side by side with raw websockets and python-socketio.

Run ``python -m benchmarks.run`` (``--help`` for its flags). Numbers are
measured, never asserted: nothing here is a test. See docs/performance.md.
"""

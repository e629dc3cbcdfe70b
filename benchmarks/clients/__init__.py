"""Client programs: one module per implementation, run as separate processes.

``python -m benchmarks.clients IMPL SCENARIO --url URL --server-pid PID --params JSON``
runs one scenario and prints its result as a JSON line (``{"event": "result", ...}``);
the ``hold`` scenario instead talks with the orchestrator over stdin/stdout.
"""

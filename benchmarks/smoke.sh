#!/usr/bin/env bash
# Smoke run of the benchmark command for CI: every scenario (the four fan-out
# variants too), every implementation, tiny counts, implementations side by side
# (a minute or so on 2 cores, mostly starting processes). It checks that the
# harness still works; its numbers mean nothing and nothing here asserts a speed.
# Exit status: 0 when every run finished, 1 when any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if ! "$PY" -c "import socketio, aiohttp" 2>/dev/null; then
    "$PY" -m pip install --quiet -e ".[bench]"
fi
"$PY" -m benchmarks.inprocess --chunks 2 --per-chunk 200
"$PY" -m benchmarks.scaleout --quick
exec "$PY" -m benchmarks.run --quick --json "${BENCH_JSON:-benchmarks/results/smoke.json}" "$@"

"""The one command: every scenario, every implementation, one machine, one run.

    .venv/bin/python -m benchmarks.run [--quick] [--runs N] [--json out.json]
        [--scenarios seq,pipelined,...] [--impls rtchat,ws,rtchat-deflate,ws-deflate,sio]

Prints the machine and library versions, a Markdown table of medians with
min-max over the runs, and the targets as ratios of this run's medians;
``--json`` also writes everything (every run's raw numbers) for tools.
Within a round, implementations take turns, so background noise spreads
over all of them. ``--quick`` is a seconds-long smoke run with tiny counts.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import importlib.util
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import raise_nofile
from benchmarks.procs import IMPLS
from benchmarks.report import (
    aggregate,
    evaluate_targets,
    fanout_ratios,
    load_average,
    machine_info,
    render,
)
from benchmarks.scenarios import SCENARIOS, Scenario

__all__ = ["main"]


def _csv(text: str, known: dict[str, Any], what: str) -> list[str]:
    """Comma-separated names, each a name or a shell pattern (``fanout*``), in ``known``'s order."""
    patterns = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [p for p in patterns if not fnmatch.filter(known, p)]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    return [name for name in known if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="rtchat vs raw websockets vs python-socketio, side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run of seconds")
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per scenario (default 3; 1 quick)"
    )
    parser.add_argument(
        "--heavy-runs",
        type=int,
        default=1,
        help="runs of the long scenarios (idle10k, storm)",
    )
    parser.add_argument(
        "--scenarios",
        type=lambda s: _csv(s, SCENARIOS, "scenario"),
        default=list(SCENARIOS),
        help="comma-separated names or patterns ('fanout*'): " + ",".join(SCENARIOS),
    )
    parser.add_argument(
        "--impls",
        type=lambda s: _csv(s, IMPLS, "implementation"),
        default=[name for name, impl in IMPLS.items() if impl.default],
        help="comma-separated: "
        + ",".join(IMPLS)
        + " (rtchat-asgi and rtchat-polling* only when named)",
    )
    parser.add_argument(
        "--parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the implementations at the same time (default with --quick: faster, "
        "but the numbers then mean nothing)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each run as it ends")
    return parser


def _clean(value: Any) -> Any:
    """NaN and infinities become null, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


async def _run_one(
    scenario: Scenario, impl: str, entry: dict[str, Any], label: str, verbose: bool
) -> None:
    """One run of one scenario for one implementation; its result lands in ``entry``."""
    t0 = time.monotonic()
    try:
        result = await scenario.run(IMPLS[impl], entry["params"])
    except Exception as exc:  # one broken run must not lose the others
        result = {"error": f"{type(exc).__name__}: {exc}"}
        entry["errors"].append(result["error"])
        if verbose:
            traceback.print_exc()
    result["wall_s"] = time.monotonic() - t0
    entry["runs"].append(result)
    if verbose:
        shown = {k: v for k, v in result.items() if not isinstance(v, dict)}
        print(f"[{label} {impl}] {shown}", file=sys.stderr)


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    parallel = args.parallel if args.parallel is not None else args.quick
    started = time.monotonic()
    report: dict[str, Any] = {
        "machine": machine_info(),
        "mode": "quick" if args.quick else "full",
        "runs": runs,
        "heavy_runs": args.heavy_runs,
        "parallel": parallel,
        "impls": args.impls,
        "load_before": load_average(),
        "results": {},
    }
    for name in args.scenarios:
        scenario = SCENARIOS[name]
        params = scenario.params(args.quick)
        n = min(runs, args.heavy_runs) if scenario.heavy else runs
        by_impl: dict[str, dict[str, Any]] = {
            impl: {"params": params, "runs": [], "errors": []} for impl in args.impls
        }
        for round_no in range(n):
            label = f"{name} run {round_no + 1}/{n}"
            if parallel:
                await asyncio.gather(
                    *(
                        _run_one(scenario, impl, by_impl[impl], label, args.verbose)
                        for impl in args.impls
                    )
                )
                continue
            # Rotate who goes first, so slow drifts of the machine hit everyone alike.
            shift = round_no % len(args.impls)
            for impl in args.impls[shift:] + args.impls[:shift]:
                await _run_one(scenario, impl, by_impl[impl], label, args.verbose)
        for entry in by_impl.values():
            entry["summary"] = aggregate(entry["runs"], scenario.metrics)
        report["results"][name] = by_impl
    report["targets"] = evaluate_targets(report["results"], not (args.quick or parallel))
    report["fanout_ratios"] = fanout_ratios(report["results"])
    report["load_after"] = load_average()
    report["elapsed_s"] = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "sio" in args.impls and not all(
        importlib.util.find_spec(m) is not None for m in ("socketio", "aiohttp")
    ):
        parser.error(
            "python-socketio and aiohttp are missing: pip install -e '.[bench]' "
            "(or leave sio out with --impls)"
        )
    raise_nofile()
    report = asyncio.run(run_all(args))
    print(render(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_clean(report), indent=2) + "\n")
        print(f"\nJSON report: {args.json}")
    failed = any(
        entry["errors"] for by_impl in report["results"].values() for entry in by_impl.values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

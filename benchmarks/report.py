"""Machine details, medians over runs, the table, and the targets as ratios."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from benchmarks.procs import IMPLS, ROOT, client_cpu, server_cpu
from benchmarks.scenarios import FANOUT_SCENARIOS, SCENARIOS, Metric

__all__ = [
    "TARGETS",
    "Target",
    "aggregate",
    "evaluate_targets",
    "fanout_ratios",
    "machine_info",
    "render",
]

LIBRARIES = (
    "rtchat",
    "websockets",
    "python-socketio",
    "python-engineio",
    "aiohttp",
    "pydantic",
    "pydantic-core",
)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    versions: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "cpu_model": cpu_model or platform.processor(),
        "cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1),
        "server_cpu": server_cpu(),
        "client_cpu": client_cpu(),
        "event_loop": "asyncio (default)",
        "commit": _git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else ""),
        "libraries": versions,
    }


def _lookup(result: dict[str, Any], key: str) -> float | None:
    value: Any = result
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and not math.isnan(value):
        return float(value)
    return None


def aggregate(runs: list[dict[str, Any]], metrics: tuple[Metric, ...]) -> dict[str, Any]:
    """Median, min and max of each metric over the successful runs."""
    out: dict[str, Any] = {}
    for metric in metrics:
        values = [v for r in runs if "error" not in r if (v := _lookup(r, metric.key)) is not None]
        if values:
            out[metric.key] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "n": len(values),
            }
    return out


@dataclass(frozen=True, slots=True)
class Target:
    """A goal from the issue: ``impl``'s metric, divided by ``versus``'s if given."""

    label: str
    scenario: str
    key: str
    impl: str
    versus: str | None
    op: str
    threshold: float

    def check(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


TARGETS: tuple[Target, ...] = (
    Target(
        "sequential request/ack ≥ 0.85 x raw websockets echo",
        "seq",
        "rate",
        "rtchat",
        "ws",
        ">=",
        0.85,
    ),
    Target(
        "pipelined acked requests ≥ 0.75 x raw pipelined echo",
        "pipelined",
        "rate",
        "rtchat",
        "ws",
        ">=",
        0.75,
    ),
    Target(
        "pipelined acked requests ≥ 3 x python-socketio",
        "pipelined",
        "rate",
        "rtchat",
        "sio",
        ">=",
        3.0,
    ),
    Target(
        "fan-out deliveries/s ≥ 0.85 x raw broadcast()",
        "fanout",
        "rate",
        "rtchat",
        "ws",
        ">=",
        0.85,
    ),
    Target(
        "fan-out deliveries/s ≥ 4 x python-socketio", "fanout", "rate", "rtchat", "sio", ">=", 4.0
    ),
    Target(
        "server CPU per fan-out delivery ≤ 1.5 x raw broadcast()",
        "fanout",
        "server_cpu_us_per_op",
        "rtchat",
        "ws",
        "<=",
        1.5,
    ),
    Target(
        "server memory per idle connection ≤ 1.25 x raw websockets",
        "memory",
        "kb_per_conn",
        "rtchat",
        "ws",
        "<=",
        1.25,
    ),
    Target(
        "10,000 idle connections: requests answered within 10 ms p99",
        "idle10k",
        "probe.latency_ms.p99",
        "rtchat",
        None,
        "<=",
        10.0,
    ),
    Target(
        "10,000 idle connections: all still up, none lost",
        "idle10k",
        "healthy",
        "rtchat",
        None,
        ">=",
        1.0,
    ),
)


CPU_BOUND = ("pipelined", *FANOUT_SCENARIOS, "publish")
"""Scenarios whose rate is set by the busier process's CPU cost per operation."""


def _bottleneck_us(entry: dict[str, Any]) -> float | None:
    """Median over runs of the busier side's CPU µs per operation."""
    values = [
        max(r["server_cpu_us_per_op"], r["client_cpu_us_per_op"])
        for r in entry.get("runs", [])
        if "error" not in r
        and isinstance(r.get("server_cpu_us_per_op"), int | float)
        and isinstance(r.get("client_cpu_us_per_op"), int | float)
        and r["client_cpu_us_per_op"] > 0
    ]
    return statistics.median(values) if values else None


def cpu_estimate(by_impl: dict[str, dict[str, Any]], impl: str, versus: str) -> float | None:
    """The rate ratio the CPU costs predict: theirs / mine of the busier side's µs per op.

    On a machine shared with other work, a process gets only part of its CPU,
    so measured rates swing from run to run; CPU time per operation barely
    moves. Where the busier process is saturated, rate = 1 / its cost.
    """
    mine = _bottleneck_us(by_impl.get(impl, {}))
    theirs = _bottleneck_us(by_impl.get(versus, {}))
    if mine is None or theirs is None or mine <= 0:
        return None
    return theirs / mine


def evaluate_targets(
    results: dict[str, dict[str, dict[str, Any]]], comparable: bool
) -> list[dict[str, Any]]:
    """Each target: its value (a ratio of medians, or an absolute median) and verdict.

    Without ``comparable`` (a ``--quick`` or ``--parallel`` run) no verdict is given.
    """
    out: list[dict[str, Any]] = []
    for target in TARGETS:
        by_impl = results.get(target.scenario, {})
        mine = by_impl.get(target.impl, {}).get("summary", {}).get(target.key)
        value: float | None = None
        if mine is not None:
            if target.versus is None:
                value = mine["median"]
            else:
                theirs = by_impl.get(target.versus, {}).get("summary", {}).get(target.key)
                if theirs is not None and theirs["median"]:
                    value = mine["median"] / theirs["median"]
        estimate = None
        if target.versus is not None and target.key == "rate" and target.scenario in CPU_BOUND:
            estimate = cpu_estimate(by_impl, target.impl, target.versus)
        if not comparable:
            verdict = "n/a (smoke run)"
        elif value is None:
            verdict = "not measured"
        else:
            verdict = "MET" if target.check(value) else "MISSED"
        out.append(
            {
                "target": target.label,
                "scenario": target.scenario,
                "metric": target.key,
                "value": value,
                "cpu_estimate": estimate,
                "op": target.op,
                "threshold": target.threshold,
                "ratio": target.versus is not None,
                "verdict": verdict,
            }
        )
    return out


FANOUT_PAIRS = (("rtchat", "ws"), ("rtchat", "sio"), ("rtchat-deflate", "ws-deflate"))
"""Whose fan-out rates are compared in every fan-out variant: (impl, versus)."""


def fanout_ratios(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per fan-out variant and pair: the ratio of median deliveries/s, and the CPU estimate."""
    out: list[dict[str, Any]] = []
    for name in FANOUT_SCENARIOS:
        by_impl = results.get(name, {})
        for impl, versus in FANOUT_PAIRS:
            mine = by_impl.get(impl, {}).get("summary", {}).get("rate")
            theirs = by_impl.get(versus, {}).get("summary", {}).get("rate")
            if mine is None or theirs is None or not theirs["median"]:
                continue
            out.append(
                {
                    "scenario": name,
                    "impl": impl,
                    "versus": versus,
                    "ratio": mine["median"] / theirs["median"],
                    "cpu_estimate": cpu_estimate(by_impl, impl, versus),
                }
            )
    return out


def _render_ratios(ratios: list[dict[str, Any]]) -> list[str]:
    if not ratios:
        return []
    lines = [
        "",
        "Fan-out variants: deliveries/s as a ratio of medians (in brackets, from CPU cost per op):",
        "",
        "| variant | comparison | ratio |",
        "|---|---|---|",
    ]
    for r in ratios:
        estimate = "" if r["cpu_estimate"] is None else f" ({r['cpu_estimate']:.2f}x)"
        pair = f"{IMPLS[r['impl']].label} / {IMPLS[r['versus']].label}"
        lines.append(f"| {r['scenario']} | {pair} | {r['ratio']:.2f}x{estimate} |")
    return lines


def _cell(summary: dict[str, Any] | None, metric: Metric, runs: int) -> str:
    if summary is None:
        return "—"
    median = metric.fmt.format(summary["median"])
    if summary["n"] < 2 or summary["min"] == summary["max"]:
        return median
    return f"{median} ({metric.fmt.format(summary['min'])}-{metric.fmt.format(summary['max'])})"


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: machine, table of medians (min-max), targets."""
    machine = report["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items())
    lines = [
        f"Machine: {machine['cpu_model']}, {machine['cpus']} CPUs, {machine['memory_gb']} GB; "
        f"{machine['platform']}; {machine['python']}; {machine['event_loop']}",
        f"Pinning: servers on CPU {machine['server_cpu']}, clients on CPU {machine['client_cpu']}",
        f"Libraries: {libs}",
        f"Commit: {machine['commit']}; load average before {report['load_before']}, "
        f"after {report['load_after']}; mode: {report['mode']}; "
        f"runs: {report['runs']} (heavy scenarios: {report['heavy_runs']})"
        f"{'; implementations in PARALLEL: numbers not comparable' if report['parallel'] else ''}; "
        f"took {report['elapsed_s']:.0f} s",
        "",
    ]
    # Before, not after: during the run our own two busy processes make a load of ~2.
    busy = report["load_before"][0] if report["load_before"] else 0.0
    if busy > 0.5:
        lines[-1:-1] = [
            f"WARNING: the machine was busy (1-minute load average {busy:.2f} before the run): "
            "other work shared the CPUs, so rates are low and noisy; CPU time per operation "
            "and memory are the steadier numbers.",
        ]
    impls = report["impls"]
    header = "| scenario | metric | " + " | ".join(IMPLS[i].label for i in impls) + " |"
    lines += [header, "|" + "---|" * (len(impls) + 2)]
    for name, by_impl in report["results"].items():
        scenario = SCENARIOS[name]
        for index, metric in enumerate(scenario.metrics):
            cells = []
            for impl in impls:
                entry = by_impl.get(impl)
                if entry is None:
                    cells.append("—")
                    continue
                if not entry["summary"] and entry["errors"]:
                    cells.append("error")
                    continue
                cells.append(_cell(entry["summary"].get(metric.key), metric, len(entry["runs"])))
            title = scenario.title if index == 0 else ""
            lines.append(f"| {title} | {metric.label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: median of the runs (min-max). Targets, from the medians of this run; "
        "'from CPU cost per op' is the ratio the busier process's CPU time per operation "
        "predicts, steadier than rates on a shared machine (verdicts use the rates):",
        "",
    ]
    lines += [
        "| target | value | from CPU cost per op | verdict |",
        "|---|---|---|---|",
    ]
    for t in report["targets"]:
        value = t["value"]
        if value is None:
            shown = "—"
        elif t["ratio"]:
            shown = f"{value:.2f}x (needs {t['op']} {t['threshold']:g}x)"
        else:
            shown = f"{value:,.2f} (needs {t['op']} {t['threshold']:g})"
        estimate = t.get("cpu_estimate")
        shown_estimate = "—" if estimate is None else f"{estimate:.2f}x"
        lines.append(f"| {t['target']} | {shown} | {shown_estimate} | {t['verdict']} |")
    lines += _render_ratios(report.get("fanout_ratios", []))
    errors = [
        f"- {name}/{impl}: {err}"
        for name, by_impl in report["results"].items()
        for impl, entry in by_impl.items()
        for err in entry["errors"]
    ]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)

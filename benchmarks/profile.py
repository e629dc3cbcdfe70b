"""Profile one scenario's server and/or client process with py-spy.

    .venv/bin/python -m benchmarks.profile fanout [--impl rtchat] [--target server,client]
        [--seconds 8] [--rate 200] [--out benchmarks/results/profiles] [--top 25]

Runs the scenario as ``benchmarks.run`` does (same programs, same pinning),
with ``py-spy record`` attached to the chosen processes for the measured
part, and prints for each the functions that hold the CPU: by self time
(where the samples land) and by inclusive time (what they were called
from). The collapsed stacks are kept in ``--out`` for flame graphs
(``py-spy``'s raw format: one ``frame;frame;... count`` line per stack).
Needs ``py-spy`` (in the ``bench`` extra) and permission to ptrace.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import raise_nofile
from benchmarks.procs import IMPLS, ROOT, ClientProcess, SingleNode
from benchmarks.scenarios import FANOUT_SCENARIOS, SCENARIOS, _idle

__all__ = ["main", "summarize"]

PROFILABLE = ("seq", "pipelined", *FANOUT_SCENARIOS, "publish", "idle10k")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    """``func (path/to/module.py)`` -> ``module.py:func`` with the package kept."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    parts = Path(path).parts
    for anchor in ("site-packages", "python3.11", "lib"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + 1 :]
            break
    return f"{'/'.join(parts[-2:])}:{m.group('func')}"


def summarize(raw: str, top: int) -> dict[str, Any]:
    """Self and inclusive sample shares per function, from py-spy's raw output."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            incl_counts[name] += count

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, n / total) for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "self": share(self_counts), "inclusive": share(incl_counts)}


def _print(title: str, summary: dict[str, Any]) -> None:
    print(f"\n## {title}: {summary['samples']} samples (CPU only, idle excluded)\n")
    print("self time:")
    for name, frac in summary["self"]:
        print(f"  {frac:6.1%}  {name}")
    print("inclusive time:")
    for name, frac in summary["inclusive"]:
        print(f"  {frac:6.1%}  {name}")


async def _spy(pid: int, seconds: float, rate: int, output: Path) -> asyncio.subprocess.Process:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return await asyncio.create_subprocess_exec(
        pyspy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--nolineno",
        "--nonblocking",
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def profile_idle(args: argparse.Namespace) -> int:
    """The server while it holds the idle connections and answers the probe."""
    impl = IMPLS[args.impl]
    params = SCENARIOS["idle10k"].params(quick=False)
    params["hold_seconds"] = args.seconds
    params["baseline_seconds"] = 0
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"idle10k-{args.impl}-server.txt"

    async def observe(pid: int, seconds: float) -> None:
        spy = await _spy(pid, seconds, args.rate, out)
        try:
            await spy.communicate()
        finally:
            if spy.returncode is None:
                spy.kill()
                await spy.wait()

    result = await _idle(impl, params, observe)
    if out.exists():
        _print(f"{args.impl} idle10k, server", summarize(out.read_text(), args.top))
    probe = result.get("probe", {}).get("latency_ms", {})
    gc_hold = {k: v for k, v in result.items() if k.startswith("gc_hold")}
    print(f"\nprobe latency during the profile (ms): {probe}\nGC during it: {gc_hold}")
    return 0


async def profile(args: argparse.Namespace) -> int:
    if args.scenario == "idle10k":
        return await profile_idle(args)
    impl = IMPLS[args.impl]
    scenario = SCENARIOS[args.scenario]
    params = scenario.params(quick=False)
    params["seconds"] = args.seconds
    args.out.mkdir(parents=True, exist_ok=True)
    deployment = SingleNode(impl)
    client: ClientProcess | None = None
    spies: list[tuple[str, Path, asyncio.subprocess.Process]] = []
    try:
        await deployment.start()
        client = ClientProcess(
            impl, scenario.client or args.scenario, deployment.urls[0], deployment.pids[0], params
        )
        await client.start()
        assert client.proc is not None
        # Let connections and warm-up happen first, then sample the measured part.
        await asyncio.sleep(args.delay)
        targets = {"server": deployment.pids[0], "client": client.proc.pid}
        for name in args.target:
            out = args.out / f"{args.scenario}-{args.impl}-{name}.txt"
            spy = await _spy(targets[name], args.seconds - args.delay, args.rate, out)
            spies.append((name, out, spy))
        result = await client.event(args.seconds + 120, "result")
        for name, out, spy in spies:
            _, err = await spy.communicate()
            if spy.returncode != 0 or not out.exists():
                print(f"py-spy on the {name} failed: {err.decode(errors='replace')}")
                continue
            _print(f"{args.impl} {args.scenario}, {name}", summarize(out.read_text(), args.top))
            shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
            print(f"  (collapsed stacks: {shown})")
        rate = float(result.get("rate", float("nan")))
        print(f"\nrate during the profile: {rate:,.0f}/s (py-spy slows it)")
        return 0
    finally:
        for _, _, spy in spies:
            if spy.returncode is None:
                spy.kill()
                await spy.wait()
        if client is not None:
            await client.stop(10)
        await deployment.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile",
        description="Profile a scenario's server and client with py-spy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("scenario", choices=PROFILABLE)
    parser.add_argument("--impl", choices=list(IMPLS), default="rtchat")
    parser.add_argument(
        "--target",
        type=lambda s: [t for t in s.split(",") if t],
        default=["server", "client"],
        help="comma-separated: server, client",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="scenario length")
    parser.add_argument("--delay", type=float, default=2.0, help="seconds before sampling")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "profiles")
    args = parser.parse_args(argv)
    if any(t not in ("server", "client") for t in args.target):
        parser.error("--target takes server, client or both")
    if args.delay >= args.seconds:
        parser.error("--delay must be shorter than --seconds")
    raise_nofile()
    return asyncio.run(profile(args))


if __name__ == "__main__":
    sys.exit(main())

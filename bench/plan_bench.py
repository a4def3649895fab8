"""How fast does `retool plan` start, next to a bare interpreter?

Runs `python -c pass` and `python -m reconciler.cli plan SPEC` alternately (so machine
load hits both alike), drops warm-up runs, and prints median/min/max wall times and the
ratio of medians (target: plan ≤ 6× bare Python). Until the CLI exists it times the same
work through the library: load the spec, make the plan, render it.

    python bench/plan_bench.py [--runs 21] [--spec specs/retool-qwen7b.yaml] [--check] [--baseline DIR]

`--baseline DIR` also times the CLI of another checkout (e.g. `git worktree add /tmp/base main`)
in the same interleaved loop, on the same spec, so a change is measured side by side with
what it changes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 6.0

LIBRARY_PLAN = (
    "import sys\n"
    "from reconciler.loader import load_spec\n"
    "from reconciler.plan import Observed, make_plan\n"
    "from reconciler.cli.plan_view import plan_text\n"
    "sys.stdout.write(plan_text(make_plan(load_spec(sys.argv[1]).spec, None, Observed(refreshed=False))))\n"
)


def plan_command(spec: str, env: dict[str, str]) -> tuple[str, list[str]]:
    """The CLI when it exists and can plan this spec here; else the library path."""
    library = ("plan via library", [sys.executable, "-c", LIBRARY_PLAN, spec])
    if importlib.util.find_spec("reconciler.cli") is None:
        return library
    cli = [sys.executable, "-m", "reconciler.cli", "plan", spec]
    probe = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        first = (probe.stderr or probe.stdout).strip().splitlines()[:1]
        print(f"note: `retool plan {spec}` exits {probe.returncode} here ({first[0] if first else 'no output'});"
              " timing the same work through the library instead\n")
        return library
    return "retool plan (CLI)", cli


def time_once(argv: list[str], env: dict[str, str], cwd: Path = REPO) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=21, help="timed runs of each command (after 2 warm-ups)")
    parser.add_argument("--spec", default="specs/retool-qwen7b.yaml")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when the ratio exceeds {TARGET_RATIO:g}×")
    parser.add_argument("--baseline", metavar="DIR", help="another checkout whose CLI is timed alongside")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # time with cached bytecode
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH", "")])])
    label, plan_argv = plan_command(args.spec, env)
    commands = {"python -c pass": [sys.executable, "-c", "pass"], label: plan_argv}
    envs = {name: env for name in commands}
    cwds = {name: REPO for name in commands}
    if args.baseline is not None:
        base = Path(args.baseline).resolve()
        if not (base / "reconciler" / "cli" / "__main__.py").exists():
            sys.exit(f"--baseline {base}: not a retool checkout (no reconciler/cli/__main__.py)")
        commands["baseline (CLI)"] = [sys.executable, "-m", "reconciler.cli", "plan", str(REPO / args.spec)]
        envs["baseline (CLI)"] = {**env, "PYTHONPATH": str(base)}
        cwds["baseline (CLI)"] = base  # `python -m` puts the working directory first on sys.path
    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(args.runs + 2):
        for name, argv in commands.items():  # interleaved: all see the same load
            t = time_once(argv, envs[name], cwds[name])
            if i >= 2:
                times[name].append(t)

    print(f"{'command':<22} {'median ms':>10} {'min ms':>8} {'max ms':>8}  ({args.runs} runs each, interleaved)")
    for name, ts in times.items():
        print(f"{name:<22} {statistics.median(ts) * 1000:>10.1f} {min(ts) * 1000:>8.1f} {max(ts) * 1000:>8.1f}")
    bare = statistics.median(times["python -c pass"])
    ratio = statistics.median(times[label]) / bare
    verdict = "within" if ratio <= TARGET_RATIO else "over"
    print(f"ratio (median plan / median bare python): {ratio:.1f}×  — {verdict} the {TARGET_RATIO:g}× target")
    if "baseline (CLI)" in times:
        base_ratio = statistics.median(times["baseline (CLI)"]) / bare
        speedup = statistics.median(times["baseline (CLI)"]) / statistics.median(times[label])
        print(f"baseline: {base_ratio:.1f}× bare python; this checkout is {speedup:.2f}× as fast")
    if args.check and ratio > TARGET_RATIO:
        sys.exit(1)


if __name__ == "__main__":
    main()

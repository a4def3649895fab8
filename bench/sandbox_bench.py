"""Load test: our sandbox against the seed-like baseline, side by side in one invocation.

    python bench/sandbox_bench.py            # full: 500 requests a cell, 2000 at concurrency 64
    python bench/sandbox_bench.py --quick    # a smoke run (about a minute)
    python bench/sandbox_bench.py --markdown # also print the table as Markdown

Starts `python -m sandbox.server` (default settings: one worker per CPU) and
`bench/baseline_sandbox.py` on free loopback ports, then for each workload (print(1), a numpy
computation, sympy.factor) and each concurrency drives N requests through an
httpx.AsyncClient. The two servers take turns, in up to four rounds per cell, so a change in
the machine's load (other jobs share it) hits both alike. A request counts as an error unless
it returns HTTP 200, status Success and exactly the expected stdout; a response that never
arrives is counted as lost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sandbox.client import wait_ready
from sandbox.testing import free_port

WORKLOADS = {
    "print": "print(1)",
    "numpy": (
        "import numpy as np\n"
        "a = np.random.default_rng(0).random((120, 120))\n"
        "print(round(float(np.linalg.eigvalsh(a @ a.T).max()), 6))"
    ),
    "sympy": "import sympy\nx = sympy.symbols('x')\nprint(sympy.factor(x**12 - 1))",
}


@dataclass
class Cell:
    workload: str
    concurrency: int
    server: str
    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    lost: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # what went wrong, by kind

    def add(self, requests: int, seconds: float, latencies: list[float], errors: int, lost: int,
            failures: dict[str, int]) -> None:
        self.requests += requests
        self.seconds += seconds
        self.latencies += latencies
        self.errors += errors
        self.lost += lost
        for kind, count in failures.items():
            self.failures[kind] = self.failures.get(kind, 0) + count

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@contextmanager
def started(name: str, command: list[str]) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(command + ["--port", str(port)], cwd=REPO, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=180)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def expected_outputs() -> dict[str, str]:
    """Each workload's stdout, from a plain local interpreter."""
    return {
        name: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for name, code in WORKLOADS.items()
    }


async def drive(
    url: str, code: str, expected: str, concurrency: int, total: int
) -> tuple[float, list[float], int, int, dict[str, int]]:
    """`total` requests at `concurrency`: (seconds, latencies, errors, lost, failures by kind)."""
    body = {"code": code, "language": "python", "run_timeout": 60, "memory_limit_MB": 1024}
    latencies: list[float] = []
    failures: dict[str, int] = {}
    errors = 0
    answered = 0
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=180) as client:

        async def worker() -> None:
            nonlocal errors, answered, next_index
            while next_index < total:
                next_index += 1
                start = time.perf_counter()
                try:
                    response = await client.post(url + "/run_code", json=body)
                except httpx.HTTPError as exc:
                    errors += 1
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    continue
                answered += 1
                latencies.append(time.perf_counter() - start)
                data = response.json() if response.status_code == 200 else {}
                if data.get("status") != "Success" or (data.get("run_result") or {}).get("stdout") != expected:
                    errors += 1
                    kind = f"HTTP {response.status_code} {data.get('status', '')}".strip()
                    failures[kind] = failures.get(kind, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return seconds, latencies, errors, total - answered, failures


def run_pair(
    urls: dict[str, str], workload: str, expected: str, concurrency: int, counts: dict[str, int], rounds: int
) -> list[Cell]:
    """Both servers on one cell, in alternating rounds, so a change in the machine's load
    (other jobs share it) hits both sides alike."""
    cells = {name: Cell(workload, concurrency, name) for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            n = counts[name] // rounds
            cells[name].add(n, *asyncio.run(drive(url, WORKLOADS[workload], expected, concurrency, n)))
    for cell in cells.values():
        print(
            f"  {workload:6} c={concurrency:<3} {cell.server:8} n={cell.requests:<5} {cell.throughput:8.1f} req/s  "
            f"p50 {cell.percentile(0.5):8.1f} ms  p99 {cell.percentile(0.99):8.1f} ms  "
            f"errors {cell.errors}  lost {cell.lost}" + (f"  {cell.failures}" if cell.failures else ""),
            flush=True,
        )
    return list(cells.values())


def table(cells: list[Cell], markdown: bool) -> str:
    header = ["workload", "conc.", "server", "requests", "req/s", "p50 ms", "p99 ms", "errors", "lost", "× baseline"]
    baseline = {(c.workload, c.concurrency): c.throughput for c in cells if c.server == "baseline"}
    rows = []
    for c in cells:
        base = baseline.get((c.workload, c.concurrency))
        ratio = f"{c.throughput / base:.1f}×" if c.server == "retool" and base else ""
        rows.append([
            c.workload, str(c.concurrency), c.server, str(c.requests), f"{c.throughput:.1f}",
            f"{c.percentile(0.5):.1f}", f"{c.percentile(0.99):.1f}", str(c.errors), str(c.lost), ratio,
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [header] + rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--requests", type=int, default=None, help="requests per cell for our server")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    workloads = [w for w in args.workloads.split(",") if w]
    ours_n = args.requests or (100 if args.quick else 500)
    expected = expected_outputs()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    cells: list[Cell] = []
    with ExitStack() as stack:
        ours = stack.enter_context(started("retool", [sys.executable, "-m", "sandbox.server"]))
        base = stack.enter_context(started("baseline", [sys.executable, str(REPO / "bench" / "baseline_sandbox.py")]))
        urls = {"retool": ours, "baseline": base}
        run_pair(urls, "print", expected["print"], 2, {"retool": 4, "baseline": 4}, 1)  # warm-up, not reported
        for workload in workloads:
            for concurrency in levels:
                n = max(ours_n, 2000) if concurrency == 64 and not args.quick else ours_n
                base_n = max(2 * concurrency, 16 if args.quick else 40)
                rounds = max(1, min(4, base_n // concurrency))  # every round keeps `concurrency` busy
                counts = {"retool": n, "baseline": base_n}
                cells += run_pair(urls, workload, expected[workload], concurrency, counts, rounds)
    print(f"load average {os.getloadavg()[0]:.1f} at end\n")
    print(table(cells, markdown=False))
    if args.markdown:
        print()
        print(table(cells, markdown=True))


if __name__ == "__main__":
    main()

"""The sandbox under RL-like load: does load change any program's result, and how fast is it?

    python bench/sandbox_load.py                          # concurrency 1, 32, 128, 256; configs old and new
    python bench/sandbox_load.py --configs old,single,new --markdown
    python bench/sandbox_load.py --concurrency 1,32 --rounds 1   # a quick look

Replays the generated corpus (bench/corpus/sandbox_load.jsonl, `bench/make_sandbox_corpus.py`:
sympy, numpy, loops, prints, errors, time limits) against real servers started here on
loopback, one per configuration, all up at once and taking turns cell by cell so a change in
the machine's load hits each alike:

- `old`: the configuration before issue 22 - one server process, and the old client: HTTP
  timeout = run timeout + 10 s whatever the queue (verl's rule), a 503 retried 5 times.
- `single`: one server process, today's client (`sandbox.client`: waiting for a worker is
  bounded by `queue_timeout`, not by the run timeout).
- `new`: today's defaults - one server process per 8 workers (`sandbox.supervisor`), today's client.
- `p<N>` (e.g. `p4`): N server processes, today's client.

First each program runs alone (one call at a time) on each server - the servers do this side
by side, each still seeing one call at a time: that is its reference result. Then, at each concurrency C, C callers replay the corpus (cycled, so a cell has at
least 2*C calls, in a fixed shuffled order) and each call's result is compared with its
program's reference: status, run status, exit code, stdout and stderr (execution time
aside; the script's own path in tracebacks is normalised). `changed` counts calls whose
result differs (lost and not-started calls included), `lost` calls with no HTTP answer,
`not started` calls answered "queue timeout" (`SandboxNotStartedError`). Throughput counts
the calls answered with a program's result (not lost, not "not started") per second of the
cell's wall time; p50/p99 are per-call latencies (queueing included; a lost call's latency is
the time its caller waited before giving up).
Ratios compare each configuration with the first one (`old`) in the same cell.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sandbox.client import HTTP_MARGIN_S, run_code_async  # noqa: E402
from sandbox.errors import SandboxError, SandboxNotStartedError  # noqa: E402
from sandbox.testing import local_server  # noqa: E402

CORPUS = REPO / "bench" / "corpus" / "sandbox_load.jsonl"
CONFIGS = {  # name -> (server settings, client)
    "old": ({"processes": 1}, "old"),
    "single": ({"processes": 1}, "new"),
    "new": ({}, "new"),
}
OLD_BUSY_RETRIES = 5
_SCRIPT_PATH = re.compile(r'File "[^"]*main\.py"')

Outcome = tuple[Any, ...]


@dataclass
class Cell:
    config: str
    concurrency: int
    calls: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    changed: int = 0
    lost: int = 0
    not_started: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Calls answered with their program's result, per second (a lost call is no answer)."""
        answered = self.calls - self.lost - self.not_started
        return answered / self.seconds if self.seconds else float("nan")

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def config(name: str) -> tuple[dict[str, Any], str]:
    match = re.fullmatch(r"p(\d+)", name)
    if match:
        return {"processes": int(match.group(1))}, "new"
    return CONFIGS[name]


def load_corpus() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


def outcome_of(data: dict[str, Any]) -> Outcome:
    run = data.get("run_result") or {}
    stderr = _SCRIPT_PATH.sub('File "main.py"', run.get("stderr") or "")
    return (data.get("status"), run.get("status"), run.get("return_code"), run.get("stdout"), stderr)


async def call_new(client: httpx.AsyncClient, url: str, program: dict[str, Any]) -> Outcome:
    try:
        response = await run_code_async(url, program["code"], timeout=program["run_timeout"], client=client)
    except SandboxNotStartedError:
        return ("not started",)
    except SandboxError as exc:
        return ("lost", exc.summary)
    return outcome_of(response.model_dump(mode="json"))


async def call_old(client: httpx.AsyncClient, url: str, program: dict[str, Any]) -> Outcome:
    """The client before issue 22: the HTTP timeout is the run timeout + 10 s, queueing or not."""
    timeout = program["run_timeout"]
    body = {"code": program["code"], "language": "python", "compile_timeout": timeout, "run_timeout": timeout,
            "memory_limit_MB": 1024, "stdin": None, "files": {}, "fetch_files": []}
    for attempt in range(OLD_BUSY_RETRIES + 1):
        try:
            response = await client.post(url + "/run_code", json=body, timeout=timeout + HTTP_MARGIN_S)
        except httpx.HTTPError as exc:
            return ("lost", type(exc).__name__)
        if response.status_code == 503 and attempt < OLD_BUSY_RETRIES:
            await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            continue
        if response.status_code != 200:
            return ("lost", f"HTTP {response.status_code}")
        return outcome_of(response.json())
    raise AssertionError("unreachable")


async def replay(
    url: str, client_kind: str, programs: list[dict[str, Any]], concurrency: int
) -> tuple[float, list[tuple[str, Outcome, float]]]:
    """Run `programs` with `concurrency` callers; (seconds, [(id, outcome, latency)])."""
    call = call_new if client_kind == "new" else call_old
    results: list[tuple[str, Outcome, float]] = []
    queue = list(reversed(programs))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:

        async def caller() -> None:
            while queue:
                program = queue.pop()
                start = time.perf_counter()
                outcome = await call(client, url, program)
                results.append((program["id"], outcome, time.perf_counter() - start))

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return time.perf_counter() - start, results


def cell_programs(corpus: list[dict[str, Any]], concurrency: int, seed: int) -> list[dict[str, Any]]:
    count = max(len(corpus), 2 * concurrency)
    programs = [corpus[i % len(corpus)] for i in range(count)]
    random.Random(seed).shuffle(programs)
    return programs


@contextmanager
def servers(configs: list[str], workers: int | None) -> Iterator[dict[str, str]]:
    with ExitStack() as stack:
        urls = {}
        for name in configs:
            settings = dict(config(name)[0])
            if workers is not None:
                settings["workers"] = workers
            urls[name] = stack.enter_context(local_server(ready_timeout=300, **settings)).url
        yield urls


def describe(urls: dict[str, str]) -> dict[str, str]:
    out = {}
    for name, url in urls.items():
        health = httpx.get(url + "/health", timeout=10).json()
        out[name] = f"{health['pool_size']} workers, {health['processes']} process(es), {config(name)[1]} client"
    return out


def run(args: argparse.Namespace) -> list[Cell]:
    corpus = load_corpus()
    by_id = {p["id"]: p for p in corpus}
    configs = args.configs
    cells: list[Cell] = []
    with servers(configs, args.workers) as urls:
        print(f"corpus: {len(corpus)} programs ({', '.join(sorted({p['kind'] for p in corpus}))}); cpus: {os.cpu_count()}")
        for name, text in describe(urls).items():
            print(f"  {name}: {text}")
        references: dict[str, dict[str, Outcome]] = {}
        start = time.perf_counter()
        alone = asyncio.run(_gather(*(replay(url, "new", corpus, 1) for url in urls.values())))
        print(f"each program alone on each server: {time.perf_counter() - start:.0f} s")
        for name, (_, results) in zip(urls, alone):  # each program alone: its reference result there
            references[name] = {pid: outcome for pid, outcome, _ in results}
            bad = [pid for pid, outcome in references[name].items() if outcome[0] in ("lost", "not started")]
            if bad:
                sys.exit(f"{name}: no answer alone for {bad}")
        for concurrency in args.concurrency:
            programs = cell_programs(corpus, concurrency, seed=concurrency)
            row = {name: Cell(name, concurrency) for name in configs}
            for _ in range(args.rounds):
                for name, url in urls.items():
                    seconds, results = asyncio.run(replay(url, config(name)[1], programs, concurrency))
                    cell = row[name]
                    cell.seconds += seconds
                    for pid, outcome, latency in results:
                        cell.calls += 1
                        cell.latencies.append(latency)
                        cell.lost += outcome[0] == "lost"
                        cell.not_started += outcome[0] == "not started"
                        if outcome != references[name][pid]:
                            cell.changed += 1
                            if len(cell.examples) < 3:
                                cell.examples.append(f"{pid} ({by_id[pid]['kind']}): {str(outcome)[:160]}")
            cells += row.values()
            print_table(cells, configs, markdown=False)
        for name, url in urls.items():  # faults of the sandbox itself, if any, show here
            health = httpx.get(url + "/health", timeout=10).json()
            counters = ("executions", "timeouts", "errors", "queue_timeouts", "rejected", "zygote_restarts", "leftovers_killed")
            print(f"  {name} /health: " + ", ".join(f"{k} {health[k]}" for k in counters))
    return cells


async def _gather(*tasks: Any) -> list[Any]:
    return list(await asyncio.gather(*tasks))


def print_table(cells: list[Cell], configs: list[str], markdown: bool) -> None:
    head = ["config", "conc.", "calls", "changed", "lost", "not started", "answers/s", "p50 ms", "p99 ms",
            f"answers/s vs {configs[0]}", f"p99 vs {configs[0]}"]
    base = {c.concurrency: c for c in cells if c.config == configs[0]}
    rows = []
    for c in cells:
        b = base[c.concurrency]
        rows.append([
            c.config, str(c.concurrency), str(c.calls), str(c.changed), str(c.lost), str(c.not_started),
            f"{c.throughput:.1f}", f"{c.percentile(0.5):.0f}", f"{c.percentile(0.99):.0f}",
            f"{c.throughput / b.throughput:.2f}x" if b.throughput else "-", f"{c.percentile(0.99) / b.percentile(0.99):.2f}x",
        ])
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---:" if i > 0 else "---" for i in range(len(head))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        print()
        for r in [head, *rows]:
            print("  ".join(x.rjust(w) for x, w in zip(r, widths)))
    for c in cells:
        for example in c.examples:
            print(f"  changed ({c.config}, {c.concurrency}): {example}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,32,128,256", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--configs", default="old,new", type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--workers", type=int, default=None, help="workers per server (default: the CPU count)")
    parser.add_argument("--rounds", type=int, default=1, help="replays of each cell per configuration")
    parser.add_argument("--markdown", action="store_true", help="print the final table as Markdown too")
    args = parser.parse_args()
    unknown = [c for c in args.configs if c not in CONFIGS and not re.fullmatch(r"p\d+", c)]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    started = time.perf_counter()
    cells = run(args)
    print(f"\nwall time {time.perf_counter() - started:.0f} s; command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}")
    if args.markdown:
        print()
        print_table(cells, args.configs, markdown=True)


if __name__ == "__main__":
    main()

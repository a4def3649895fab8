"""Soak: mixed RL-like load against one server on loopback for a bounded time (marker `soak`,
excluded from the default run).

    python -m pytest -m soak tests/sandbox/test_sandbox_soak.py -s -p no:cacheprovider
    RETOOL_SOAK_SECONDS=120 python -m pytest -m soak ...     # shorter (default 1200 s = 20 min)
    RETOOL_SOAK_REPORT=soak.json ...                          # also write the numbers as JSON

Bursts of 128 concurrent requests - sympy and numpy code (the bulk, as in ReTool's rollouts),
prints, timeouts, memory bombs, fork bombs, output floods, files written to absolute paths and
fetched - until the time is up. Then: zero lost responses (every request got HTTP 200 with the
outcome its program must have, or - counted apart - a time-out when the machine starves it), zero leaked processes (no process of the server's execution
uids; the server's tree is exactly server + zygote + one forker and one prepared program per
slot), zero leaked files (every slot's upper layer is back to its skeleton; nothing reached the
host; the workspace is removed at exit), and the server's RSS flat (start vs end, printed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox.testing import local_server
from tests.sandbox.test_sandbox_lifetime import process_tree, wait_all_gone

pytestmark = pytest.mark.soak

UID_BASE = 1_620_000  # its own range: a concurrent test server is never counted
BURST = 128
OUTPUT_CAP = 65536
RSS_GROWTH_LIMIT_KB = 64 * 1024  # "flat": RSS may wobble with the allocator, not grow with the load


@dataclass(frozen=True)
class Kind:
    name: str
    code: str
    weight: int
    fields: dict[str, Any] = field(default_factory=dict)


MARK = uuid.uuid4().hex[:12]
KINDS = [
    Kind("sympy", "import sympy\nx = sympy.symbols('x')\nprint(sympy.factor(x**12 - 1))", 40),
    Kind("numpy", "import numpy as np\na = np.arange(10000.0).reshape(100, 100)\nprint(int(np.trace(a @ a.T)))", 32),
    Kind("print", "print(1)", 12),
    Kind("timeout", "while True:\n    pass", 12, {"run_timeout": 1}),
    Kind("memory_bomb", "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))", 8,
         {"memory_limit_MB": 256}),
    Kind("fork_bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", 4,
         {"run_timeout": 2}),
    Kind("output_flood", "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(64):\n    sys.stdout.write(chunk)", 8),
    Kind("files", f"open('/mnt/soak-{MARK}', 'w').write(open('/opt/in-{MARK}').read() * 2)\nprint('ok')", 12,
         {"files": {f"/opt/in-{MARK}": base64.b64encode(b"ab").decode()}, "fetch_files": [f"/mnt/soak-{MARK}"]}),
]
SYMPY_OUT = "(x - 1)*(x + 1)*(x**2 + 1)*(x**2 - x + 1)*(x**2 + x + 1)*(x**4 - x**2 + 1)\n"


def expected(kind: Kind, body: dict[str, Any]) -> str:
    """'' when `body` is the outcome this kind's program must have, else what is wrong."""
    result = body.get("run_result") or {}
    status, run_status, stdout = body.get("status"), result.get("status"), result.get("stdout", "")
    checks = {
        "sympy": status == "Success" and stdout == SYMPY_OUT,
        "numpy": status == "Success" and stdout == "333283335000\n",
        "print": status == "Success" and stdout == "1\n",
        "timeout": (status, run_status) == ("Failed", "TimeLimitExceeded"),
        "memory_bomb": (status, run_status) == ("Failed", "Finished") and "MemoryError" in result.get("stderr", ""),
        "fork_bomb": status == "Failed",
        "output_flood": status == "Success" and stdout.startswith("x" * OUTPUT_CAP) and "more bytes not shown" in stdout,
        "files": status == "Success" and body.get("files") == {f"/mnt/soak-{MARK}": base64.b64encode(b"abab").decode()},
    }
    if checks[kind.name]:
        return ""
    if (status, run_status) == ("Failed", "TimeLimitExceeded"):
        return "timed out"  # starved of CPU on a loaded machine: an outcome, not a loss
    return f"{kind.name}: {json.dumps(body)[:300]}"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def uid_processes(first: int, last: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
            except (OSError, StopIteration, ValueError):
                continue
            if first <= uid <= last:
                found.append(int(name))
    return found


@dataclass
class Tally:
    sent: int = 0
    lost: int = 0
    wrong: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    timed_out: dict[str, int] = field(default_factory=dict)  # beyond the kinds that must time out


async def burst(client: httpx.AsyncClient, url: str, tally: Tally, rng: random.Random) -> None:
    kinds = rng.choices(KINDS, weights=[k.weight for k in KINDS], k=BURST)

    async def one(kind: Kind) -> None:
        body = {"code": kind.code, "language": "python", "run_timeout": 10, "memory_limit_MB": 1024, **kind.fields}
        start = time.monotonic()
        try:
            response = await client.post(url + "/run_code", json=body, timeout=600)
        except httpx.HTTPError as exc:
            tally.lost += 1
            tally.wrong.append(f"{kind.name}: no response ({exc!r})")
            return
        tally.latencies.setdefault(kind.name, []).append(time.monotonic() - start)
        if response.status_code != 200:
            tally.wrong.append(f"{kind.name}: HTTP {response.status_code} {response.text[:200]}")
            return
        problem = expected(kind, response.json())
        if problem == "timed out":
            tally.timed_out[kind.name] = tally.timed_out.get(kind.name, 0) + 1
        elif problem:
            tally.wrong.append(problem)

    tally.sent += len(kinds)
    await asyncio.gather(*(one(kind) for kind in kinds))


def test_soak(tmp_path: Path) -> None:
    seconds = float(os.environ.get("RETOOL_SOAK_SECONDS", "1200"))
    work_root = Path("/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)) / f"retool-soak-{MARK}"
    tally = Tally()
    rng = random.Random(0)
    with local_server(uid_base=UID_BASE, max_output_bytes=OUTPUT_CAP, max_queue=4 * BURST, work_root=str(work_root)) as server:
        health = httpx.get(server.url + "/health").json()
        pool = health["pool_size"]
        uids = (UID_BASE, UID_BASE + 256 * 4096)
        started = time.monotonic()

        async def drive() -> tuple[int, int, list[int]]:
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=BURST)) as client:
                await burst(client, server.url, tally, rng)  # warm-up: allocator and caches settle
                rss_start = rss_kb(server.pid)
                samples = [rss_start]
                while time.monotonic() - started < seconds:
                    await burst(client, server.url, tally, rng)
                    samples.append(rss_kb(server.pid))
                return rss_start, rss_kb(server.pid), samples

        rss_start, rss_end, samples = asyncio.run(drive())
        elapsed = time.monotonic() - started
        time.sleep(2)  # the last slots settle and prepare their next program
        tree = process_tree(server.pid)
        report = {
            "seconds": round(elapsed, 1), "requests": tally.sent, "lost": tally.lost, "wrong": len(tally.wrong),
            "pool_size": pool, "rss_start_kb": rss_start, "rss_end_kb": rss_end, "rss_max_kb": max(samples),
            "latency_p50_s": {k: round(statistics.median(v), 3) for k, v in sorted(tally.latencies.items())},
            "latency_max_s": {k: round(max(v), 3) for k, v in sorted(tally.latencies.items())},
            "server_tree": len(tree), "load_average": os.getloadavg(),
            "counters": {k: v for k, v in httpx.get(server.url + "/health").json().items()
                         if k in ("executions", "timeouts", "errors", "rejected", "leftovers_killed", "zygote_restarts")},
        }
        uppers = [p for p in work_root.glob("server-*/slot-*/upper")]
        leftovers = {str(p): sorted(str(q.relative_to(p)) for q in p.rglob("*") if q.is_file()) for p in uppers}
        report["files_left_in_uppers"] = sum(len(v) for v in leftovers.values())
        report["uid_processes"] = len(uid_processes(*uids))
        report["problems"] = tally.wrong[:5]
        report["timed_out_under_load"] = tally.timed_out
        print("\nsoak report:", json.dumps(report, indent=1))
        if os.environ.get("RETOOL_SOAK_REPORT"):
            Path(os.environ["RETOOL_SOAK_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
        assert tally.lost == 0
        assert tally.wrong == [], tally.wrong[:10]
        assert report["uid_processes"] == 0  # nothing of any program is left running
        assert len(tree) == 2 + 2 * pool, tree  # server, zygote, a forker and a prepared program per slot
        assert report["files_left_in_uppers"] == 0, leftovers
        assert not Path(f"/mnt/soak-{MARK}").exists() and not Path(f"/opt/in-{MARK}").exists()
        assert rss_end - rss_start < RSS_GROWTH_LIMIT_KB, report
    assert wait_all_gone(tree) == []
    assert not any(work_root.glob("server-*"))  # the workspace went with the server
    shutil.rmtree(work_root)  # what is left is the uid-block locks of this test's own work root

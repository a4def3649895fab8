"""Waiting for a worker is not run time: a queued call gets the result it would get alone, and
a call that cannot start within its own queue bound gets an error that says so (distinct from
a program's time limit). Real servers on loopback; no timing thresholds: the cases are built so
that the queued call must wait longer than its run timeout (or its bound) by construction."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from sandbox.client import run_code
from sandbox.errors import SandboxNotStartedError
from sandbox.models import QUEUE_TIMEOUT_PREFIX, RunCodeResponse
from sandbox.pool import QueueTimeoutError, SlotPool
from sandbox.protocol import SlotSpec
from sandbox.testing import LocalServer, local_server

HOLD_S = 4  # the blocker holds the only worker this long: longer than the queued call's run timeout


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with local_server(workers=1, preload=[]) as server:
        yield server


def _health(server: LocalServer) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def _blocked(server: LocalServer, seconds: float) -> threading.Thread:
    """Start a call that holds the only worker for `seconds`; return once the server has it
    (running, or first in the FIFO queue behind a slot still being recycled)."""
    thread = threading.Thread(
        target=run_code, args=(server.url, f"import time\ntime.sleep({seconds})\nprint('held')"),
        kwargs={"timeout": seconds + 30},
    )
    thread.start()
    while _health(server)["lifetime"]["in_flight"] < 1:
        time.sleep(0.05)
    return thread


def _outcome(response: RunCodeResponse) -> tuple:
    run = response.run_result
    assert run is not None
    return (response.status, run.status, run.return_code, run.stdout, run.stderr)


def test_a_queued_call_gets_the_result_it_gets_alone(server: LocalServer) -> None:
    code = "import sys\nprint(sum(range(10)))\nprint('warn', file=sys.stderr)"
    alone = _outcome(run_code(server.url, code, timeout=1))
    blocker = _blocked(server, HOLD_S)
    try:
        queued = run_code(server.url, code, timeout=1)  # waits ~HOLD_S for the worker: more than its 1 s
    finally:
        blocker.join()
    assert _outcome(queued) == alone == (alone[0], alone[1], 0, "45\n", "warn\n")


def test_a_call_that_cannot_start_within_its_bound_gets_a_distinct_sandbox_error(server: LocalServer) -> None:
    before = _health(server)["queue_timeouts"]
    blocker = _blocked(server, HOLD_S)
    try:
        raw = httpx.post(server.url + "/run_code", json={
            "code": "print(1)", "language": "python", "run_timeout": 5, "queue_timeout": 0.2,
        }, timeout=60)
        with pytest.raises(SandboxNotStartedError, match="did not start"):
            run_code(server.url, "print(1)", timeout=5, queue_timeout=0.2)
    finally:
        blocker.join()
    assert raw.status_code == 200  # SandboxFusion's shape: clients treat it as a sandbox failure
    body = raw.json()
    assert body["status"] == "SandboxError" and body["run_result"] is None
    assert body["message"].startswith(QUEUE_TIMEOUT_PREFIX) and "did not run" in body["message"]
    assert _health(server)["queue_timeouts"] == before + 2
    # A program's own time limit stays what it was: Failed / TimeLimitExceeded.
    limit = run_code(server.url, "while True:\n    pass", timeout=0.5, queue_timeout=0.2)
    assert limit.status.value == "Failed" and limit.run_result and limit.run_result.status.value == "TimeLimitExceeded"


def test_a_full_queue_is_retried_within_the_bound_then_reported_as_not_started() -> None:
    with local_server(workers=1, preload=[], max_queue=0) as server:
        blocker = _blocked(server, HOLD_S)
        try:
            with pytest.raises(SandboxNotStartedError, match="queue full"):
                run_code(server.url, "print(1)", timeout=5, queue_timeout=1.5)  # 503, retried once, then out of bound
        finally:
            blocker.join()
        assert _health(server)["rejected"] >= 1


def test_pool_expiry_never_takes_a_slot_and_never_loses_one() -> None:
    slots = [SlotSpec(index=0, scratch="/nonexistent/0", workdir="/nonexistent/0/tmp", uid=None)]

    async def go() -> None:
        pool = SlotPool(slots, max_queue=4)
        held = await pool.acquire()
        with pytest.raises(QueueTimeoutError, match="did not run"):
            await pool.acquire(timeout=0)
        patient = asyncio.ensure_future(pool.acquire(timeout=60))
        await asyncio.sleep(0)
        assert pool.waiting == 1
        pool.release(held)
        assert await patient is held  # the expired waiter took nothing
        pool.release(held)
        assert pool.busy == 0 and pool.waiting == 0

    asyncio.run(go())

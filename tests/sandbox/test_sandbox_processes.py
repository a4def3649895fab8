"""A multi-process server (sandbox.supervisor): several server processes on one port, one
/health for all of them, one hash seed, and nothing outliving the supervisor."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import httpx

from sandbox.client import run_code, run_code_async
from sandbox.supervisor import shares
from sandbox.testing import local_server
from tests.sandbox.test_sandbox_lifetime import process_tree, wait_all_gone


def _server_processes(supervisor: int) -> list[int]:
    tree = process_tree(supervisor)
    return [pid for pid in tree if _parent(pid) == supervisor]


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except OSError:
        return None


def test_workers_are_split_over_the_processes() -> None:
    assert shares(16, 2) == [8, 8]
    assert shares(5, 2) == [3, 2]
    assert shares(3, 3) == [1, 1, 1]


def test_processes_share_the_port_and_report_as_one_server(tmp_path: Path) -> None:
    with local_server(workers=2, processes=2, preload=[], work_root=str(tmp_path / "work")) as server:
        # local_server waits for /health's "ok": both processes, each with its zygote, are up.
        health = httpx.get(server.url + "/health", timeout=10).json()
        assert (health["status"], health["processes"], health["processes_ready"]) == ("ok", 2, 2)
        children = _server_processes(server.pid)
        assert len(children) == 2  # each a whole server with its own zygote (children of their own)
        assert all(len(process_tree(child)) >= 2 for child in children)
        codes = [f"print(sorted({{'a{i}', 'b', 'c'}}), {i} * {i})" for i in range(8)]

        async def burst() -> list[str]:
            async def one(code: str) -> str:  # a connection each: the processes share them out
                async with httpx.AsyncClient() as client:
                    response = await run_code_async(server.url, code, timeout=30, client=client)
                return (response.run_result.stdout if response.run_result else None) or ""

            return await asyncio.gather(*(one(code) for code in codes))

        outputs = asyncio.run(burst())
        assert outputs == [f"['a{i}', 'b', 'c'] {i * i}\n" for i in range(8)]
        health = httpx.get(server.url + "/health", timeout=10).json()
        assert health["processes"] == 2 and health["processes_ready"] == 2 and health["pool_size"] == 2
        assert health["executions"] == 8  # summed over both processes, whichever answered
        # One hash seed for every process: a set's order cannot depend on which one ran it.
        order = {run_code(server.url, "print(list({'apple', 'banana', 'cherry', 'date', 'fig'}))").run_result.stdout
                 for _ in range(12)}
        assert len(order) == 1
        tree = process_tree(server.pid)
    assert wait_all_gone(tree) == []
    assert not any(p.name.startswith("server-") for p in (tmp_path / "work").iterdir())


def test_a_killed_supervisor_takes_every_process_with_it() -> None:
    with local_server(workers=2, processes=2, preload=[]) as server:
        result = run_code(server.url, "import subprocess\nsubprocess.Popen(['sleep', '300'])\nprint('ok')").run_result
        assert result is not None and result.stdout == "ok\n"
        tree = process_tree(server.pid)
        os.kill(server.pid, signal.SIGKILL)
        assert wait_all_gone(tree) == []


def test_one_process_dying_stops_the_server() -> None:
    with local_server(workers=2, processes=2, preload=[]) as server:
        tree = process_tree(server.pid)
        os.kill(_server_processes(server.pid)[0], signal.SIGKILL)
        assert wait_all_gone(tree) == []


def test_lifetime_rules_apply_to_the_whole_server(tmp_path: Path) -> None:
    owner = tmp_path / "state"
    owner.mkdir()
    with local_server(workers=2, processes=2, preload=[], owner_dir=str(owner)) as server:
        assert run_code(server.url, "print(2)").run_result.stdout == "2\n"  # type: ignore[union-attr]
        tree = process_tree(server.pid)
        shutil.rmtree(owner)
        assert wait_all_gone(tree) == []


def test_an_idle_multi_process_server_exits_but_not_while_a_request_runs() -> None:
    with local_server(workers=2, processes=2, preload=[], idle_timeout_s=1) as server:
        tree = process_tree(server.pid)
        # Runs across several lifetime checks: the processes' shared activity holds the server up.
        result = run_code(server.url, "import time\ntime.sleep(6)\nprint('done')", timeout=30).run_result
        assert result is not None and result.stdout == "done\n"
        assert wait_all_gone(tree) == []

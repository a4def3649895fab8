"""A server that ends by itself (sandbox.lifetime): owner directory gone, idle without a lease.
Each case checks that the server and every process under it (zygote, forkers, programs) are gone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.client import run_code
from sandbox.errors import SandboxSettingsError
from sandbox.lifetime import Activity, Lifetime, start_ticks
from sandbox.testing import local_server


def process_tree(root: int) -> dict[int, int | None]:
    """pid -> start ticks of `root` and all its descendants."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    parents[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except OSError:
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier += children
    return {pid: start_ticks(pid) for pid in tree}


def wait_all_gone(tree: dict[int, int | None], timeout: float = 30.0) -> list[int]:
    """Wait until none of `tree` runs (a zombie or a reused pid counts as gone); the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid, ticks in tree.items() if ticks is not None and start_ticks(pid) == ticks]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_the_server_exits_with_everything_under_it_when_its_owner_directory_is_gone(tmp_path: Path) -> None:
    owner = tmp_path / "state"
    owner.mkdir()
    with local_server(workers=2, preload=[], owner_dir=str(owner), work_root=str(tmp_path / "work")) as server:
        background = "import subprocess\nsubprocess.Popen(['sleep', '300'])\nprint('ok')"
        result = run_code(server.url, background).run_result
        assert result is not None and result.stdout == "ok\n"
        tree = process_tree(server.pid)
        assert len(tree) >= 4  # server, zygote, two forkers (and their prepared programs)
        shutil.rmtree(owner)
        assert wait_all_gone(tree) == []
    assert not any(p.name.startswith("server-") for p in (tmp_path / "work").iterdir())  # cleaned up


def test_an_idle_server_waits_for_its_leases_then_exits(tmp_path: Path) -> None:
    leases = tmp_path / "leases"
    leases.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        (leases / "apply").write_text(f"{holder.pid} {start_ticks(holder.pid)}\n")
        (leases / "dead").write_text("999999999 1\n")
        with local_server(workers=1, preload=[], idle_timeout_s=1, lease_dir=str(leases)) as server:
            tree = process_tree(server.pid)
            time.sleep(5)  # well past the idle timeout: the live lease holds it up
            result = run_code(server.url, "print(1)").run_result
            assert result is not None and result.stdout == "1\n"
            assert sorted(p.name for p in leases.iterdir()) == ["apply"]  # the dead lease was removed
            holder.kill()
            holder.wait()
            assert wait_all_gone(tree) == []
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_lifetime_rules() -> None:
    lifetime = Lifetime(None, 10.0, None)
    activity = Activity(in_flight=0, last_change=100.0)
    assert lifetime.reason_to_exit(activity, now=105.0) is None
    assert "idle for 11 s" in (lifetime.reason_to_exit(activity, now=111.0) or "")
    assert lifetime.reason_to_exit(Activity(in_flight=1, last_change=0.0), now=1000.0) is None  # a request runs
    assert not Lifetime(None, None, None).active
    with pytest.raises(SandboxSettingsError, match="does not exist"):
        Lifetime("/nonexistent/retool-owner", None, None)


def test_an_owner_directory_replaced_at_the_same_path_counts_as_gone(tmp_path: Path) -> None:
    owner = tmp_path / ".retool"
    owner.mkdir()
    lifetime = Lifetime(str(owner), None, None)
    assert lifetime.reason_to_exit(Activity()) is None
    owner.rename(tmp_path / "old")
    owner.mkdir()  # a new project copy at the same path is not ours
    assert "is gone" in (lifetime.reason_to_exit(Activity()) or "")

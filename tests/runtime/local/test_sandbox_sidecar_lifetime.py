"""The local sandbox sidecar never outlives its use: deleting the project's state directory
ends it and everything under it (zygote, forkers, programs); an apply holds it up by a lease."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from reconciler.spec import Sandbox
from runtime.atomic import write_json
from runtime import processes as procs
from runtime.local import resources as res
from tests.sandbox.test_sandbox_lifetime import process_tree, wait_all_gone


def test_the_sidecar_ends_with_everything_under_it_when_the_state_dir_is_deleted(tmp_path: Path) -> None:
    state_dir = tmp_path / "copy" / ".retool"
    state_dir.mkdir(parents=True)
    started = res.ensure_sandbox(Sandbox(workers=1, preload=[]), state_dir / "sandbox.json", state_dir / "logs")
    pid = started.outputs["pid"]
    try:
        health = httpx.get(started.outputs["url"] + "/health", timeout=10).json()
        assert health["lifetime"]["owner_dir"] == str(state_dir.resolve())
        assert health["lifetime"]["idle_timeout_s"] == res.SIDECAR_IDLE_TIMEOUT_S
        lease = res.lease_dir(state_dir) / str(os.getpid())
        assert lease.is_file()  # this process (the apply) holds the sidecar up
        lease.unlink()
        assert res.live_sandbox_url(state_dir / "sandbox.json", hold=False) == started.outputs["url"]  # plan, status
        assert not lease.is_file()  # only looking: plan and status write nothing
        assert res.live_sandbox_url(state_dir / "sandbox.json") == started.outputs["url"]
        assert lease.is_file()  # looking it up (to launch a stage) takes the lease again
        tree = process_tree(pid)
        shutil.rmtree(tmp_path / "copy")  # the user deletes the project copy
        assert wait_all_gone(tree) == []
    finally:
        procs.terminate_run(pid, grace_s=5)


def test_a_sidecar_from_before_the_lifetime_rules_is_replaced(tmp_path: Path) -> None:
    state_dir = tmp_path / ".retool"
    record_path = state_dir / "sandbox.json"
    first = res.ensure_sandbox(Sandbox(workers=1, preload=[]), record_path, state_dir / "logs")
    second = None
    try:
        record = res.SandboxRecord.model_validate(res.read_json(record_path))
        write_json(record_path, record.model_copy(update={"config_hash": "from an older retool"}).model_dump())
        second = res.ensure_sandbox(Sandbox(workers=1, preload=[]), record_path, state_dir / "logs")
        assert second.change == "updated" and not procs.is_alive(first.outputs["pid"])
    finally:
        for outcome in (first, second):
            if outcome is not None:
                procs.terminate_run(outcome.outputs["pid"], grace_s=5)


@pytest.mark.parametrize("content", ["", "not a pid\n"])
def test_a_broken_lease_holds_nothing(tmp_path: Path, content: str) -> None:
    from sandbox.lifetime import lease_alive

    path = tmp_path / "lease"
    path.write_text(content)
    assert not lease_alive(str(path))
    assert lease_alive(str(res.take_lease(tmp_path)))

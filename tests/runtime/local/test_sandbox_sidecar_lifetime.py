"""The local sandbox sidecar never outlives its use: deleting the project's state directory
ends it and everything under it (zygote, forkers, programs); an apply holds it up by a lease;
once it idled out, plan and status call it idle (not drift) and what needs it starts it again."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

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


IDLE_SPEC = """\
name: idle-sidecar
backend: local
sandbox: {workers: 1, preload: []}
"""


def _wait_gone(pid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while procs.is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not procs.is_alive(pid), f"the sidecar (pid {pid}) did not idle out"


def test_a_sidecar_that_idled_out_is_idle_not_drift_and_starts_on_demand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converged spec stays converged after the sidecar ended by design: plan says No
    changes (--detailed-exitcode 0), status says idle; the next user of it starts it again."""
    from typer.testing import CliRunner

    from reconciler.cli.main import app
    from reconciler.spec import Spec
    from runtime.local.backend import LocalRuntime

    monkeypatch.setattr(res, "SIDECAR_IDLE_TIMEOUT_S", 1.0)  # instead of 10 minutes
    spec_path = tmp_path / "idle.yaml"
    spec_path.write_text(IDLE_SPEC)
    state_dir = tmp_path / ".retool"

    def retool(*args: str) -> Any:
        return CliRunner().invoke(app, [*args, str(spec_path)], env={"COLUMNS": "200"}, catch_exceptions=False)

    pids: list[int] = []
    try:
        assert retool("apply", "--yes").exit_code == 0
        record = res.SandboxRecord.model_validate(res.read_json(state_dir / "sandbox.json"))
        pids.append(record.pid)
        assert httpx.get(record.url + "/health", timeout=10).json()["lifetime"]["idle_timeout_s"] == 1.0
        assert retool("plan", "--detailed-exitcode").exit_code == 0
        (res.lease_dir(state_dir) / str(os.getpid())).unlink()  # the apply has exited
        _wait_gone(record.pid)

        plan = retool("plan", "--detailed-exitcode")
        assert plan.exit_code == 0, plan.stdout
        assert "No changes" in plan.stdout
        status = retool("status", "--json")
        sandbox = next(n for n in json.loads(status.stdout)["nodes"] if n["address"] == "sandbox")
        assert (sandbox["sync"], sandbox["health"], sandbox["action"]) == ("in sync", "idle", "no-op")
        assert sandbox["message"].startswith("idle, starts on demand")
        assert "idle" in retool("status").stdout

        # What needs it (an RL or eval run, at launch) starts it again, with the same settings.
        rt = LocalRuntime(str(state_dir))
        url = rt._sandbox_url(Spec.model_validate(yaml.safe_load(IDLE_SPEC)))
        again = res.SandboxRecord.model_validate(res.read_json(state_dir / "sandbox.json"))
        pids.append(again.pid)
        assert again.pid != record.pid and url == again.url and res.ping(url)
        assert retool("plan", "--detailed-exitcode").exit_code == 0
        status = retool("status", "--json")
        assert {n["health"] for n in json.loads(status.stdout)["nodes"]} == {"healthy"}
    finally:
        for pid in pids:
            procs.terminate_run(pid, grace_s=5)

"""The container side of a stage (runtime/modal/worker.py), run here for real: real
processes, real files, the real checkpoint rules; only Modal's own calls (reload, commit,
spawn) go to the fake adapter.

The "trainer" is a small script that speaks verl's interface where the worker touches it:
`trainer.default_local_dir`, `trainer.resume_mode` / `trainer.resume_from_path`, shard files
and the tracker, and `step:N - key:value` console lines.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from runtime.modal.models import StagePayload
from runtime.modal.worker import BearerAuth, ContainerSegment, training_commands, with_resume
from tests.fakes.fake_modal import FakeModal

TRAINER = textwrap.dedent(
    """
    import json, os, sys, time, pathlib
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    out = pathlib.Path(args["trainer.default_local_dir"])
    total, save = int(args["trainer.total_training_steps"]), int(args["trainer.save_freq"])
    crash_at, hang_at = int(args.get("crash_at", 0)), int(args.get("hang_at", 0))
    start = 0
    if args.get("trainer.resume_mode") == "resume_path":
        start = int(args["trainer.resume_from_path"].rsplit("_", 1)[1])
    with open(out / "_retool" / "argv.jsonl", "a") as fh:
        fh.write(json.dumps(sys.argv[1:]) + "\\n")
    for step in range(start + 1, total + 1):
        print(f"step:{step} - train/loss:{1.0 / step:.4f} - train/lr:1e-05", flush=True)
        if step % save == 0 or step == total:
            d = out / f"global_step_{step}"
            d.mkdir(parents=True, exist_ok=True)
            for kind in ("model", "optim", "extra_state"):
                (d / f"{kind}_world_size_1_rank_0.pt").write_bytes(b"w" * 16)
            tmp = out / "tracker.tmp"
            tmp.write_text(str(step))
            os.replace(tmp, out / "latest_checkpointed_iteration.txt")
            # runtime.verl.save_marker's completion marker (restart id: the payload's below)
            (d / "retool_complete.json").write_text(json.dumps({"step": step, "world_size": 1, "restart_id": "r" * 64}))
        if step == crash_at and start == 0:
            sys.exit(3)
        if step == hang_at:
            time.sleep(3600)
    """
)


def payload(tmp_path: Path, *, extra: list[str] = (), env: dict[str, str] | None = None, secret_env: list[str] = (),
            **fields: Any) -> StagePayload:
    ckpt = tmp_path / "ckpt" / "sft" / ("r" * 16)
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    argv = [
        sys.executable, str(script), "verl.trainer.sft_trainer", f"trainer.default_local_dir={ckpt}",
        "trainer.total_training_steps=6", "trainer.save_freq=2", "trainer.resume_mode=auto", *extra,
    ]
    merge = [sys.executable, "-m", "verl.model_merger", "merge", "--local_dir", f"{ckpt}/global_step_6"]
    base: dict[str, Any] = dict(
        app_name="retool-test", function="stage-sft", stage="sft", kind="sft", restart_id="r" * 64,
        total_steps=6, world_size=1, checkpoint_dir=str(ckpt), checkpoint_volume="test-checkpoints",
        volumes={"test-checkpoints": str(tmp_path / "ckpt"), "test-data": str(tmp_path / "data")},
        commands=[
            {"argv": argv, "env": env or {}, "secret_env": list(secret_env), "description": "fake trainer"},
            {"argv": merge, "env": {}, "secret_env": [], "description": "merge (in finalize)"},
        ],
        train_seconds=3600.0, commit_every_s=3600.0,
    )
    base.update(fields)
    return StagePayload(**base)


def runs(p: StagePayload) -> list[list[str]]:
    path = Path(p.checkpoint_dir) / "_retool" / "argv.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_finished_attempt_commits_and_reports_its_last_valid_step(tmp_path: Path) -> None:
    fake = FakeModal(call_id_in_container="fc-000001")
    p = payload(tmp_path)
    result = ContainerSegment(p, fake).run()
    assert (result["outcome"], result["step"], result["segment"]) == ("finished", 6, 0)
    run_dir = Path(p.checkpoint_dir) / "_retool"
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["step"] == 6 and progress["metrics"]["train/loss"] == pytest.approx(1 / 6, abs=1e-4)
    assert json.loads((run_dir / "result.json").read_text())["outcome"] == "finished"
    log = (run_dir / "logs" / "segment-0-rank-0.log").read_text()
    assert "step:6 - train/loss" in log and log.startswith("[retool] $ ")  # the command heads its log
    # every volume reloaded first and committed at the end; the merge was left to finalize
    assert fake.ops[:2] == [("reload_volume", "test-checkpoints"), ("reload_volume", "test-data")]
    assert ("commit_volume", "test-checkpoints") in fake.ops
    assert len(runs(p)) == 1


def test_a_restarted_attempt_resumes_from_the_latest_valid_checkpoint(tmp_path: Path) -> None:
    """Preemption: Modal restarts the same input; the worker points verl at the newest
    complete checkpoint, not at what the launch said."""
    fake = FakeModal()
    p = payload(tmp_path, extra=["crash_at=5"])
    with pytest.raises(RuntimeError, match="exited with 3") as exc:
        ContainerSegment(p, fake).run()
    assert "step:5 - train/loss" in str(exc.value)  # the log tail travels with the failure
    # A half-written step 6 (no tracker update, missing shards) must not be resumed from.
    (Path(p.checkpoint_dir) / "global_step_6").mkdir()
    result = ContainerSegment(p, fake).run()
    assert result["outcome"] == "finished" and result["step"] == 6
    second = runs(p)[1]
    assert "trainer.resume_mode=resume_path" in second
    assert f"trainer.resume_from_path={p.checkpoint_dir}/global_step_4" in second
    assert "trainer.resume_mode=auto" not in second


def test_the_end_of_an_attempt_hands_over_to_the_next_segment(tmp_path: Path) -> None:
    fake = FakeModal(call_id_in_container="fc-head")
    from runtime.modal.models import AppDefinition, FunctionSpec, ImageStep

    fake.deploy(AppDefinition(app_name="retool-test", image=[ImageStep(op="from_registry", args=["x:1"])],
                              functions=[FunctionSpec(name="stage-sft", entry="run_stage")]))
    p = payload(tmp_path, extra=["hang_at=4"], train_seconds=2.0)
    result = ContainerSegment(p, fake).run()
    assert result["outcome"] == "continued" and result["step"] == 4 and result["segment"] == 0
    nxt = fake.calls[result["next_call_id"]]
    assert nxt.function == "stage-sft" and nxt.payload["segment"] == 1
    assert nxt.payload["commands"] == p.model_dump(mode="json")["commands"]
    run = json.loads((Path(p.checkpoint_dir) / "_retool" / "run.json").read_text())
    assert (run["call_id"], run["segment"], run["previous_call_id"]) == (nxt.call_id, 1, "fc-head")
    # a retried attempt of the same segment (it died after spawning) neither trains nor spawns again
    again = ContainerSegment(p, fake).run()
    assert again["outcome"] == "continued" and again["next_call_id"] == nxt.call_id
    assert len(fake.calls) == 1 and len(runs(p)) == 1


def test_a_segment_that_saved_nothing_fails_instead_of_chaining_forever(tmp_path: Path) -> None:
    fake = FakeModal()
    p = payload(tmp_path, extra=["hang_at=1"], train_seconds=2.0)
    with pytest.raises(RuntimeError, match="without saving a new valid checkpoint"):
        ContainerSegment(p, fake).run()
    assert fake.calls == {}


def test_a_missing_secret_fails_without_running_or_retrying(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETOOL_TEST_SECRET_X", raising=False)
    p = payload(tmp_path, secret_env=["RETOOL_TEST_SECRET_X"])
    result = ContainerSegment(p, FakeModal()).run()
    assert result["outcome"] == "failed" and "RETOOL_TEST_SECRET_X" in result["message"]
    assert not (Path(p.checkpoint_dir) / "_retool" / "argv.jsonl").exists()
    monkeypatch.setenv("RETOOL_TEST_SECRET_X", "value")
    assert ContainerSegment(p, FakeModal()).run()["outcome"] == "finished"


def test_a_forced_rerun_moves_old_checkpoints_aside_once(tmp_path: Path) -> None:
    fake = FakeModal(call_id_in_container="fc-7")
    first = payload(tmp_path)
    ContainerSegment(first, fake).run()
    rerun = payload(tmp_path, replace_existing=True)
    result = ContainerSegment(rerun, fake).run()
    assert result["step"] == 6
    assert "trainer.resume_mode=auto" in runs(rerun)[-1]  # trained from scratch
    replaced = list((tmp_path / "ckpt" / "sft" / ".replaced").iterdir())
    assert len(replaced) == 1 and (replaced[0] / "global_step_6").is_dir()


def test_service_sandbox_token_reaches_the_trainer_only_inside_the_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_TOKEN", "tok-123")
    env = {"RETOOL_SANDBOX_URL": "https://acme--retool-sandbox.modal.run"}
    p = payload(tmp_path, env=env, sandbox_token_var="SANDBOX_TOKEN",
                extra=["probe=1"])
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER.replace(
        'with open(out / "_retool" / "argv.jsonl", "a") as fh:',
        '(out / "_retool" / "url.txt").write_text(os.environ["RETOOL_SANDBOX_URL"])\n'
        'with open(out / "_retool" / "argv.jsonl", "a") as fh:',
    ))
    ContainerSegment(p, FakeModal()).run()
    assert (Path(p.checkpoint_dir) / "_retool" / "url.txt").read_text() == "https://acme--retool-sandbox.modal.run/t/tok-123"
    assert "tok-123" not in p.model_dump_json()


# --------------------------------------------------------------------------- pure pieces


def test_with_resume_only_touches_verl_trainers() -> None:
    argv = ["torchrun", "-m", "verl.trainer.sft_trainer", "trainer.resume_mode=auto", "+trainer.resume_from_path=x"]
    assert with_resume(argv, "/c", 40, True)[-2:] == ["trainer.resume_mode=resume_path", "trainer.resume_from_path=/c/global_step_40"]
    assert with_resume(argv, "/c", None, True)[-1] == "trainer.resume_mode=disable"
    assert with_resume(argv, "/c", None, False) == argv
    assert with_resume(["python", "x.py"], "/c", 40, True) == ["python", "x.py"]
    cmds = [{"argv": ["torchrun", "-m", "verl.trainer.sft_trainer"]}, {"argv": ["python", "-m", "verl.model_merger"]}]
    assert training_commands(cmds) == cmds[:1]


def test_bearer_auth_guards_everything_but_ping() -> None:
    import asyncio

    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = BearerAuth(app, "s3cret")

    def call(path: str, headers: list[tuple[bytes, bytes]] = ()) -> int:
        sent: list[dict[str, Any]] = []

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        asyncio.run(guard({"type": "http", "path": path, "headers": list(headers)}, None, send))
        return int(sent[0]["status"])

    assert call("/v1/ping") == 200
    assert call("/run_code") == 401
    assert call("/run_code", [(b"authorization", b"Bearer wrong")]) == 401
    assert call("/run_code", [(b"authorization", b"Bearer s3cret")]) == 200
    assert call("/t/s3cret/run_code") == 200 and seen[-1] == "/run_code"
    assert call("/t/s3cretX/run_code") == 401 and call("/t/wrong/run_code") == 401


def test_service_sandbox_serves_the_real_sandbox_behind_its_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sandbox_web` (the ASGI function Modal serves) on a real server on loopback."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from runtime.modal.worker import sandbox_web

    monkeypatch.setenv("RETOOL_SANDBOX_SETTINGS", json.dumps({"workers": 1, "max_queue": 4, "preload": []}))
    monkeypatch.setenv("RETOOL_SANDBOX_TOKEN_VAR", "SBX_TOKEN")
    monkeypatch.setenv("SBX_TOKEN", "tok-1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(sandbox_web(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            if server.started:
                break
            time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        body = {"code": "print(6 * 7)", "language": "python", "run_timeout": 10}
        assert httpx.get(f"{base}/v1/ping").text == '"pong"'
        assert httpx.post(f"{base}/run_code", json=body).status_code == 401
        via_url = httpx.post(f"{base}/t/tok-1/run_code", json=body, timeout=60)
        assert via_url.status_code == 200 and via_url.json()["run_result"]["stdout"] == "42\n"
        via_header = httpx.post(f"{base}/run_code", json=body, headers={"Authorization": "Bearer tok-1"}, timeout=60)
        assert via_header.json()["status"] == "Success"
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_completed_checkpoint_is_committed_at_once_not_at_the_next_timed_commit(tmp_path: Path) -> None:
    """Modal keeps only what a container committed: with a commit every hour, a container
    preempted ten minutes after a save would lose it. The save's completion marker is what
    triggers a commit (within CHECKPOINT_LOOK_S), while the trainer is still running."""
    import time

    from runtime.modal import worker
    from runtime.modal.models import AppDefinition, FunctionSpec, ImageStep

    fake = FakeModal(call_id_in_container="fc-000001")
    fake.deploy(AppDefinition(app_name="retool-test", image=[ImageStep(op="from_registry", args=["x:1"])],
                              functions=[FunctionSpec(name="stage-sft", entry="run_stage")]))
    segment_s = worker.CHECKPOINT_LOOK_S * 4
    p = payload(tmp_path, extra=["hang_at=2"], train_seconds=segment_s, commit_every_s=3600.0)
    ckpt = Path(p.checkpoint_dir)
    commits: list[tuple[float, list[str]]] = []  # (when, checkpoints then) of each commit of the checkpoints
    fake.on_commit = lambda name: commits.append(
        (time.monotonic(), sorted(d.name for d in ckpt.glob("global_step_*")))) if name == "test-checkpoints" else None
    started = time.monotonic()
    result = ContainerSegment(p, fake).run()
    assert result["outcome"] == "continued" and result["step"] == 2  # the trainer hung after saving step 2
    first = next(at for at, names in commits if "global_step_2" in names)
    # committed while the trainer still ran, long before the segment's end (its deadline)
    assert first - started < segment_s - worker.CHECKPOINT_LOOK_S
    early = [names for at, names in commits if at - started < segment_s - 1]
    assert early == [["global_step_2"]]  # once: an unchanged checkpoint is not committed again

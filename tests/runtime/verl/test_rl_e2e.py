"""RL on CPU, end to end through the rendered commands (real verl, real sandbox, tiny model).

The tiny spec's own SFT stage runs first (its rendered torchrun command, then the merge), so
the policy has learnt the hermes tool-call format; then the RL stage's rendered main_ppo
command runs GRPO with retool's transformers rollout (verl's vLLM rollout on CPU:
test_vllm_cpu_e2e.py; the SFT model and the sandbox are shared fixtures, conftest.py):

    A  2 steps from scratch        tool calls hit the sandbox, rewards logged, global_step_2
    B  A's checkpoint, 3 steps     resumes at step 3 (no step 1/2 again), weights still in sync
    C  A's checkpoint, 3 steps,    the rollout keeps the SFT weights while the actor carries
       weight sync switched off    two steps of training: the probability difference grows

A larger learning rate than the recipe's makes the actor move within two steps, and a small
entropy bonus makes it move even when every group's rewards tie (GRPO's advantages are then all
zero, so the tiny model's luck in sampling would decide whether there is anything to sync). Set
RETOOL_TEST_SFT_MODEL to a merged tiny SFT model directory to skip the SFT (development).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from reconciler.loader import parse_spec_text
from reconciler.spec import Spec
from reconciler.backend import RenderedCommand, StageContext
from runtime.metrics import MetricRecord, parse_text
from runtime.verl.rollout import ENV_WEIGHT_SYNC
from runtime.verl.rollout import NAME as TRANSFORMERS_ROLLOUT
from runtime.verl.common import TRACKER_FILE, StagePaths
from runtime.verl.rl import render_rl

pytestmark = pytest.mark.slow

SPECS = Path(__file__).resolve().parents[3] / "specs"
RID = "e2e0" * 8
LR = 1e-3  # the recipe's 1e-6 would not move a tiny model measurably in two steps
# Not the recipe's 0: a gradient on every step whatever the rewards (see the module docstring).
ENTROPY_COEFF = 0.01
SYNC_BOUND = 1e-5  # mean |p_rollout - p_actor| with weight sync (float32 on both sides: ~2e-7 seen)
# Per-trajectory scores the recipe's reward can give: +1, or -1 plus 0.1 per tool call up to -0.6.
SCORES = (1.0, -1.0, -0.9, -0.8, -0.7, -0.6)
RUN_TIMEOUT_S = 900


@dataclass(frozen=True)
class Run:
    rc: int
    wall_s: float
    log: str
    records: list[MetricRecord]

    def steps(self) -> list[int]:
        return sorted({r.step for r in self.records if "training/global_step" in r.values})

    def value(self, step: int, key: str) -> float:
        for r in self.records:
            if r.step == step and key in r.values:
                return r.values[key]
        raise KeyError(f"{key} not logged at step {step}")


def run_command(cmd: RenderedCommand, log_path: Path, extra_env: dict[str, str] | None = None) -> Run:
    """Run a rendered command in its own process group (killed whole on timeout)."""
    argv = [sys.executable, *cmd.argv[1:]] if cmd.argv[0] == "python" else list(cmd.argv)
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    env = {**os.environ, **cmd.env, **(extra_env or {})}
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    text = log_path.read_text(errors="replace")
    return Run(rc=rc, wall_s=time.monotonic() - start, log=text, records=parse_text(text))


def tiny_spec(**rl: object) -> Spec:
    spec = parse_spec_text((SPECS / "retool-tiny.yaml").read_text())
    data = spec.model_dump(mode="json", exclude_unset=True)
    data["stages"]["rl"].update(rl)
    return Spec.model_validate(data)


@pytest.fixture(scope="module")
def rl_inputs(sft_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    from runtime.data.prepare import prepare

    root = tmp_path_factory.mktemp("rl_data")
    spec = tiny_spec()
    inputs: dict[str, dict[str, str]] = {"stage.sft": {"model_path": str(sft_model)}}
    for name in ("tiny_math",):
        inputs[f"dataset.{name}"] = {"path": prepare(name, spec.datasets[name], root / name, SPECS).path}
    return inputs


def rl_command(
    inputs: dict, sandbox: str, ckpt: Path, steps: int, resume_from: int | None, rollout: str = TRANSFORMERS_ROLLOUT,
) -> RenderedCommand:
    # No validation set: validation is verl's own loop and would only add minutes here.
    # A checkpoint every step: the resume and kill tests stop and restart between steps.
    spec = tiny_spec(optim={"lr": LR, "betas": [0.9, 0.999], "warmup_ratio": 0.0, "lr_scheduler": "constant"},
                     val=[], save_freq=1, overrides=[f"actor_rollout_ref.actor.entropy_coeff={ENTROPY_COEFF}"])
    ctx = StageContext(spec=spec, spec_dir=str(SPECS), stage="rl", restart_id=RID, total_steps=steps,
                       resume_from=resume_from, inputs=inputs)
    paths = StagePaths(stage_dir=str(ckpt), ckpt_dir=str(ckpt), merged_dir=str(ckpt / "merged"))
    (cmd,) = render_rl(ctx, sandbox_url=sandbox, cpu=True, paths=paths, rollout=rollout)
    return cmd


def executions(url: str) -> int:
    return int(httpx.get(url + "/health", timeout=10).json()["executions"])


def test_grpo_with_tool_calls_resume_and_weight_sync(rl_inputs: dict, sandbox: str, tmp_path: Path) -> None:
    # A: two steps from scratch.
    ckpt_a = tmp_path / "a"
    ckpt_a.mkdir()
    before = executions(sandbox)
    a = run_command(rl_command(rl_inputs, sandbox, ckpt_a, steps=2, resume_from=None), ckpt_a / "rl.log")
    print(f"run A: {a.wall_s:.0f} s")
    assert a.rc == 0, a.log[-4000:]
    assert a.steps() == [1, 2]
    tool_runs = executions(sandbox) - before
    assert tool_runs > 0, "the policy made no code_interpreter call that reached the sandbox"
    assert max(a.value(s, "num_turns/max") for s in (1, 2)) >= 4  # a tool call and its answer turn
    for s in (1, 2):
        # Rewards are the recipe's: sample extremes are among its values, and trajectories
        # with a tool call earn more than the -1 floor (a plain boxed-match reward would not).
        for stat in ("critic/score/min", "critic/score/max"):
            assert min(abs(a.value(s, stat) - v) for v in SCORES) < 1e-4, (stat, a.value(s, stat))
        assert a.value(s, "critic/score/mean") > -1.0
        assert a.value(s, "training/rollout_probs_diff_valid") == 1.0
        assert a.value(s, "training/rollout_probs_diff_mean") < SYNC_BOUND
    assert (ckpt_a / TRACKER_FILE).read_text().strip() == "2"
    assert (ckpt_a / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt").is_file()
    assert a.value(1, "actor/entropy_loss") > 0, "the entropy bonus did not reach the actor's loss"
    assert a.value(1, "actor/grad_norm") > 0, "step 1 had no gradient: nothing to sync"

    # B and C start from copies of A's checkpoint: one more step with and without weight sync.
    ckpt_b, ckpt_c = tmp_path / "b", tmp_path / "c"
    for d in (ckpt_b, ckpt_c):
        shutil.copytree(ckpt_a, d, ignore=shutil.ignore_patterns("rl.log"))
    b = run_command(rl_command(rl_inputs, sandbox, ckpt_b, steps=3, resume_from=2), ckpt_b / "rl.log")
    print(f"run B: {b.wall_s:.0f} s")
    assert b.rc == 0, b.log[-4000:]
    assert b.steps() == [3], "a resumed run must continue at step 3, not start over"
    assert f"Resuming from {ckpt_b}/global_step_2" in b.log
    assert (ckpt_b / TRACKER_FILE).read_text().strip() == "3" and (ckpt_b / "global_step_3").is_dir()
    synced = b.value(3, "training/rollout_probs_diff_mean")
    assert synced < SYNC_BOUND

    c = run_command(rl_command(rl_inputs, sandbox, ckpt_c, steps=3, resume_from=2), ckpt_c / "rl.log",
                    extra_env={ENV_WEIGHT_SYNC: "0"})
    print(f"run C: {c.wall_s:.0f} s")
    assert c.rc == 0, c.log[-4000:]
    stale = c.value(3, "training/rollout_probs_diff_mean")
    print(f"probability difference: synced {[a.value(1, 'training/rollout_probs_diff_mean'), a.value(2, 'training/rollout_probs_diff_mean'), synced]}, unsynced {stale}")
    assert stale > 10 * max(synced, a.value(2, "training/rollout_probs_diff_mean"))

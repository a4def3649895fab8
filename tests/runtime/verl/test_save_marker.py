"""Completion markers written inside verl's own save functions (runtime.verl.save_marker),
with the writer killed between shards of a re-save of the same `global_step_N`.

The savers are verl 0.9.1's real ones — SFT's `CheckpointHandler.save_checkpoint` on two
torchrun ranks over gloo, RL's `_save_checkpoint` of the v1 `PPOTrainer` (the default) and of
the legacy `RayPPOTrainer`, in the driver — loaded
through `VERL_USE_EXTERNAL_MODULES` exactly as a launch does; only the engine / worker
group below them is a stand-in that writes one shard file per rank, so a test can SIGKILL
the writer between two shards."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.checkpoints import (
    COMPLETE_FILE, SAVE_MARKER_MODULE, SaveComplete, evaluate, latest_valid, marker_content, scan_local,
)

REPO = Path(__file__).resolve().parents[3]
RID = "c3" * 32
KINDS = ("model", "optim", "extra_state")

# Every rank writes its three shards, tagged with the save that wrote them; the rank named
# in KILL_RANK kills itself (SIGKILL, no cleanup) right after its model shard.
SHARD_WRITER = textwrap.dedent(
    """
    import os, signal

    def write_shards(local_path, step, world, ranks):
        os.makedirs(local_path, exist_ok=True)
        for rank in ranks:
            for kind in ("model", "optim", "extra_state"):
                with open(os.path.join(local_path, f"{kind}_world_size_{world}_rank_{rank}.pt"), "w") as fh:
                    fh.write(f"{os.environ['SAVE_TAG']} step {step}")
                if kind == "model" and str(rank) == os.environ.get("KILL_RANK") and str(step) == os.environ.get("KILL_STEP"):
                    os.kill(os.getpid(), signal.SIGKILL)
    """
)

SFT_SCRIPT = SHARD_WRITER + textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    from verl.utils.checkpoint.checkpoint_handler import CheckpointHandler, OrchestrationMode

    class Engine:  # stands in for verl's FSDP engine: each rank saves its own shards
        def is_mp_src_rank_with_outputs(self):
            return True
        def get_data_parallel_rank(self):
            return dist.get_rank()
        def save_checkpoint(self, local_path, global_step, max_ckpt_to_keep=None):
            write_shards(local_path, global_step, dist.get_world_size(), [dist.get_rank()])
            dist.barrier()

    class Loader:
        def state_dict(self):
            return {}

    dist.init_process_group("gloo")
    handler = CheckpointHandler(Engine(), Loader(), default_local_dir=sys.argv[1], mode=OrchestrationMode.SPMD)
    for step in sys.argv[2:]:
        handler.save_checkpoint(int(step))
    dist.destroy_process_group()
    """
)

RL_SCRIPT = SHARD_WRITER + textwrap.dedent(
    """
    import importlib, sys
    from types import SimpleNamespace
    from omegaconf import OmegaConf
    module, _, name = os.environ["TRAINER"].rpartition(".")
    Trainer = getattr(importlib.import_module(module), name)

    class WorkerGroup:  # stands in for the actor's worker group: returns when every rank saved
        world_size = 2
        def save_checkpoint(self, local_path, hdfs_path, global_step, max_ckpt_to_keep=None):
            write_shards(local_path, global_step, self.world_size, range(self.world_size))

    class Loader:
        def state_dict(self):
            return {}

    config = OmegaConf.create({
        "trainer": {"default_local_dir": sys.argv[1], "default_hdfs_dir": None},
        "actor_rollout_ref": {"actor": {"checkpoint": {"async_save": False}}},
    })
    for step in sys.argv[2:]:
        trainer = SimpleNamespace(
            config=config, global_steps=int(step), actor_rollout_wg=WorkerGroup(), use_critic=False,
            train_dataloader=Loader(), trainer_mode="sync",  # v1: no transfer queue to save
            checkpoint_callback=SimpleNamespace(on_save=lambda **kw: None),
        )
        Trainer._save_checkpoint(trainer)
    """
)


def save(
    argv: list[str], script: Path, run_dir: Path, steps: list[int], *, tag: str, kill: str | None = None,
    trainer: str = "",
) -> int:
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "VERL_USE_EXTERNAL_MODULES": SAVE_MARKER_MODULE, "SAVE_TAG": tag,
        "KILL_RANK": kill or "", "KILL_STEP": str(steps[-1]) if kill is not None else "", "TRAINER": trainer,
    }
    proc = subprocess.run(
        [*argv, str(script), str(run_dir), *map(str, steps)],
        env=env, cwd=run_dir, capture_output=True, text=True, timeout=300,
    )
    if kill is None:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode


def tags(step_dir: Path, sub: str = "") -> set[str]:
    return {p.read_text().split(" step ")[0] for p in (step_dir / sub).glob("*_world_size_*_rank_*.pt")}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sft" / RID[:16]
    d.mkdir(parents=True)
    (d / "retool.json").write_text(marker_content(RID, "sft", 2))
    return d


def check_torn_resave(run_dir: Path, sub: str) -> None:
    """After a complete save of steps 2 and 4 and a re-save of 4 killed between shards."""
    step4 = run_dir / "global_step_4"
    assert tags(step4, sub) == {"old", "new"}  # mixed shards, every file present
    assert len(list((step4 / sub).glob("*_world_size_2_rank_*.pt"))) == 2 * len(KINDS)
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "4"  # the tracker still vouches
    assert not (step4 / COMPLETE_FILE).exists()
    cks = {c.step: c for c in evaluate(scan_local(run_dir.parent), 2, RID)}
    assert not cks[4].valid and cks[4].reason.startswith(f"no completion marker ({COMPLETE_FILE})")
    assert cks[2].valid and latest_valid(list(cks.values()), RID).step == 2  # noqa: PLR2004


def check_complete(run_dir: Path, steps: list[int]) -> None:
    for step in steps:
        done = SaveComplete.model_validate_json((run_dir / f"global_step_{step}" / COMPLETE_FILE).read_text())
        assert (done.step, done.world_size, done.restart_id) == (step, 2, RID)
    cks = evaluate(scan_local(run_dir.parent), 2, RID)
    assert [(c.step, c.valid) for c in cks] == [(s, True) for s in steps]


def test_sft_resave_killed_between_shards_is_never_resumed(run_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "sft_save.py"
    script.write_text(SFT_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    save(torchrun, script, run_dir, [2, 4], tag="old")
    check_complete(run_dir, [2, 4])
    # Rank 1 dies after its new model shard; rank 0 has written all of its own by then or soon.
    assert save(torchrun, script, run_dir, [4], tag="new", kill="1") != 0
    check_torn_resave(run_dir, "")


@pytest.mark.parametrize("trainer", [
    "verl.trainer.ppo.v1.trainer_base.PPOTrainer",  # verl 0.9.1's default (trainer.use_v1: true)
    "verl.trainer.ppo.ray_trainer.RayPPOTrainer",  # the legacy v0 trainer
])
def test_rl_resave_killed_between_shards_is_never_resumed(run_dir: Path, tmp_path: Path, trainer: str) -> None:
    script = tmp_path / "rl_save.py"
    script.write_text(RL_SCRIPT)
    save([sys.executable], script, run_dir, [2, 4], tag="old", trainer=trainer)
    check_complete(run_dir, [2, 4])
    assert save([sys.executable], script, run_dir, [4], tag="new", kill="1", trainer=trainer) != 0
    check_torn_resave(run_dir, "actor")


def test_wrapping_is_lazy_and_once() -> None:
    """The module only installs a finder: no verl trainer is imported until verl imports it,
    and importing it twice does not wrap twice."""
    code = textwrap.dedent(
        """
        import sys
        import runtime.verl.save_marker as sm
        assert not any(m in sys.modules for m in sm.TARGETS), "imported a trainer eagerly"
        from verl.utils.checkpoint.checkpoint_handler import CheckpointHandler
        first = CheckpointHandler.save_checkpoint
        assert getattr(first, sm.WRAPPED)
        sm.install()
        assert CheckpointHandler.save_checkpoint is first and first.__wrapped__.__name__ == "save_checkpoint"
        import inspect; assert "def save_checkpoint" in inspect.getsource(first.__wrapped__)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]

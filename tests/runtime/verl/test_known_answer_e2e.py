"""The grading path end to end, with answers that are right: the eval stage's runner and
verl's own validation (its vLLM rollout and tool agent loop, `trainer.val_only`) grade
the same checkpoint on the same problems with the recipe's validation sampling (temperature
1.0, top-p 0.6), and agree.

The checkpoint is the tiny SFT model fine-tuned to memorise those problems' solutions
(tests/known_answer_model.py): the tiny SFT model alone scores ~0, which would make any
agreement, and the positive path of the scorer, mean@n and pass@k, untested.

The runner uses its transformers engine here: test_vllm_cpu_e2e.py shows it agrees with the
vLLM engine, and it saves CI a second vLLM start-up (~100 s)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from reconciler.backend import StageContext
from runtime.data.builtin import GeneratorOptions, expected_sft_messages, problems_for
from runtime.verl.common import StagePaths
from runtime.verl.rl import VLLM, render_rl
from tests.known_answer_model import memorise
from tests.runtime.verl.test_rl_e2e import SPECS, run_command, tiny_spec
from tests.runtime.verl.test_vllm_cpu_e2e import _eval

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (the `vllm` extra)"),
]

DATASET = "tiny_math_test"
SAMPLES = 4


def test_eval_and_verl_validation_grade_a_known_answer_model_alike(sandbox: str, sft_model: Path, tmp_path: Path) -> None:
    from runtime.data.prepare import prepare

    spec = tiny_spec()
    # 16 of the spec's test problems: enough to compare the two graders, half the memorising.
    dataset = spec.datasets[DATASET].model_copy(update={"options": {**spec.datasets[DATASET].options, "rows": 16}})
    problems = problems_for(GeneratorOptions.model_validate(dataset.options))  # exactly the problems the dataset holds
    known = memorise(sft_model, tmp_path / "known", [expected_sft_messages(p) for p in problems])
    test_data = prepare(DATASET, dataset, tmp_path / "data", SPECS)

    # The eval stage's runner with the recipe's validation sampling.
    result = _eval(known, "transformers", {DATASET: test_data.path}, sandbox, tmp_path / "eval", top_p=0.6)
    ours = result["datasets"][DATASET]

    # verl's validation of the same checkpoint: the RL stage as rendered, validation only.
    val_spec = tiny_spec(val=[f"dataset.{DATASET}"], validation={"n": SAMPLES, "before_train": True},
                         overrides=["trainer.val_only=True"])
    ctx = StageContext(spec=val_spec, spec_dir=str(SPECS), stage="rl", restart_id="0a11" * 8, total_steps=1,
                       inputs={"stage.sft": {"model_path": str(known)},
                               "dataset.tiny_math": {"path": prepare("tiny_math", spec.datasets["tiny_math"],
                                                                     tmp_path / "train", SPECS).path},
                               f"dataset.{DATASET}": {"path": test_data.path}})
    ckpt = tmp_path / "rl"
    ckpt.mkdir()
    paths = StagePaths(stage_dir=str(ckpt), ckpt_dir=str(ckpt), merged_dir=str(ckpt / "merged"))
    (cmd,) = render_rl(ctx, sandbox_url=sandbox, cpu=True, paths=paths, rollout=VLLM)
    run = run_command(cmd, ckpt / "val.log")
    assert run.rc == 0, run.log[-4000:]
    logged = {k: v for r in run.records for k, v in r.values.items()}
    source = pq.read_table(test_data.path, columns=["data_source"]).column(0)[0].as_py()  # verl's key, not our name
    verl_acc = logged[f"val-core/{source}/acc/mean@{SAMPLES}"]
    verl_calls = logged[f"val-aux/{source}/tool_calls/mean@{SAMPLES}"]
    print(f"{DATASET} mean@{SAMPLES}: eval {ours['mean_at_n']:.3f} (pass@k {ours['pass_at_k']}, tool calls "
          f"{ours['mean_tool_calls']:.2f}); verl validation {verl_acc:.3f} (tool calls {verl_calls:.2f}); "
          f"verl run {run.wall_s:.0f} s")

    # Right answers, reached through the tool, on both sides ...
    assert ours["mean_at_n"] >= 0.5 and verl_acc >= 0.5
    assert all(v > 0 for v in ours["pass_at_k"].values())
    assert ours["mean_tool_calls"] >= 0.8 and verl_calls >= 0.8
    # ... and two estimates of one accuracy: within 4 standard errors of their difference.
    n = ours["problems"] * ours["samples_per_problem"]
    p = (ours["mean_at_n"] + verl_acc) / 2
    assert abs(ours["mean_at_n"] - verl_acc) <= 4 * math.sqrt(2 * max(p * (1 - p), 1 / n) / n)
    assert abs(ours["mean_tool_calls"] - verl_calls) <= 0.25 * max(ours["mean_tool_calls"], verl_calls)

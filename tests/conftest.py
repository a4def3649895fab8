"""Shared pytest fixtures. Each helper's fixtures carry its own prefix; add, don't rewrite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from reconciler.spec import Spec

# --------------------------------------------------------------------------- data + models


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builtin tiny Qwen2 (untrained), built once per session. Treat it as read-only."""
    from runtime.models.tiny import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def session_sandbox_url() -> Iterator[str]:
    """A real sandbox server on loopback for the whole session (stopped at the end)."""
    from runtime.sandbox_process import ephemeral_sandbox

    with ephemeral_sandbox(workers=2) as url:
        yield url


# --------------------------------------------------------------------------- the tiny SFT model (slow tests)
# One sandbox server and one tiny SFT model per session: the transformers-rollout and
# vLLM-rollout end-to-end tests, the known-answer test and the Ray RL test all start from it,
# so CI trains it once.

SFT_SPECS = Path(__file__).resolve().parents[1] / "specs"
SFT_RID = "5f70" * 8


@pytest.fixture(scope="session")
def sandbox() -> Iterator[str]:
    from sandbox.testing import local_server

    with local_server(workers=2) as server:
        yield server.url


def shortened_sft_spec(spec: Spec) -> Spec:
    """The spec with its SFT data cut to 512 rows and its SFT to 3 epochs of them (96 steps)."""
    from reconciler.spec import Spec

    data = spec.model_dump(mode="json", exclude_unset=True)
    data["datasets"][spec.stages["sft"].train.removeprefix("dataset.")]["options"]["rows"] = 512
    data["stages"]["sft"]["epochs"] = 3
    return Spec.model_validate(data)


@pytest.fixture(scope="session")
def sft_model(sandbox: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny spec's SFT, as rendered (data and model from the project's builtins), merged,
    shortened to 96 steps on 512 of its rows: the tests that start from it need a model that
    calls the tool in the right format, which it has learnt by then, not one that copies the
    problem's numbers (the tiny spec's e2e test checks that). Set RETOOL_TEST_SFT_MODEL to a
    merged tiny SFT model directory to skip it (development)."""
    import os

    from reconciler.backend import StageContext
    from reconciler.loader import parse_spec_text
    from runtime.verl.common import TRACKER_FILE, StagePaths

    given = os.environ.get("RETOOL_TEST_SFT_MODEL")
    if given:
        return Path(given)
    from runtime.data.prepare import prepare
    from runtime.models.tiny import build_tiny_qwen2
    from runtime.verl.sft import render_merge, render_sft
    from tests.runtime.verl.test_rl_e2e import run_command

    root = tmp_path_factory.mktemp("sft")
    spec = shortened_sft_spec(parse_spec_text((SFT_SPECS / "retool-tiny.yaml").read_text()))
    sft = spec.stages["sft"]
    data = prepare("tiny_sft", spec.datasets["tiny_sft"], root / "data", SFT_SPECS, sandbox_url=sandbox)
    model = build_tiny_qwen2(root / "model", **spec.models["tiny"].options)
    ctx = StageContext(spec=spec, spec_dir=str(SFT_SPECS), stage="sft", restart_id=SFT_RID, inputs={
        sft.train: {"path": data.path}, sft.model: {"path": str(model)}})
    paths = StagePaths(stage_dir=str(root / "run"), ckpt_dir=str(root / "run"), merged_dir=str(root / "merged"))
    run = run_command(render_sft(ctx, paths, cpu=True), root / "sft.log")
    assert run.rc == 0, run.log[-3000:]
    step = int((root / "run" / TRACKER_FILE).read_text())
    merge = run_command(render_merge(f"{paths.ckpt_dir}/global_step_{step}", paths.merged_dir), root / "merge.log")
    assert merge.rc == 0, merge.log[-3000:]
    return Path(paths.merged_dir)

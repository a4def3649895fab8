"""The local backend's merge (runtime.local.finalize.LocalMerger) with a real subprocess that
stands in for verl's model merger: it merges into a temporary folder swapped in, records
what it merged in merged.json, and does no work twice."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from reconciler.backend import Checkpoint, RenderedCommand
from reconciler.errors import TerminalError
from runtime.local.finalize import MERGE_RECORD, LocalMerger
from runtime.verl.common import StagePaths

RID = "3c" * 32


def merger(tmp_path: Path) -> LocalMerger:
    run = tmp_path / "sft" / RID[:16]
    run.mkdir(parents=True)
    paths = StagePaths(stage_dir=str(run), ckpt_dir=str(run), merged_dir=str(run / "merged"))
    return LocalMerger(stage="sft", restart_id=RID, paths=paths, logs_dir=tmp_path / "logs", executable=list)


def writer(runs: Path, *, fail: bool = False) -> Callable[[str], RenderedCommand]:
    """A merge command: counts its runs, then writes config.json into its target (or fails)."""
    def command(target: str) -> RenderedCommand:
        code = (
            "import pathlib, sys; c = pathlib.Path(sys.argv[1]); c.write_text(c.read_text() + 'x') if c.exists() "
            "else c.write_text('x'); t = pathlib.Path(sys.argv[2]); "
            + ("sys.exit(3)" if fail else "t.mkdir(parents=True); (t / 'config.json').write_text('{}')")
        )
        return RenderedCommand(argv=[sys.executable, "-c", code, str(runs), target])
    return command


def test_merges_once_per_checkpoint_and_swaps_the_folder_in(tmp_path: Path) -> None:
    m, runs = merger(tmp_path), tmp_path / "runs"
    ckpt = Checkpoint(step=4, path=f"{m.paths.ckpt_dir}/global_step_4", valid=True, restart_id=RID)
    first = m.merge(writer(runs), ckpt, None)
    assert first.change == "created" and (Path(m.paths.merged_dir) / "config.json").is_file()
    assert not Path(m.paths.merged_dir + ".tmp").exists()
    assert json.loads((Path(m.paths.stage_dir) / MERGE_RECORD).read_text())["step"] == 4
    assert m.merge(writer(runs), ckpt, None).change == "unchanged" and runs.read_text() == "x"
    later = ckpt.model_copy(update={"step": 6, "path": f"{m.paths.ckpt_dir}/global_step_6"})
    assert m.merge(writer(runs), later, None).change == "created" and runs.read_text() == "xx"


def test_a_failed_merge_names_the_checkpoint_and_keeps_the_previous_model(tmp_path: Path) -> None:
    m, runs = merger(tmp_path), tmp_path / "runs"
    ckpt = Checkpoint(step=4, path=f"{m.paths.ckpt_dir}/global_step_4", valid=True, restart_id=RID)
    m.merge(writer(runs), ckpt, None)
    later = ckpt.model_copy(update={"step": 6, "path": f"{m.paths.ckpt_dir}/global_step_6"})
    with pytest.raises(TerminalError, match="merging global_step_6 failed"):
        m.merge(writer(runs, fail=True), later, None)
    assert (Path(m.paths.merged_dir) / "config.json").is_file()
    assert json.loads((Path(m.paths.stage_dir) / MERGE_RECORD).read_text())["step"] == 4

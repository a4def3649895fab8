"""samples.jsonl: append, torn lines, duplicates, complete rounds, what is left to draw;
and the eval "checkpoint" read from progress.json."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.eval.discover import eval_checkpoint
from runtime.eval.job import Progress
from runtime.eval.samples import Sample, append, complete_rounds, missing, read


def _s(dataset: str, problem: int, k: int) -> Sample:
    return Sample(dataset=dataset, problem=problem, sample=k, response="r", answer="1", ground_truth="1", correct=True, score=1.0)


def test_append_read_skips_torn_lines_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    assert append(path, [_s("a", 0, 0), _s("a", 1, 0)]) == 2
    append(path, [_s("a", 0, 0).model_copy(update={"response": "again"})])  # recorded twice: first kept
    with open(path, "a") as f:
        f.write('{"dataset": "a", "problem": 0, "sam')  # a crash mid-write
    got = read(path)
    assert [s.key for s in got] == [("a", 0, 0), ("a", 1, 0)]
    assert got[0].response == "r"
    assert read(tmp_path / "absent.jsonl") == []


def test_rounds_and_missing_go_round_by_round() -> None:
    problems = {"a": 2, "b": 1}
    have = [_s("a", 0, 0), _s("a", 1, 0), _s("b", 0, 0), _s("a", 0, 1), _s("b", 0, 1)]
    assert complete_rounds(have, problems) == 1
    assert missing(have, problems, 3) == [("a", 1, 1), ("a", 0, 2), ("a", 1, 2), ("b", 0, 2)]
    assert missing(have, problems, 1) == []
    assert complete_rounds([], problems) == 0


def test_eval_checkpoint_counts_only_under_its_restart_identity() -> None:
    progress = Progress(problems={"a": 2}, rounds=3, drawn=6, target=4).model_dump_json()
    marker = json.dumps({"restart_id": "abc", "stage": "e", "world_size": 1})
    (ok,) = eval_checkpoint(run_dir="/r", restart_id="abc", marker=marker, progress=progress)
    assert ok.valid and ok.step == 3
    (foreign,) = eval_checkpoint(run_dir="/r", restart_id="xyz", marker=marker, progress=progress)
    assert not foreign.valid and "another restart identity" in foreign.reason
    assert eval_checkpoint(run_dir="/r", restart_id="abc", marker=marker, progress=None) == []
    none_yet = Progress(problems={"a": 2}, rounds=0).model_dump_json()
    assert eval_checkpoint(run_dir="/r", restart_id="abc", marker=marker, progress=none_yet) == []

"""Every file between processes is one model (runtime/records.py): what a writer saves, a
reader loads back equal; older files read with defaults, wrong types and newer versions are
refused with the file and the field named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import records
from runtime.eval.job import EvalJob, Progress, Results
from runtime.records import (
    Attempt,
    EnvironmentRecord,
    ExitRecord,
    LaunchIntent,
    MergeRecord,
    MergeStamp,
    MultiNodePlan,
    PlannedCommand,
    PreparedDir,
    PreparedStamp,
    RankLiveness,
    RankRecord,
    RayLiveness,
    RayRanks,
    RaySandbox,
    Record,
    RecordError,
    RunPlan,
    SandboxRecord,
    StageProgress,
    StageResult,
    StageRun,
)

text = st.text(max_size=20)
ident = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=16)
seconds = st.floats(min_value=0, max_value=1e10, allow_nan=False)
maybe_int = st.none() | st.integers(min_value=0, max_value=10**9)
json_leaf = st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(allow_nan=False, allow_infinity=False) | text
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=8)
json_object = st.dictionaries(text, json_value, max_size=4)

RECORDS: dict[type[Record], st.SearchStrategy[Any]] = {
    StageRun: st.builds(StageRun, call_id=ident, segment=st.integers(0, 1000), app_name=ident, function=ident,
                        launched_at=seconds, head_call_id=st.none() | ident, launch_id=st.none() | ident,
                        previous_call_id=st.none() | ident),
    StageProgress: st.builds(
        StageProgress, step=maybe_int, total=maybe_int, segment=st.integers(0, 1000),
        attempt_started_at=st.none() | seconds, updated_at=st.none() | seconds, active_before=seconds, active_s=seconds,
        metrics=st.dictionaries(text, st.floats(allow_nan=False, allow_infinity=False), max_size=4),
        log_tail=st.lists(text, max_size=5),
        ranks=st.none() | st.dictionaries(st.integers(0, 64).map(str), st.builds(
            RankLiveness, state=st.sampled_from(["alive", "lost", "missing"]), seen_at=st.none() | seconds), max_size=4),
    ),
    StageResult: st.builds(StageResult, outcome=st.sampled_from(["finished", "continued", "failed"]), step=maybe_int,
                           segment=st.integers(0, 1000), next_call_id=st.none() | ident, active_s=seconds, message=text,
                           finished_at=st.none() | seconds),
    LaunchIntent: st.builds(LaunchIntent, launch_id=ident, function=ident, at=seconds),
    Attempt: st.builds(Attempt, segment=st.integers(0, 1000), started_at=seconds, call_id=st.none() | ident),
    MergeStamp: st.builds(MergeStamp, step=st.integers(0, 10**6), checkpoint=text,
                          tool_call_check=st.none() | json_object, outputs=json_object),
    PreparedStamp: st.builds(PreparedStamp, config=ident, outputs=json_object),
    RunPlan: st.builds(RunPlan, exit_path=text, commands=st.lists(st.builds(
        PlannedCommand, argv=st.lists(text, min_size=1, max_size=4), env=st.dictionaries(ident, text, max_size=3),
        cwd=st.none() | text), max_size=3)),
    ExitRecord: st.builds(ExitRecord, returncode=st.integers(-255, 255), signal=st.none() | st.just("SIGTERM"),
                          failed_command=st.none() | st.integers(0, 9), started_at=st.none() | seconds,
                          finished_at=seconds, cancelled=st.booleans()),
    MergeRecord: st.builds(MergeRecord, step=st.integers(0, 10**6), checkpoint=text, tool_check=st.none() | json_object),
    EvalJob: st.builds(EvalJob, datasets=st.dictionaries(ident, text, max_size=3),
                       temperature=st.floats(0, 2), top_p=st.floats(0, 1), gpu_memory_utilization=st.floats(0, 1),
                       tool_timeout_s=seconds),
    Progress: st.builds(Progress, problems=st.dictionaries(ident, st.integers(0, 1000), max_size=3),
                        rounds=st.integers(0, 100), drawn=st.integers(0, 10**5), target=st.integers(0, 100)),
    Results: st.builds(Results, generation_s=seconds, tokens_per_s=st.none() | seconds),
    EnvironmentRecord: st.builds(EnvironmentRecord, python=text, executable=text, device=text, digest=ident,
                                 packages=st.dictionaries(ident, text, max_size=4)),
    PreparedDir: st.builds(PreparedDir, config=ident, digest=st.none() | ident),
    SandboxRecord: st.builds(SandboxRecord, pid=st.integers(1, 2**22), url=text, start_ticks=maybe_int,
                             config_hash=ident, log_path=text),
    RaySandbox: st.builds(RaySandbox, submission_id=ident, url=text, node_ip=text, pid=st.integers(1, 2**22)),
    MultiNodePlan: st.builds(
        MultiNodePlan, run=st.builds(RunPlan, exit_path=text, commands=st.lists(st.builds(
            PlannedCommand, argv=st.lists(text, min_size=1, max_size=4)), max_size=2)),
        nodes=st.integers(2, 64), bundle=st.dictionaries(ident, st.floats(0, 1e12), max_size=4), run_tag=ident,
        cluster_id=ident, ranks_path=text, liveness_path=text, placement_timeout_s=seconds, join_timeout_s=seconds,
    ),
    RayRanks: st.builds(RayRanks, submission_id=ident, placement_group=ident, ranks=st.lists(st.builds(
        RankRecord, rank=st.integers(0, 64), node_id=ident, ip=text, argv=st.lists(text, max_size=4),
        returncode=st.none() | st.integers(-255, 255), message=text), max_size=3)),
    RayLiveness: st.builds(RayLiveness, updated_at=seconds, ranks=st.dictionaries(st.integers(0, 64).map(str), st.builds(
        RankLiveness, state=st.sampled_from(["alive", "lost", "missing"]), seen_at=st.none() | seconds), max_size=4)),
}


def test_every_record_has_a_round_trip_strategy() -> None:
    defined = {v for v in vars(records).values() if isinstance(v, type) and issubclass(v, Record) and v is not Record}
    assert defined - {RankLiveness, RankRecord, PlannedCommand} | {EvalJob, Progress, Results} == set(RECORDS)


@pytest.mark.parametrize("model", list(RECORDS), ids=lambda m: m.__name__)
def test_what_a_writer_saves_a_reader_loads_back_equal(model: type[Record], tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp(model.__name__) / "record.json"

    @settings(max_examples=40, deadline=None)
    @given(RECORDS[model])
    def round_trip(record: Record) -> None:
        records.save(path, record)
        assert records.load(model, path) == record
        assert records.parse(model, records.dumps(record), source="bytes") == record

    round_trip()


def test_a_missing_file_is_no_record(tmp_path: Path) -> None:
    assert records.load(StageRun, tmp_path / "run.json") is None


def test_an_older_file_reads_with_defaults_and_ignores_keys_it_no_longer_has(tmp_path: Path) -> None:
    """run.json as a container's hand-over wrote it before the chain's head and launch id
    were recorded: no version, no head_call_id, no launch_id."""
    old = {"call_id": "fc-2", "app_name": "retool-x", "function": "stage-sft", "segment": 1, "previous_call_id": "fc-1",
           "launched_at": 12.0, "retired_key": True}
    (tmp_path / "run.json").write_text(json.dumps(old))
    run = records.load(StageRun, tmp_path / "run.json")
    assert run is not None and (run.version, run.segment, run.head_call_id, run.launch_id) == (1, 1, None, None)


def test_a_wrong_type_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    path.write_text(json.dumps({"step": "twelve", "metrics": {"loss": "low"}}))
    with pytest.raises(RecordError) as bad:
        records.load(StageProgress, path)
    assert str(path) in bad.value.summary and "StageProgress" in bad.value.summary
    assert "step:" in bad.value.detail and "metrics.loss:" in bad.value.detail


def test_no_silent_coercion_of_strings_to_numbers() -> None:
    with pytest.raises(RecordError):
        records.parse(StageResult, {"outcome": "finished", "step": "6"}, source="a call's result")


def test_a_newer_version_is_refused_not_half_read() -> None:
    newer = json.dumps({"version": StageRun.VERSION + 1, "call_id": "fc", "app_name": "a", "function": "f",
                        "launched_at": 0.0})
    with pytest.raises(RecordError) as bad:
        records.parse(StageRun, newer, source="run.json")
    assert "newer retool" in bad.value.detail


def test_writers_stamp_the_current_version(tmp_path: Path) -> None:
    records.save(tmp_path / "r.json", LaunchIntent(launch_id="L", function="stage-sft", at=1.0))
    assert json.loads((tmp_path / "r.json").read_text())["version"] == LaunchIntent.VERSION
    records.append_line(tmp_path / "a.jsonl", Attempt(segment=0, started_at=1.0))
    records.append_line(tmp_path / "a.jsonl", Attempt(segment=1, started_at=2.0, call_id="fc"))
    lines = [records.parse(Attempt, line, source="a.jsonl") for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [(a.segment, a.call_id) for a in lines] == [(0, None), (1, "fc")]

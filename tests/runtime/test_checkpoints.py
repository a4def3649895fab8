"""Checkpoint validity over directory listings (runtime.checkpoints), and the local scan."""

from __future__ import annotations

from pathlib import Path

from runtime.checkpoints import (
    COMPLETE_FILE,
    CkptEntry,
    SaveComplete,
    evaluate,
    latest_valid,
    marker_content,
    scan_local,
    wants_content,
    write_complete,
)

RID = "a1" * 32
OTHER = "b2" * 32
CUR = RID[:16]


def shards(
    rdir: str, step: int, world: int, *, sub: str = "", kinds=("model", "optim", "extra_state"), skip=(),
    complete: bool = True, restart_id: str | None = None,
) -> list[CkptEntry]:
    """A save's files; `complete` adds its completion marker (written last by the save)."""
    base = f"{rdir}/global_step_{step}{sub}"
    out = [CkptEntry(path=f"{rdir}/global_step_{step}", is_dir=True)]
    for kind in kinds:
        for rank in range(world):
            if (kind, rank) in skip:
                continue
            out.append(CkptEntry(path=f"{base}/{kind}_world_size_{world}_rank_{rank}.pt", size=100))
    out.append(CkptEntry(path=f"{base}/huggingface", is_dir=True))
    if complete:
        out.append(done(rdir, step, world, restart_id or (RID if rdir == CUR else OTHER)))
    return out


def done(rdir: str, step: int, world: int, restart_id: str = RID) -> CkptEntry:
    body = SaveComplete(step=step, world_size=world, restart_id=restart_id).model_dump_json()
    return CkptEntry(path=f"{rdir}/global_step_{step}/{COMPLETE_FILE}", size=len(body), content=body)


def tracker(rdir: str, step: int | str) -> CkptEntry:
    return CkptEntry(path=f"{rdir}/latest_checkpointed_iteration.txt", size=2, content=str(step))


def marker(rdir: str, restart_id: str) -> CkptEntry:
    return CkptEntry(path=f"{rdir}/retool.json", size=10, content=marker_content(restart_id, "sft", 2))


def by_step(cks):
    return {c.step: c for c in cks}


def test_complete_checkpoints_are_valid_and_latest_is_the_highest():
    entries = shards(CUR, 2, 2) + shards(CUR, 4, 2) + [tracker(CUR, 4), marker(CUR, RID)]
    cks = evaluate(entries, 2, RID, root="/vol/ckpt/sft")
    assert [(c.step, c.valid) for c in cks] == [(2, True), (4, True)]
    assert cks[1].path == f"/vol/ckpt/sft/{CUR}/global_step_4"
    assert cks[1].world_size == 2 and cks[1].restart_id == RID
    assert latest_valid(cks, RID).step == 4


def test_missing_shard_names_the_rank():
    entries = shards(CUR, 3, 4, skip={("model", 2)}) + [tracker(CUR, 3)]
    (ck,) = evaluate(entries, 4, RID)
    assert not ck.valid and ck.reason == "missing model shard rank 2 of 4"


def test_missing_optimizer_shard_of_one_rank_is_invalid_but_no_optimizer_at_all_is_fine():
    partial = shards(CUR, 3, 2, skip={("optim", 1)}) + [tracker(CUR, 3)]
    assert evaluate(partial, 2, RID)[0].reason == "missing optim shard rank 1 of 2"
    model_only = shards(CUR, 3, 2, kinds=("model",)) + [tracker(CUR, 3)]
    assert evaluate(model_only, 2, RID)[0].valid


def test_empty_shard_is_invalid():
    entries = shards(CUR, 1, 1) + [tracker(CUR, 1)]
    entries = [e.model_copy(update={"size": 0}) if e.path.endswith("extra_state_world_size_1_rank_0.pt") else e for e in entries]
    assert evaluate(entries, 1, RID)[0].reason == "empty extra_state shard rank 0"


def test_step_beyond_tracker_is_being_written():
    entries = shards(CUR, 2, 1) + shards(CUR, 3, 1) + [tracker(CUR, 2)]
    cks = by_step(evaluate(entries, 1, RID))
    assert cks[2].valid
    assert not cks[3].valid and "still being written or interrupted" in cks[3].reason


def test_no_tracker_means_no_save_completed():
    (ck,) = evaluate(shards(CUR, 5, 1), 1, RID)
    assert not ck.valid and "latest_checkpointed_iteration.txt missing" in ck.reason
    (ck,) = evaluate(shards(CUR, 5, 1) + [tracker(CUR, "garbage")], 1, RID)
    assert not ck.valid


def test_world_size_mismatch_is_invalid():
    (ck,) = evaluate(shards(CUR, 5, 2) + [tracker(CUR, 5)], 4, RID)
    assert not ck.valid and ck.reason == "written by 2 processes, the stage runs 4"


def test_foreign_restart_identity_is_reported_not_resumed():
    entries = shards(OTHER[:16], 9, 1) + [tracker(OTHER[:16], 9), marker(OTHER[:16], OTHER)]
    entries += shards(CUR, 2, 1) + [tracker(CUR, 2)]
    cks = evaluate(entries, 1, RID)
    assert [(c.step, c.valid) for c in cks] == [(2, True), (9, False)]  # current first
    assert cks[1].restart_id == OTHER and "another restart identity" in cks[1].reason
    assert latest_valid(cks, RID).step == 2


def test_marker_with_another_identity_disqualifies_the_directory():
    # Same 16-character prefix, different full identity: the marker decides.
    clash = RID[:16] + "f" * 48
    entries = shards(CUR, 2, 1) + [tracker(CUR, 2), marker(CUR, clash)]
    (ck,) = evaluate(entries, 1, RID)
    assert not ck.valid and ck.restart_id == clash


def test_rl_actor_layout():
    entries = shards(CUR, 20, 2, sub="/actor") + [CkptEntry(path=f"{CUR}/global_step_20/data.pt", size=5), tracker(CUR, 20)]
    (ck,) = evaluate(entries, 2, RID, root="/r")
    assert ck.valid and ck.path == f"/r/{CUR}/global_step_20"


def test_scan_local_reads_a_real_directory(tmp_path: Path):
    run = tmp_path / CUR
    for step in (1, 2):
        d = run / f"global_step_{step}"
        (d / "huggingface").mkdir(parents=True)
        (d / "huggingface" / "config.json").write_text("{}")
        for kind in ("model", "optim", "extra_state"):
            (d / f"{kind}_world_size_1_rank_0.pt").write_bytes(b"x" * 10)
        write_complete(d, step, 1, RID, now=0.0)
    (run / "global_step_3").mkdir()  # a save that never got its shards
    (run / "latest_checkpointed_iteration.txt").write_text("2")
    (run / "retool.json").write_text(marker_content(RID, "sft", 1))
    (run / "merged").mkdir()
    (run / "merged" / "model.safetensors").write_bytes(b"m")
    entries = scan_local(tmp_path)
    assert not any("merged/" in e.path or "huggingface/" in e.path for e in entries)
    tracker_entry = next(e for e in entries if e.path.endswith("latest_checkpointed_iteration.txt"))
    assert tracker_entry.content == "2"
    cks = by_step(evaluate(entries, 1, RID, root=str(tmp_path)))
    assert cks[1].valid and cks[2].valid
    assert not cks[3].valid and cks[3].reason == "no model shards"
    assert scan_local(tmp_path / "absent") == []


# --------------------------------------------------------------------------- completion markers


def test_a_torn_resave_with_every_file_present_is_not_complete():
    """Step 4 is being saved again over an older copy: the old marker went first, so old and
    new shards side by side (all present, none empty, tracker already at 4) are invalid."""
    entries = shards(CUR, 2, 2) + shards(CUR, 4, 2, complete=False) + [tracker(CUR, 4), marker(CUR, RID)]
    cks = by_step(evaluate(entries, 2, RID))
    assert cks[2].valid
    assert not cks[4].valid and cks[4].reason.startswith(f"no completion marker ({COMPLETE_FILE})")
    assert latest_valid(list(cks.values()), RID).step == 2


def test_checkpoints_from_before_completion_markers_are_invalid_with_the_reason():
    (ck,) = evaluate(shards(CUR, 6, 1, complete=False) + [tracker(CUR, 6)], 1, RID)
    assert not ck.valid and "written by a retool without completion markers" in ck.reason


def test_completion_marker_must_name_this_step_world_size_and_identity():
    base = shards(CUR, 5, 2, complete=False) + [tracker(CUR, 5)]
    cases = {
        "completion marker is for step 3": done(CUR, 3, 2).model_copy(update={"path": f"{CUR}/global_step_5/{COMPLETE_FILE}"}),
        "completion marker says 1 ranks wrote it, the shards say 2": done(CUR, 5, 1),
        f"completion marker is from another restart identity ({OTHER[:16]})": done(CUR, 5, 2, OTHER),
        f"unreadable completion marker ({COMPLETE_FILE})": CkptEntry(path=f"{CUR}/global_step_5/{COMPLETE_FILE}", content="{"),
    }
    for reason, entry in cases.items():
        (ck,) = evaluate(base + [entry], 2, RID)
        assert (ck.valid, ck.reason) == (False, reason)
    (ck,) = evaluate(base + [done(CUR, 5, 2)], 2, RID)
    assert ck.valid


def test_scans_read_the_completion_marker_of_each_step():
    assert wants_content(f"{CUR}/global_step_12/{COMPLETE_FILE}")
    assert wants_content(f"{CUR}/latest_checkpointed_iteration.txt") and wants_content(f"{CUR}/retool.json")
    assert not wants_content(f"{CUR}/global_step_12/model_world_size_1_rank_0.pt")
    assert not wants_content(f"{CUR}/merged/{COMPLETE_FILE}")

"""Parsing verl's console metrics (runtime.metrics)."""

from __future__ import annotations

import json
from pathlib import Path

from reconciler.metric_names import display
from runtime.metrics import (
    headline,
    last_step,
    latest,
    parse_line,
    parse_text,
    read_file,
    series,
    sparkline,
    sparklines,
    sync_file,
    wandb_url,
)

# Lines as verl 0.9.1's SFT trainer printed them on CPU (tqdm's bar shares the line: it ends in \r).
SFT_LOG = (
    "Epoch 1/4:   0%|          | 0/8 [00:00<?, ?it/s]"
    "step:1 - perf/max_memory_allocated_gb:0.6047859191894531 - perf/cpu_memory_used_gb:1.02020263671875"
    " - train/loss:5.75 - train/grad_norm:4.299838542938232 - train/lr:0.001 - train/mfu:0.0"
    " - train/global_tokens:398 - train/total_tokens(B):3.98e-07\n"
    "Epoch 1/4:  12%|█▎        | 1/8 [00:00<00:01,  3.60it/s]\r"
    "step:2 - train/loss:5.4375 - train/grad_norm:3.0455174446105957 - train/lr:0.001\n"
    "Saving checkpoint to: /tmp/h5/ckpt/global_step_2\n"
    "Updated checkpoint tracker: /tmp/h5/ckpt/latest_checkpointed_iteration.txt\n"
)

# Two main_ppo steps as verl 0.9.1 printed them through Ray on CPU (keys abridged; ANSI colours kept).
RL_LOG = (
    "\x1b[36m(TaskRunnerV1 pid=15471)\x1b[0m step:1 - actor/pg_loss:-0.0305 - actor/grad_norm:0.34"
    " - actor/lr:1e-06 - critic/score/mean:-0.91875 - critic/rewards/mean:-0.91875 - response_length/mean:57.3125"
    " - num_turns/min:np.int32(2) - num_turns/mean:np.float64(3.625) - timing_s/step:12.88\n"
    "\x1b[36m(TaskRunnerV1 pid=15471)\x1b[0m step:2 - actor/pg_loss:-0.0931 - actor/grad_norm:0.244"
    " - actor/lr:1e-06 - val-core/aime_2024/acc/mean@1:np.float64(0.25) - val-aux/aime_2024/tool_calls/mean@1:np.float64(0.0)"
    " - critic/score/mean:-0.5 - critic/rewards/mean:-0.5 - response_length/mean:61.5625"
    " - num_turns/mean:np.float64(4.0)\n"
)


def test_parse_line_reads_every_key():
    rec = parse_line("step:1 - train/loss:5.75 - train/total_tokens(B):3.98e-07 - train/lr:1e-05")
    assert rec is not None and rec.step == 1
    assert rec.values == {"train/loss": 5.75, "train/total_tokens(B)": 3.98e-07, "train/lr": 1e-05}


def test_numpy_and_tensor_reprs_and_ray_prefix():
    rec = parse_line("(TaskRunner pid=4242) step:7 - critic/score/mean:np.float64(-0.6) - actor/pg_loss:tensor(0.25) - n:nan")
    assert rec is not None and rec.step == 7
    assert rec.values["critic/score/mean"] == -0.6
    assert rec.values["actor/pg_loss"] == 0.25
    assert rec.values["n"] != rec.values["n"]  # nan kept as nan


def test_lines_without_steps_are_ignored():
    assert parse_line("Saving checkpoint to: /x/global_step_2") is None
    assert parse_line("global_step:3 - a:1") is None


def test_parse_text_handles_tqdm_and_merges_same_step():
    text = SFT_LOG + "step:2 - val/loss:4.9\n"
    records = parse_text(text)
    assert [r.step for r in records] == [1, 2]
    assert records[0].values["train/loss"] == 5.75
    assert records[1].values == {"train/loss": 5.4375, "train/grad_norm": 3.0455174446105957, "train/lr": 0.001, "val/loss": 4.9}
    assert last_step(text) == 2
    assert latest(records)["train/loss"] == 5.4375
    assert list(headline(records))[:2] == ["train/loss", "val/loss"]
    assert series(records, "train/loss") == [5.75, 5.4375]


def test_sync_file_writes_jsonl_and_reads_back(tmp_path: Path):
    log, out = tmp_path / "run.log", tmp_path / "stage" / "metrics.jsonl"
    log.write_text(SFT_LOG)
    records = sync_file(log, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["train/loss"] == 5.4375
    assert read_file(out) == records
    mtime = out.stat().st_mtime_ns
    sync_file(log, out)  # unchanged log: file left alone
    assert out.stat().st_mtime_ns == mtime
    assert sync_file(tmp_path / "missing.log", tmp_path / "m.jsonl") == []


def test_sparkline_shape():
    assert sparkline([]) == ""
    assert sparkline([3.0, 3.0]) == "▅▅"
    rising = sparkline([float(i) for i in range(8)])
    assert rising == "▁▂▃▄▅▆▇█"
    squeezed = sparkline([float(i) for i in range(100)], width=10)
    assert len(squeezed) == 10 and squeezed[0] == "▁" and squeezed[-1] == "█"
    assert sparkline([1.0, float("nan"), 2.0]) == "▁█"


def test_wandb_url():
    text = "wandb: 🚀 View run qwen7b-sft at: https://wandb.ai/me/retool/runs/abc123xy\nstep:1 - a:1\n"
    assert wandb_url(text) == "https://wandb.ai/me/retool/runs/abc123xy"
    assert wandb_url(SFT_LOG) is None


def test_log_follower_reads_only_appended_complete_lines(tmp_path: Path):
    from runtime.metrics import LogFollower

    log = tmp_path / "run.log"
    log.write_text("step:1 - train/loss:2.0\nstep:2 - train/lo")
    follower = LogFollower(log)
    assert [r.step for r in follower.update()] == [1] and follower.changed
    with open(log, "a") as fh:
        fh.write("ss:1.5\nwandb: View run at: https://wandb.ai/a/b/runs/xyz\n")
    records = follower.update()
    assert [(r.step, r.values) for r in records] == [(1, {"train/loss": 2.0}), (2, {"train/loss": 1.5})]
    assert follower.wandb_url == "https://wandb.ai/a/b/runs/xyz"
    follower.update()
    assert not follower.changed  # nothing new
    assert LogFollower(tmp_path / "absent.log").update() == []


def test_display_names_for_sft_from_verl_keys():
    values = headline(parse_text(SFT_LOG))
    assert display(values) == {"loss": 5.4375, "grad_norm": 3.0455174446105957, "lr": 0.001}
    assert sparklines(parse_text(SFT_LOG)) == {"loss": "█▁"}


def test_display_names_for_rl_reward_length_and_tool_calls():
    records = parse_text(RL_LOG)
    assert [r.step for r in records] == [1, 2]
    values = headline(records)
    assert values["val-core/aime_2024/acc/mean@1"] == 0.25  # any validation set's accuracy is headline
    assert display(values) == {
        "reward": -0.5, "response_length": 61.5625,
        "tool_calls": 1.0,  # 4 turns: prompt, call, tool output, answer
        "pg_loss": -0.0931, "grad_norm": 0.244, "lr": 1e-06, "val_acc": 0.25,
    }
    assert sparklines(records) == {"reward": "▁█"}
    two_sets = {"val-core/a/acc/mean@4": 0.5, "val-core/b/acc/mean@4": 0.0}
    assert display(two_sets) == {"val_acc/a": 0.5, "val_acc/b": 0.0}
    assert sparklines([]) == {} and display({"gpu_seconds": 60.0}) == {}

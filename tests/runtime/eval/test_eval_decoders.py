"""The transformers eval engine's two decoding loops: which one runs where (the table from
docs/eval-engine.md's measurements), and that transformers' `generate` path returns what
retool's own loop returns (greedy, the builtin tiny Qwen2 on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.eval import engine as eval_engine
from runtime.eval.engine import Completion, Sampling, TransformersEngine, pick_decoder, split_completion


def test_pick_decoder_follows_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eval_engine, "DECODERS", {"cuda": ((1, "generate"), (32, "retool")), "cpu": ((1, "retool"),)})
    assert [pick_decoder("cuda", rows) for rows in (1, 31, 32, 64)] == ["generate", "generate", "retool", "retool"]
    assert pick_decoder("cuda:1", 1) == "generate"  # any CUDA device counts as cuda
    assert pick_decoder("cpu", 64) == "retool"
    assert pick_decoder("mps", 8) == "retool"  # not measured: retool's loop


def test_committed_table_is_well_formed() -> None:
    for device, rows in eval_engine.DECODERS.items():
        thresholds = [fewest for fewest, _ in rows]
        assert thresholds[0] == 1 and thresholds == sorted(set(thresholds)), device
        assert {decoder for _, decoder in rows} <= {"retool", "generate"}
    # every batch size has a decoder on the devices the eval runs on
    assert pick_decoder("cpu", 1) and pick_decoder("cuda", 1)


def test_split_completion_stops_at_the_first_end_token_or_the_budget() -> None:
    eos = frozenset({7, 9})
    assert split_completion([1, 2, 7, 0, 0], 5, eos) == Completion(token_ids=[1, 2, 7], finish="stop")
    assert split_completion([1, 2, 3, 4, 9], 3, eos) == Completion(token_ids=[1, 2, 3], finish="length")
    assert split_completion([1, 9], 5, eos) == Completion(token_ids=[1, 9], finish="stop")
    # a row whose budget ended before its end token: `generate` decoded past it for longer rows
    assert split_completion([5, 5, 5, 9], 2, eos) == Completion(token_ids=[5, 5], finish="length")


def test_generate_decoder_matches_retools_loop_greedy(tiny_model_dir: Path) -> None:
    greedy = Sampling(temperature=0.0, top_p=1.0, seed=0)
    ours = TransformersEngine(str(tiny_model_dir), greedy, batch_size=4, device="cpu", decoder="retool")
    theirs = TransformersEngine.wrap(ours.engine, greedy, batch_size=4, decoder="generate")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15], [16]]  # uneven: left padding
    budgets = [12, 3, 8, 1]
    a, b = ours.generate(prompts, budgets), theirs.generate(prompts, budgets)
    assert a == b
    assert all(1 <= len(c.token_ids) <= m for c, m in zip(b, budgets))
    assert all(c.finish == "length" for c, m in zip(b, budgets) if len(c.token_ids) == m and c.token_ids[-1] not in
               ours.engine.eos_ids)

"""The eval runner end to end on the builtin tiny Qwen2 (CPU) with a real sandbox: samples,
progress and results on disk; raising `samples` draws only the new samples."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from runtime.data.rl_rows import to_rl_row
from runtime.eval import samples as sample_file
from runtime.eval.job import PROGRESS_FILE, EvalJob, Progress, Results, read_model
from runtime.eval.run import run
from runtime.eval.samples import RESULTS_FILE, SAMPLES_FILE




def _dataset(path: Path, problems: list[tuple[str, str]], source: str) -> str:
    import pandas as pd

    rows = [to_rl_row(q, a, source, i) for i, (q, a) in enumerate(problems)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def test_run_draws_grades_and_resumes(tiny_model_dir: Path, session_sandbox_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    datasets = {
        "math": _dataset(tmp_path / "math.parquet", [("What is 2+2?", "4"), ("What is 3*3?", "9"), ("1+0?", "1")], "tiny_math"),
        "aime": _dataset(tmp_path / "aime.parquet", [("Find 10*10.", "100")], "aime_2024"),
    }
    job = EvalJob(
        stage="e", model_dir=str(tiny_model_dir), datasets=datasets, samples=2, temperature=1.0, top_p=0.9, seed=1,
        max_prompt_length=256, max_response_length=24, max_assistant_turns=2, max_user_turns=2,
        max_tool_response_length=64, engine="transformers", batch_size=3, device="cpu", sandbox_url=session_sandbox_url,
        out_dir=str(tmp_path / "run"),
    )
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="retool.eval"):
        first = run(job)
    assert [r for r in caplog.messages if r.startswith("drew ")].__len__() == 4 * 2
    drawn = sample_file.read(out / SAMPLES_FILE)
    assert sorted(s.key for s in drawn) == sorted((d, p, k) for d, n in (("math", 3), ("aime", 1)) for p in range(n) for k in range(2))
    assert all(s.response_tokens <= 24 for s in drawn)
    assert read_model(out / PROGRESS_FILE, Progress).rounds == 2
    saved = read_model(out / RESULTS_FILE, Results)
    assert saved == first and saved.samples == 2 and set(saved.datasets) == {"math", "aime"}
    assert saved.datasets["math"].pass_at_k.keys() == {"1", "2"}
    assert saved.generated_tokens > 0 and saved.tokens_per_s

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="retool.eval"):
        more = run(job.model_copy(update={"samples": 3}))
    new = [r for r in caplog.messages if r.startswith("drew ")]
    assert len(new) == 4 and all(" sample 2:" in r for r in new)  # only the third round is drawn
    assert any("4 already drawn" not in r and "8 already drawn (2 complete rounds); drawing 4" in r for r in caplog.messages)
    after = sample_file.read(out / SAMPLES_FILE)
    assert {s.key: s for s in after if s.sample < 2} == {s.key: s for s in drawn}  # kept as drawn
    assert more.samples == 3 and read_model(out / PROGRESS_FILE, Progress).rounds == 3
    assert more.datasets["aime"].pass_at_k.keys() == {"1", "2"}

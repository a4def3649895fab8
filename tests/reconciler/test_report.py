"""`retool report`: a self-contained page (no script, nothing fetched) that headless
Chromium renders without console errors; the test saves its screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from reconciler.cli.report import ReportData, StageCurves, line_chart, render_report
from reconciler.evaluations import eval_table
from tests.reconciler.test_status_eval import _state

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _data() -> ReportData:
    spec, state = _state()
    sft = StageCurves(
        address="stage.sft", kind="sft", status="succeeded", steps="96/96",
        series={"train/loss": [(float(s), 3.0 / (1 + s)) for s in range(1, 97)]},
    )
    rl = StageCurves(
        address="stage.rl", kind="rl", status="succeeded", steps="2/2",
        series={
            "critic/score/mean": [(1.0, -0.9), (2.0, -0.7)], "response_length/mean": [(1.0, 70.0), (2.0, 80.5)],
            "num_turns/mean": [(1.0, 3.9), (2.0, 4.1)], "val-core/aime_2024/acc/mean@1": [(0.0, 0.0), (2.0, 0.25)],
        },
    )
    empty = StageCurves(address="stage.other", kind="sft", status="running", note="the modal backend cannot read metric files from here")
    return ReportData(spec_name="evals", backend="local", serial=7, created_at=0.0, stages=[sft, rl, empty],
                      evaluations=eval_table(spec, state))


def test_page_is_self_contained_and_has_every_section() -> None:
    page = render_report(_data())
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched
    assert page.count("<svg") == 1 + 4 + 1  # sft loss; rl reward, length, tool calls, val acc; one pass@k chart
    for text in ("Training", "Evaluation", "pass@k by model", "stage.eval_sft", "4: 0.625", "tool calls per response",
                 "aime_2024/acc/mean@1", "cannot read metric files"):
        assert text in page, text


def test_each_stage_names_its_wandb_run_as_text() -> None:
    from reconciler.state.base import WandbRun

    offline = WandbRun(mode="offline", project="retool", group="evals", run_id="evals-sft-0123",
                       run_dirs=["/v/sft/x/wandb/offline-run-1-evals-sft-0123"],
                       sync_command="wandb sync /v/sft/x/wandb/offline-run-1-evals-sft-0123")
    online = offline.model_copy(update={"mode": "online", "url": "https://wandb.ai/me/retool/runs/evals-rl-9",
                                        "run_dirs": [], "sync_command": None})
    data = _data()
    sft, rl, empty = data.stages
    page = render_report(data.model_copy(update={"stages": [
        sft.model_copy(update={"wandb": offline}), rl.model_copy(update={"wandb": online}), empty,
    ]}))
    assert "W&amp;B offline: <code>/v/sft/x/wandb/offline-run-1-evals-sft-0123</code>" in page
    assert "upload with <code>wandb sync /v/sft/x/wandb/offline-run-1-evals-sft-0123</code>" in page
    assert "<code>https://wandb.ai/me/retool/runs/evals-rl-9</code>" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # named, never fetched


def test_charts_escape_names_and_skip_missing_values() -> None:
    svg = line_chart("a<b", [("x&y", [(1.0, 1.0), (2.0, float("nan")), (3.0, 2.0)])])
    assert "a&lt;b" in svg and "x&amp;y" in svg and svg.count("<circle") == 2
    assert "no data" in line_chart("t", [("x", [])])


def _chromium(page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--host-resolver-rules=MAP * ~NOTFOUND", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )


def console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_renders_it_without_console_errors(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_report(_data()), encoding="utf-8")
    shot = tmp_path / "report.png"
    done = _chromium(page, f"--screenshot={shot}", "--window-size=1280,1400", "--hide-scrollbars")
    assert done.returncode == 0, done.stderr[-2000:]
    assert console_lines(done.stderr) == []
    assert shot.stat().st_size > 10_000
    dom = _chromium(page, "--dump-dom")
    assert dom.stdout.count("<svg") == 6 and console_lines(dom.stderr) == []
    # the check sees a console error when there is one
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('broken chart')</script></body></html>")
    assert any("broken chart" in ln for ln in console_lines(_chromium(bad, "--dump-dom").stderr))

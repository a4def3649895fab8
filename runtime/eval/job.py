"""What one eval run is told to do (`job.json` in its run directory), and what it leaves.

The backend writes the job; `python -m runtime.eval.run JOB` runs it. The run directory
holds, besides verl-free files only:

    job.json        this job (paths as the running process sees them)
    samples.jsonl   every graded sample (runtime.eval.samples), appended as drawn
    progress.json   problems per dataset and sample rounds complete, rewritten after each batch
    results.json    per-dataset metrics for `samples` per problem, written at the end

`progress.json` is what checkpoint discovery reads: an eval stage's "checkpoint" is its
number of complete sample rounds (every problem has samples 0..r-1), so raising `samples`
resumes from it and the reconciler's step arithmetic applies unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.eval.metrics import DatasetMetrics
from runtime.records import Record

JOB_FILE = "job.json"
PROGRESS_FILE = "progress.json"


class EvalJob(Record):
    """`job.json`: written by the backend, read by the runner (a versioned record: runtime.records)."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    model_dir: str
    datasets: dict[str, str] = Field(description="Dataset name -> prepared parquet file.")
    samples: int
    temperature: float
    top_p: float
    seed: int
    max_prompt_length: int
    max_response_length: int
    max_assistant_turns: int
    max_user_turns: int
    max_tool_response_length: int
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    batch_size: int = 64
    gpus: int = 0
    device: Literal["cpu", "cuda"] | None = None  # transformers engine; None: CUDA when present
    gpu_memory_utilization: float = 0.9
    sandbox_url: str
    tool_timeout_s: float = 30.0
    tool_memory_limit_mb: int = 1024
    tool_rate_limit: int = 128
    tool_num_workers: int = 128
    lenient_fences: bool = False  # the spec's `recipe:` options (tool and reward), as in RL
    strip_answer: bool = False
    answer_window: int = 100
    out_dir: str


class Progress(Record):
    """`progress.json`: written by the runner, read by checkpoint discovery and finalize."""

    problems: dict[str, int] = Field(default_factory=dict)
    rounds: int = 0  # sample rounds complete for every problem
    drawn: int = 0  # samples on disk
    target: int = 0  # samples per problem the last run was asked for


class Results(Record):
    """`results.json`: written by the runner at the end, read by finalize."""

    stage: str = ""
    model: str = ""
    samples: int = 0
    engine: str = ""
    datasets: dict[str, DatasetMetrics] = Field(default_factory=dict)
    generated_tokens: int = 0  # by the last run (assistant tokens)
    generation_s: float = 0.0
    tokens_per_s: float | None = None
    device: str = ""


def read_model(path: Path, model: type[BaseModel]) -> Any:
    """The file parsed as `model`, or None when missing or unreadable."""
    try:
        return model.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

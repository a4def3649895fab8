"""One graded sample, and the `samples.jsonl` file that keeps every one of them.

The file is append-only: the generator appends a line per finished sample and flushes, so
a crash loses at most the samples in flight, and a resumed run reads what is there and
draws only what is missing. A torn last line (a crash mid-write) is ignored; a sample
recorded twice (a crash between writing it and recording progress) counts once.

Pure: no torch, no transformers (status, report and tests read these files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"


class Sample(BaseModel):
    """One response to one problem, graded with the recipe's scorer."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    dataset: str = Field(description="Dataset name (without `dataset.`).")
    problem: int = Field(description="Problem index in the dataset (its row order).")
    sample: int = Field(description="Sample index for this problem, 0-based.")
    response: str = Field(description="Decoded response: assistant turns and tool outputs, as the reward sees it.")
    answer: str | None = Field(None, description="Extracted answer (last \\boxed{} the scorer read), or None.")
    ground_truth: str
    correct: bool
    score: float = Field(description="The recipe's reward for this response (tool bonus included).")
    tool_calls: int = Field(0, description="Tool calls the model made.")
    turns: int = Field(0, description="verl's num_turns: user + assistant turns + 1.")
    response_tokens: int = Field(0, description="Tokens after the prompt (assistant and tool tokens).")
    truncated: bool = Field(False, description="The response hit max_response_length before the model stopped.")

    @property
    def key(self) -> tuple[str, int, int]:
        return self.dataset, self.problem, self.sample


def append(path: Path, samples: Iterable[Sample]) -> int:
    """Append samples as JSON lines, flushed to disk; returns how many were written."""
    lines = [s.model_dump_json() + "\n" for s in samples]
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    return len(lines)


def read(path: Path) -> list[Sample]:
    """Every sample in the file, first occurrence of each key kept, torn lines skipped."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse(f)


def parse(lines: Iterable[str] | str) -> list[Sample]:
    """Samples from JSON lines (a file's text or its lines): see `read`."""
    seen: dict[tuple[str, int, int], Sample] = {}
    for line in lines.splitlines() if isinstance(lines, str) else lines:
        line = line.strip()
        if not line:
            continue
        try:
            sample = Sample.model_validate(json.loads(line))
        except (ValueError, ValidationError):
            continue  # a line cut short by a crash
        seen.setdefault(sample.key, sample)
    return list(seen.values())


def complete_rounds(samples: Iterable[Sample], problems: dict[str, int]) -> int:
    """Sample rounds finished for every problem: the largest r such that every problem of
    every dataset (`problems`: dataset -> problem count) has samples 0..r-1."""
    have: dict[tuple[str, int], set[int]] = {}
    for s in samples:
        have.setdefault((s.dataset, s.problem), set()).add(s.sample)
    rounds: int | None = None
    for dataset, count in problems.items():
        for p in range(count):
            drawn = have.get((dataset, p), set())
            r = 0
            while r in drawn:
                r += 1
            rounds = r if rounds is None else min(rounds, r)
    return rounds or 0


def missing(samples: Iterable[Sample], problems: dict[str, int], n: int) -> list[tuple[str, int, int]]:
    """(dataset, problem, sample index) still to draw for `n` samples per problem, in the
    order they are drawn: round by round, so an interrupted run leaves whole rounds."""
    have = {s.key for s in samples}
    out: list[tuple[str, int, int]] = []
    for k in range(n):
        for dataset, count in problems.items():
            out += [(dataset, p, k) for p in range(count) if (dataset, p, k) not in have]
    return out

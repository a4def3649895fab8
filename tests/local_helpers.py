"""Shared pieces of the local-backend tests: a tiny Qwen2 (built once per test process),
small tool-call SFT data in the real messages+tools layout, a free port."""

from __future__ import annotations

import json
import random
import socket
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=1)
def tiny_model() -> Path:
    """runtime.models' builtin tiny Qwen2 (~200k parameters, trained tokenizer, chat template)."""
    from runtime.models.tiny import build_tiny_qwen2

    out = Path(tempfile.mkdtemp(prefix="retool-tiny-model-")) / "tiny"
    return build_tiny_qwen2(out, seed=0)


def sft_rows(rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """ReTool-style conversations: question, a code_interpreter call, its output, the answer."""
    from runtime.data.retool_sft import TOOLS, convert_solution, solution_text

    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        text = solution_text(f"Multiply {a} by {b} with Python.", f"print({a} * {b})", str(a * b), f"\\boxed{{{a * b}}}")
        out.append({"messages": convert_solution(f"What is {a} * {b}?", text), "tools": TOOLS})
    return out


def write_sft_parquet(out_dir: Path, rows: int, seed: int = 0) -> Path:
    """The rows written the way runtime.data writes SFT datasets; returns the parquet file."""
    from runtime.data.prepare import write_dataset

    outputs = write_dataset(out_dir, sft_rows(rows, seed), "sft", {"name": "test"})
    return Path(outputs.path)


def write_sft_jsonl(path: Path, rows: int, seed: int = 0) -> Path:
    """The same rows as a jsonl file, for `path:` dataset sources of format `messages`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(rows, seed)))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

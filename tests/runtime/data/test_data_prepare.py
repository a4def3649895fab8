"""Dataset preparation end to end: real files, the real sandbox, verl's own dataset classes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from reconciler.builtins import GENERATOR_FORMATS
from reconciler.errors import TerminalError
from reconciler.spec import Dataset
from runtime.data import prepare, read_outputs
from runtime.data.builtin import GENERATORS
from runtime.data.formats import SFT_FORMATS
from runtime.data.problems import CALL_PHRASE
from runtime.data.retool_sft import TOOLS

REPO = Path(__file__).resolve().parents[3]
SPEC_DIR = REPO / "specs"


def _closed_port_endpoint() -> str:
    from runtime.sandbox_process import free_port

    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


def sft_dataset(parquet: str, tokenizer_dir: Path, max_length: int = 512):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = {"max_length": max_length, "truncation": "error", "messages_key": "messages", "tools_key": "tools"}
    return tok, MultiTurnSFTDataset(parquet, tok, config)


def trained_text(tok, item) -> str:  # type: ignore[no-untyped-def]
    """The tokens verl's loss mask trains on, decoded."""
    n = int(item["attention_mask"].sum())
    return tok.decode(item["input_ids"][:n][item["loss_mask"][:n].bool()])


# --------------------------------------------------------------------------- RL rows


def test_local_aime_jsonl_becomes_rl_parquet(tmp_path: Path) -> None:
    out = prepare("aime", Dataset(source="path:data/aime_2024.jsonl", format="aime_2024"), tmp_path / "aime", SPEC_DIR)
    assert (out.rows, out.skipped) == (30, 0)
    assert out.columns == ["data_source", "prompt", "ability", "reward_model", "agent_name", "extra_info"]
    rows = pq.read_table(out.path).to_pylist()
    assert rows[0]["reward_model"] == {"style": "rule", "ground_truth": "204"}
    assert rows[0]["agent_name"] == "tool_agent"
    assert [r["extra_info"]["index"] for r in rows] == list(range(30))
    meta = json.loads((tmp_path / "aime" / "meta.json").read_text())
    assert (meta["rows"], meta["digest"], meta["source"], meta["format"]) == (30, out.digest, "path:data/aime_2024.jsonl", "aime_2024")


def test_rl_parquet_loads_through_verl_rlhf_dataset(tmp_path: Path, tiny_model_dir: Path) -> None:
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    out = prepare("aime", Dataset(source="path:data/aime_2024.jsonl", format="aime_2024", max_rows=4), tmp_path / "a", SPEC_DIR)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 4096, "filter_overlong_prompts": True,
                               "cache_dir": str(tmp_path / "cache")})
    ds = RLHFDataset(out.path, tok, config)
    assert len(ds) == 4
    item = ds[1]
    assert item["raw_prompt"][0]["role"] == "user"
    assert item["raw_prompt"][0]["content"].endswith("\\boxed{'The final answer goes here.'}")
    assert item["index"] == 1
    assert item["tools_kwargs"] == {"code_interpreter": {"create_kwargs": {"ground_truth": item["reward_model"]["ground_truth"]}}}
    assert item["agent_name"] == "tool_agent"


def test_max_rows_and_identical_digest_on_rewrite(tmp_path: Path) -> None:
    spec = Dataset(source="path:data/aime_2024.jsonl", format="aime_2024", max_rows=4)
    first = prepare("aime", spec, tmp_path / "aime", SPEC_DIR)
    second = prepare("aime", spec, tmp_path / "aime", SPEC_DIR)
    assert first.rows == 4
    assert first == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aime"]  # no temp dirs left behind
    assert read_outputs(tmp_path / "aime") == first
    other = prepare("aime", Dataset(source="path:data/aime_2024.jsonl", format="aime_2024", max_rows=5), tmp_path / "b", SPEC_DIR)
    assert other.digest != first.digest


def test_read_outputs_notices_altered_files(tmp_path: Path) -> None:
    out = prepare("aime", Dataset(source="path:data/aime_2024.jsonl", format="aime_2024", max_rows=2), tmp_path / "a", SPEC_DIR)
    with open(out.path, "ab") as f:
        f.write(b"x")
    assert read_outputs(tmp_path / "a") is None
    assert read_outputs(tmp_path / "missing") is None


def test_dapo_parquet_source(tmp_path: Path) -> None:
    import pyarrow as pa

    src = tmp_path / "dapo" / "part-0.parquet"
    src.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": f"Problem {i}"}], "ability": "MATH",
         "reward_model": {"ground_truth": str(i), "style": "rule"}, "extra_info": {"index": f"uuid-{i}"}}
        for i in range(3)
    ]), src)
    out = prepare("dapo", Dataset(source=f"path:{src.parent}", format="dapo_math"), tmp_path / "out", tmp_path)
    rows = pq.read_table(out.path).to_pylist()
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["0", "1", "2"]
    assert rows[2]["prompt"][0]["content"].startswith("Problem 2\nThe answer format must be")


def test_rows_that_do_not_fit_the_format_fail_with_a_hint(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "no answer here"}\n' * 3)
    with pytest.raises(TerminalError) as err:
        prepare("bad", Dataset(source="path:bad.jsonl", format="aime_2025"), tmp_path / "out", tmp_path)
    assert "3 of 3 rows" in err.value.summary and "problem/answer" in err.value.hint
    assert not (tmp_path / "out").exists()


def test_missing_path_is_a_terminal_error(tmp_path: Path) -> None:
    with pytest.raises(TerminalError, match="does not exist"):
        prepare("x", Dataset(source="path:nowhere.jsonl", format="rl"), tmp_path / "out", tmp_path)


# --------------------------------------------------------------------------- SFT rows


def test_messages_jsonl_with_json_string_fields_is_normalised_and_verl_trains_on_assistant_turns(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    row = {
        "messages": [
            {"role": "user", "content": "What is 6*7?"},
            {"role": "assistant", "content": "Compute it.", "tool_calls": [
                {"type": "function", "function": {"name": "code_interpreter", "arguments": json.dumps({"code": "print(6*7)"})}}
            ]},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "\\boxed{42}"},
        ],
        "tools": json.dumps(TOOLS),
    }
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    out = prepare("m", Dataset(source="path:m.jsonl", format="messages"), tmp_path / "out", tmp_path)
    stored = pq.read_table(out.path).to_pylist()[0]
    assert stored["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"code": "print(6*7)"}
    assert stored["tools"] == TOOLS
    tok, ds = sft_dataset(out.path, tiny_model_dir)
    assert trained_text(tok, ds[0]) == (
        'Compute it.\n<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(6*7)"}}\n</tool_call>'
        "<|im_end|>\n\\boxed{42}<|im_end|>\n"
    )


def test_retool_sft_hugging_face_layout(tmp_path: Path, tiny_model_dir: Path) -> None:
    import pyarrow as pa

    solution = "Let me check.\n<code>\n```python\nprint(2**10)\n```\n</code>\n<interpreter>\n1024\n</interpreter>\n<answer>\\boxed{1024}</answer>"
    rows = [{"messages": [
        {"role": "user", "content": "Use the tools.\n*user question:*\nWhat is 2^10?"},
        {"role": "assistant", "content": solution},
    ]}] * 2
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "retool.parquet")
    out = prepare("r", Dataset(source="path:retool.parquet", format="retool_sft"), tmp_path / "out", tmp_path)
    messages = pq.read_table(out.path).to_pylist()[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[0]["content"] == "What is 2^10?"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"code": "print(2**10)"}
    assert messages[2]["content"] == "1024"
    _, ds = sft_dataset(out.path, tiny_model_dir)
    assert len(ds) == 2 and int(ds[0]["loss_mask"].sum()) > 0


def test_builtin_tiny_sft_runs_code_in_the_real_sandbox_and_loads_in_verl(
    tmp_path: Path, tiny_model_dir: Path, session_sandbox_url: str
) -> None:
    spec = Dataset(source="builtin:tiny_sft", format="messages", options={"rows": 24, "seed": 0})
    out = prepare("tiny_sft", spec, tmp_path / "sft", SPEC_DIR, sandbox_url=session_sandbox_url)
    assert (out.rows, out.columns) == (24, ["messages", "tools"])
    rows = pq.read_table(out.path).to_pylist()
    for row in rows:
        user, call, tool, final = row["messages"]
        assert call["content"] == CALL_PHRASE
        assert final["content"] == f"The answer is \\boxed{{{tool['content']}}}."
        assert tool["content"].lstrip("-").isdigit()
    tok, ds = sft_dataset(out.path, tiny_model_dir)
    assert len(ds) == 24
    assert max(int(ds[i]["attention_mask"].sum()) for i in range(24)) <= 512
    assert trained_text(tok, ds[0]).startswith(CALL_PHRASE + "\n<tool_call>\n")
    again = prepare("tiny_sft", spec, tmp_path / "sft2", SPEC_DIR, sandbox_url=session_sandbox_url)
    assert again.digest == out.digest  # the generator and the sandbox are deterministic


def test_builtin_tiny_sft_starts_its_own_sandbox_when_given_none(tmp_path: Path) -> None:
    spec = Dataset(source="builtin:tiny_sft", format="retool_sft", options={"rows": 3, "seed": 5})
    out = prepare("tiny_sft", spec, tmp_path / "sft", SPEC_DIR)
    assert out.rows == 3


def test_builtin_tiny_math_rows(tmp_path: Path) -> None:
    out = prepare("m", Dataset(source="builtin:tiny_math", format="rl", options={"rows": 16, "seed": 1}), tmp_path / "m", SPEC_DIR)
    rows = pq.read_table(out.path).to_pylist()
    assert len(rows) == 16 and len({r["prompt"][0]["content"] for r in rows}) == 16
    assert all(r["data_source"] == "tiny_math" and r["reward_model"]["ground_truth"].lstrip("-").isdigit() for r in rows)


def test_the_spec_checks_builtin_formats_as_preparation_does() -> None:
    assert GENERATOR_FORMATS == {"tiny_sft": SFT_FORMATS, "tiny_math": ("rl",)}
    assert set(GENERATOR_FORMATS) == set(GENERATORS)


@pytest.mark.parametrize(
    ("source", "fmt", "options", "match"),
    [
        ("builtin:tiny_math", "messages", {}, "format: rl"),
        ("builtin:tiny_sft", "rl", {}, "format: messages"),
        ("builtin:nope", "rl", {}, "builtins: tiny_sft, tiny_math"),
        ("builtin:tiny_math", "rl", {"rowz": 3}, "valid options"),
    ],
)
def test_builtin_misuse_is_a_terminal_error(tmp_path: Path, source: str, fmt: str, options: dict, match: str) -> None:
    """The spec rejects these when it loads (tests/reconciler/test_builtin_options.py); preparation
    still refuses a dataset built without validation."""
    with pytest.raises(ValidationError):
        Dataset(source=source, format=fmt, options=options)  # type: ignore[arg-type]
    with pytest.raises(TerminalError) as err:
        unchecked = Dataset.model_construct(source=source, format=fmt, options=options)  # type: ignore[arg-type]
        prepare("x", unchecked, tmp_path / "x", SPEC_DIR)
    assert match in str(err.value)


# --------------------------------------------------------------------------- Hugging Face sources


def test_unreachable_hub_fails_fast_naming_the_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_endpoint())
    started = time.monotonic()
    with pytest.raises(TerminalError) as err:
        prepare("dapo", Dataset(source="hf:BytedTsinghua-SIA/DAPO-Math-17k", format="dapo_math"), tmp_path / "d", SPEC_DIR)
    assert "BytedTsinghua-SIA/DAPO-Math-17k" in err.value.summary and "unreachable" in err.value.summary
    assert "HF_HUB_OFFLINE" in err.value.hint
    assert time.monotonic() - started < 30  # not the minutes of retries `datasets` would spend

"""Builtin sources are checked when the spec loads (docs/spec.md, "Builtin sources and their
options"): `retool plan` reports a bad builtin name, option or format at its file, line,
column and field, exits 1 and writes no state; valid options load exactly as written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from reconciler.builtins import GeneratorOptions, TinyQwen2Options, options_reference
from reconciler.errors import SpecError
from reconciler.graph import build_graph
from reconciler.loader import load_spec, parse_spec_text
from reconciler.spec import Dataset, Model
from tests.reconciler.test_cli import invoke

REPO = Path(__file__).resolve().parents[2]

SPEC = """\
name: demo
volumes:
  data: {mount: /data}
  models: {mount: /models}
  checkpoints: {mount: /checkpoints}
datasets:
  sft_data:
    source: builtin:tiny_sft
    format: messages
    options: {rows: 64, seed: 0, problems: fixed_shape}
  local:
    source: path:rows.jsonl
    format: messages
models:
  tiny:
    source: builtin:tiny-qwen2
    options:
      hidden_size: 64
      layers: 2
  qwen:
    source: hf:Qwen/Qwen2.5-0.5B-Instruct
stages:
  sft:
    kind: sft
    model: model.tiny
    train: dataset.sft_data
    max_length: 512
    train_batch_size: 8
    ulysses_sequence_parallel_size: 1
"""

# (id, old text, new text, the text the error points at (its first occurrence in the new spec),
#  field path, message)
CASES: list[tuple[str, str, str, str, str, str]] = [
    ("bad-option-value", "problems: fixed_shape", "problems: fixed_shap", "fixed_shap",
     "datasets.sft_data.options.problems",
     "Input should be 'mixed' or 'fixed_shape' (got 'fixed_shap'); did you mean 'fixed_shape'?"),
    ("unknown-option-key", "seed: 0,", "sede: 0,", "sede",
     "datasets.sft_data.options.sede",
     "unknown option 'sede' of builtin:tiny_sft (options: heldout, problems, rows, seed); did you mean 'seed'?"),
    ("option-out-of-range", "rows: 64", "rows: 0", "0,",
     "datasets.sft_data.options.rows", "Input should be greater than or equal to 1 (got 0)"),
    ("unknown-model-option-key", "      hidden_size: 64", "      hidden_sise: 64", "hidden_sise",
     "models.tiny.options.hidden_sise",
     "unknown option 'hidden_sise' of builtin:tiny-qwen2 (options: heads, hidden_size, intermediate_size, kv_heads, "
     "layers, max_position_embeddings, rope_theta, seed, tie_word_embeddings, tokenizer_corpus_rows, vocab_size); "
     "did you mean 'hidden_size'?"),
    ("bad-model-option-value", "      layers: 2", "      layers: two", "two",
     "models.tiny.options.layers", "Input should be a valid integer, unable to parse string as an integer (got 'two')"),
    ("heads-do-not-divide", "      layers: 2", "      layers: 2\n      heads: 3", "options:\n      hidden_size",
     "models.tiny.options", "hidden_size must be divisible by heads, and heads by kv_heads (hidden_size 64, heads 3, kv_heads 1)"),
    ("unknown-generator", "builtin:tiny_sft", "builtin:tiny_sftt", "builtin:tiny_sftt",
     "datasets.sft_data.source",
     "unknown builtin dataset generator 'tiny_sftt' (builtins: tiny_sft, tiny_math); did you mean 'tiny_sft'?"),
    ("unknown-builtin-model", "builtin:tiny-qwen2", "builtin:tiny-qwen3", "builtin:tiny-qwen3",
     "models.tiny.source", "unknown builtin model 'tiny-qwen3' (builtins: tiny-qwen2); did you mean 'tiny-qwen2'?"),
    ("options-on-a-path-dataset", "    source: path:rows.jsonl\n", "    source: path:rows.jsonl\n    options: {rows: 4}\n",
     "options: {rows: 4}", "datasets.local.options",
     "`options` apply only to builtin sources; path:rows.jsonl would ignore them (remove `options`)"),
    ("options-on-an-hf-model", "    source: hf:Qwen/Qwen2.5-0.5B-Instruct\n",
     "    source: hf:Qwen/Qwen2.5-0.5B-Instruct\n    options: {hidden_size: 8}\n", "options: {hidden_size: 8}",
     "models.qwen.options", "`options` apply only to builtin sources; hf:Qwen/Qwen2.5-0.5B-Instruct would ignore them (remove `options`)"),
    ("generator-with-a-format-its-rows-do-not-fit", "    format: messages\n    options", "    format: rl\n    options",
     "rl\n    options", "datasets.sft_data.format",
     "builtin:tiny_sft writes messages+tools rows: use `format: retool_sft` or `format: messages` (got 'rl')"),
]


def position(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column of the first occurrence of `needle`."""
    at = text.index(needle)
    return text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)


def test_the_base_spec_is_valid_and_plans(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    result = invoke("plan", spec)
    assert result.exit_code == 0, result.stderr
    assert "create  dataset.sft_data" in result.stdout and "create  model.tiny" in result.stdout


@pytest.mark.parametrize(("old", "new", "at", "field", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_reports_a_bad_builtin_at_its_line_and_field(
    tmp_path: Path, old: str, new: str, at: str, field: str, message: str
) -> None:
    assert SPEC.count(old) == 1, f"edit target {old!r} must occur once"
    text = SPEC.replace(old, new)
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    result = invoke("plan", spec)
    assert result.exit_code == 1
    line, col = position(text, at)
    expected = f"{spec}:{line}:{col} {field}: {message}"
    assert expected in result.stderr.splitlines(), f"expected {expected!r} in:\n{result.stderr}"
    assert "Traceback" not in result.stderr and "nothing was changed" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # no .retool/ state, nothing else


def test_every_bad_builtin_is_reported_together(tmp_path: Path) -> None:
    text = SPEC
    for _, old, new, *_ in (CASES[0], CASES[3], CASES[7], CASES[8]):
        text = text.replace(old, new)
    with pytest.raises(SpecError) as err:
        parse_spec_text(text, "spec.yaml")
    fields = [re.split(r"[ :]", p.split(" ", 1)[1])[0] for p in err.value.problems]
    assert fields == [
        "datasets.sft_data.options.problems", "datasets.local.options", "models.tiny.source",
    ], err.value.problems  # an unknown model's options are not checked against another model's


def test_valid_options_load_exactly_as_written() -> None:
    """Options are checked, never rewritten: no defaults filled in, no alias renamed, so the
    config the fingerprints hash is the YAML's (docs/change-policy.md, "Fingerprints")."""
    text = SPEC.replace(
        "    options: {rows: 64, seed: 0, problems: fixed_shape}",
        "    options: {rows: 64, seed: 0, problems: fixed_shape, heldout: true}",
    ).replace("      layers: 2\n", "      layers: 2\n      num_attention_heads: 2\n      kv_heads: 1\n      seed: 3\n")
    spec = parse_spec_text(text)
    assert spec.datasets["sft_data"].options == {"rows": 64, "seed": 0, "problems": "fixed_shape", "heldout": True}
    assert spec.models["tiny"].options == {"hidden_size": 64, "layers": 2, "num_attention_heads": 2, "kv_heads": 1, "seed": 3}
    assert spec.datasets["local"].options == {} and spec.models["qwen"].options == {}
    # and they are what the runtime builds from
    assert GeneratorOptions.model_validate(spec.datasets["sft_data"].options).heldout is True
    assert TinyQwen2Options.model_validate(spec.models["tiny"].options).num_key_value_heads == 1


def test_the_tiny_specs_options_reach_its_nodes_unchanged() -> None:
    path = REPO / "specs" / "retool-tiny.yaml"
    raw = yaml.safe_load(path.read_text())
    graph = build_graph(load_spec(path).spec)
    for section, kind in (("datasets", "dataset"), ("models", "model")):
        for name, body in raw[section].items():
            assert graph.nodes[f"{kind}.{name}"].config["options"] == body.get("options", {}), name


def test_plan_of_the_tiny_spec_works(tmp_path: Path) -> None:
    shutil.copytree(REPO / "specs", tmp_path / "specs")
    result = invoke("plan", tmp_path / "specs" / "retool-tiny.yaml", "--json")
    assert result.exit_code == 0, result.stderr
    for address in ("dataset.tiny_sft", "dataset.tiny_math", "dataset.tiny_math_test", "model.tiny"):
        assert f'"address": "{address}"' in result.stdout


def test_a_dataset_or_model_built_in_code_is_checked_too() -> None:
    with pytest.raises(ValueError, match="unknown option|Extra inputs"):
        Dataset(source="builtin:tiny_math", format="rl", options={"rowz": 3})
    with pytest.raises(ValueError, match="divisible"):
        Model(source="builtin:tiny-qwen2", options={"hidden_size": 30, "heads": 4})


def test_docs_hold_the_options_reference() -> None:
    doc = (REPO / "docs" / "spec.md").read_text(encoding="utf-8")
    assert options_reference() in doc, "docs/spec.md's builtin options table is stale: paste options_reference()"

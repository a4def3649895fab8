"""Broken specs: every problem is reported at once as `file:line:col field.path: message`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reconciler.errors import SpecError, TerminalError
from reconciler.loader import LoadedSpec, default_state_dir, find_repo_root, load_spec

# Line numbers below refer to this text (line 1 is `name: demo`).
BASE = """\
name: demo
volumes:
  data: {mount: /data}
  models: {mount: /models}
  checkpoints: {mount: /checkpoints}
secrets:
  wandb: {env: [WANDB_API_KEY]}
sandbox:
  placement: sidecar
datasets:
  sft_data:
    source: builtin:tiny_sft
    format: messages
  math:
    source: builtin:tiny_math
    format: rl
models:
  tiny:
    source: builtin:tiny-qwen2
stages:
  sft:
    kind: sft
    model: model.tiny
    train: dataset.sft_data
    max_length: 512
    train_batch_size: 16
    optim: {lr: 3.0e-3}
    resources: {gpu: H100, gpus_per_node: 8}
    secrets: [wandb]
  rl:
    kind: rl
    model: stage.sft
    train: dataset.math
    max_steps: 2
    train_batch_size: 4
    ppo_mini_batch_size: 4
"""

DUPLICATE_STAGE = "  sft:\n    kind: sft\n    model: model.tiny\n    train: dataset.sft_data\n"

EVAL_STAGE = "  ev:\n    kind: eval\n    model: stage.sft\n    datasets: [dataset.math]\n    {samples}\n"

# (id, old text, new text, line, field path, message fragment)
CASES: list[tuple[str, str, str, int, str, str]] = [
    ("wrong-type-int", "max_length: 512", "max_length: long", 25, "stages.sft.max_length", "valid integer"),
    ("wrong-type-list", "secrets: [wandb]", "secrets: wandb", 29, "stages.sft.secrets", "valid list"),
    ("negative-gpus", "gpus_per_node: 8", "gpus_per_node: -1", 28, "stages.sft.resources.gpus_per_node", "greater than or equal to 0"),
    ("unknown-gpu-type", "gpu: H100,", "gpu: H10,", 28, "stages.sft.resources.gpu", "did you mean 'H100'"),
    ("gpu-without-count", "resources: {gpu: H100, gpus_per_node: 8}", "resources: {gpu: H100}", 28, "stages.sft.resources", "gpus_per_node is 0"),
    ("count-without-gpu", "resources: {gpu: H100, gpus_per_node: 8}", "resources: {gpus_per_node: 8}", 28, "stages.sft.resources", "needs a gpu type"),
    ("negative-lr", "lr: 3.0e-3", "lr: -3.0e-3", 27, "stages.sft.optim.lr", "greater than 0"),
    ("unknown-model-ref", "model: model.tiny", "model: model.tiny2", 23, "stages.sft.model", "unknown reference 'model.tiny2'"),
    ("unknown-dataset-ref", "train: dataset.math", "train: dataset.maths", 33, "stages.rl.train", "did you mean 'dataset.math'"),
    ("wrong-ref-kind", "train: dataset.sft_data", "train: model.tiny", 24, "stages.sft.train", "must be `dataset.<name>`"),
    ("dependency-cycle", "model: model.tiny", "model: stage.rl", 32, "stages.rl.model", "dependency cycle: stage.rl → stage.sft → stage.rl"),
    ("self-reference", "model: model.tiny", "model: stage.sft", 23, "stages.sft.model", "dependency cycle: stage.sft → stage.sft"),
    ("duplicate-key", "    format: messages\n", "    format: messages\n    format: rl\n", 14, "datasets.sft_data.format", "duplicate key 'format' (first defined at line 13)"),
    ("lenient-fences-off-format", "    format: messages\n", "    format: messages\n    lenient_fences: true\n", 11,
     "datasets.sft_data", "lenient_fences applies to format retool_sft only"),
    ("duplicate-stage-name", "    ppo_mini_batch_size: 4\n", "    ppo_mini_batch_size: 4\n" + DUPLICATE_STAGE, 37, "stages.sft", "duplicate key 'sft'"),
    ("missing-required", "    train: dataset.sft_data\n", "", 21, "stages.sft.train", "required field is missing"),
    ("missing-name", "name: demo\n", "", 1, "name", "required field is missing"),
    ("tab-indentation", "    kind: sft\n", "\tkind: sft\n", 22, "", "tab character"),
    ("bad-override", "    secrets: [wandb]\n", "    secrets: [wandb]\n    overrides: [bad override]\n", 30, "stages.sft.overrides", "override 'bad override'"),
    ("override-without-value", "    secrets: [wandb]\n", "    secrets: [wandb]\n    overrides: [trainer.foo]\n", 30, "stages.sft.overrides", "`key=value`"),
    ("unknown-kind", "kind: rl", "kind: ppo", 31, "stages.rl.kind", "kind must be `sft`, `rl` or `eval` (got 'ppo')"),
    ("missing-kind", "    kind: rl\n", "", 30, "stages.rl", "missing `kind:`"),
    ("unknown-key", "optim: {lr: 3.0e-3}", "optimizer: {lr: 3.0e-3}", 27, "stages.sft.optimizer", "did you mean 'optim'"),
    ("unknown-nested-key", "optim: {lr: 3.0e-3}", "optim: {lr: 3.0e-3, betas2: [0.9, 0.9]}", 27, "stages.sft.optim.betas2", "did you mean 'betas'"),
    ("unknown-top-level-key", "name: demo\n", "name: demo\nstagez: {}\n", 2, "stagez", "did you mean 'stages'"),
    ("undeclared-volume", "    format: rl\n", "    format: rl\n    volume: scratch\n", 17, "datasets.math.volume", "volume 'scratch' is not declared"),
    ("undeclared-default-volume", "  checkpoints: {mount: /checkpoints}\n", "", 20, "stages.sft", "volume 'checkpoints' (the default) is not declared"),
    ("undeclared-secret", "secrets: [wandb]", "secrets: [wandb, hf]", 29, "stages.sft.secrets[1]", "secret 'hf' is not declared"),
    ("rl-without-sandbox", "sandbox:\n  placement: sidecar\n", "", 29, "stages.rl.kind", "declare a top-level `sandbox:`"),
    ("bad-source", "source: builtin:tiny_math", "source: s3://bucket/x", 15, "datasets.math.source", "must start with one of"),
    ("unknown-format", "format: rl", "format: parquet", 16, "datasets.math.format", "got 'parquet'"),
    ("bad-name", "  tiny:\n", "  Tiny:\n", 18, "models.Tiny", "name 'Tiny' must match"),
    ("mini-batch-too-big", "ppo_mini_batch_size: 4", "ppo_mini_batch_size: 8", 30, "stages.rl", "must not exceed train_batch_size"),
    ("batch-not-divisible", "train_batch_size: 16", "train_batch_size: 12", 21, "stages.sft", "not divisible by the world size 8"),
    ("bad-env-name", "env: [WANDB_API_KEY]", "env: [wandb_key]", 7, "secrets.wandb.env", "not an environment variable name"),
    ("relative-mount", "data: {mount: /data}", "data: {mount: data}", 3, "volumes.data.mount", "absolute path"),
    ("unclosed-flow-mapping", "optim: {lr: 3.0e-3}", "optim: {lr: 3.0e-3", 28, "", "invalid YAML"),
    ("unclosed-quote", "name: demo", 'name: "demo', 1, "", "unexpected end of stream"),
    ("bad-token-secret", "  placement: sidecar\n", "  placement: service\n  token_secret: token\n", 10, "sandbox.token_secret", "secret 'token' is not declared"),
    ("unknown-val-ref", "    max_steps: 2\n", "    max_steps: 2\n    val: [dataset.aime]\n", 35, "stages.rl.val[0]", "unknown reference 'dataset.aime'"),
    ("wrong-type-bool", "placement: sidecar", "placement: [sidecar]", 9, "sandbox.placement", "got [\"sidecar\"]"),
    # an eval stage's fields are located like any stage's: its line, no union tag in the path
    ("eval-unknown-key", "    ppo_mini_batch_size: 4\n", "    ppo_mini_batch_size: 4\n" + EVAL_STAGE.format(samples="sampels: 4"),
     41, "stages.ev.sampels", "did you mean 'samples'"),
    ("eval-bad-value", "    ppo_mini_batch_size: 4\n", "    ppo_mini_batch_size: 4\n" + EVAL_STAGE.format(samples="samples: -2"),
     41, "stages.ev.samples", "greater than or equal to 1"),
    # the spend guard (docs/budget.md): appended after the last line (36): `budget:` is line 37
    ("budget-negative", "    ppo_mini_batch_size: 4\n", "    ppo_mini_batch_size: 4\nbudget:\n  usd: -10\n",
     38, "budget.usd", "greater than 0"),
    ("budget-not-a-number", "    ppo_mini_batch_size: 4\n", "    ppo_mini_batch_size: 4\nbudget:\n  gpu_hours: lots\n",
     38, "budget.gpu_hours", "valid number"),
    ("budget-unknown-key", "    ppo_mini_batch_size: 4\n", "    ppo_mini_batch_size: 4\nbudget:\n  dolars: 10\n",
     38, "budget.dolars", "unknown key 'dolars'"),
    ("budget-empty", "    ppo_mini_batch_size: 4\n", "    ppo_mini_batch_size: 4\nbudget: {}\n",
     37, "budget", "needs `usd`, `gpu_hours` or per-stage caps"),
    ("budget-unknown-stage", "    ppo_mini_batch_size: 4\n",
     "    ppo_mini_batch_size: 4\nbudget:\n  usd: 100\n  stages:\n    rll: {usd: 10}\n",
     40, "budget.stages.rll", "budget for unknown stage 'rll' (stages: sft, rl); did you mean 'rl'?"),
    ("budget-stage-without-cap", "    ppo_mini_batch_size: 4\n",
     "    ppo_mini_batch_size: 4\nbudget:\n  stages:\n    rl: {}\n",
     39, "budget.stages.rl", "needs `usd`, `gpu_hours` or both"),
]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def problems_of(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.problems


def test_base_spec_is_valid(tmp_path: Path) -> None:
    loaded = load_spec(write(tmp_path, BASE))
    assert isinstance(loaded, LoadedSpec)
    assert set(loaded.spec.stages) == {"sft", "rl"}


@pytest.mark.parametrize(("old", "new", "line", "path", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_spec(tmp_path: Path, old: str, new: str, line: int, path: str, fragment: str) -> None:
    assert BASE.count(old) == 1, f"edit target {old!r} must occur once"
    spec_file = write(tmp_path, BASE.replace(old, new))
    problems = problems_of(spec_file)
    where = re.escape(f"{spec_file}:{line}:") + r"\d+ " + (re.escape(f"{path}: ") if path else "")
    matching = [p for p in problems if re.match(where, p) and fragment in p]
    assert matching, f"no problem at line {line} for {path!r} with {fragment!r}; got:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [("", 1, "the spec is empty"), ("# only a comment\n\n", 1, "the spec is empty"), ("- a\n- b\n", 1, "must be a mapping"),
     ("just text\n", 1, "got str"), ("---\nname: a\n---\nname: b\n", 3, "expected a single document")],
    ids=["empty", "comments-only", "list-root", "scalar-root", "two-documents"],
)
def test_not_a_spec(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    spec_file = write(tmp_path, text)
    problems = problems_of(spec_file)
    assert len(problems) == 1
    assert problems[0].startswith(f"{spec_file}:{line}:1 ") and fragment in problems[0], problems


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    text = (
        BASE.replace("gpus_per_node: 8", "gpus_per_node: -1")
        .replace("train: dataset.math", "train: dataset.maths")
        .replace("kind: rl", "kind: rl\n    epochz: 2")
        .replace("    format: messages\n", "    format: messages\n    format: rl\n")
    )
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 4, problems
    lines = [int(p.split(":")[1]) for p in problems]
    assert lines == sorted(lines)


def test_error_summary_names_the_file_and_count(tmp_path: Path) -> None:
    spec_file = write(tmp_path, BASE.replace("lr: 3.0e-3", "lr: -1"))
    with pytest.raises(SpecError) as info:
        load_spec(spec_file)
    assert info.value.summary == f"{spec_file}: 1 error in spec"
    assert "nothing was changed" in info.value.hint


def test_missing_file_is_a_clear_error_and_unreadable_bytes_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(TerminalError, match="missing.yaml not found"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "binary.yaml")


def test_anchors_and_merge_keys_load(tmp_path: Path) -> None:
    text = BASE.replace(
        "    resources: {gpu: H100, gpus_per_node: 8}\n", "    resources: &gpu8 {gpu: H100, gpus_per_node: 8}\n"
    ).replace("    max_steps: 2\n", "    max_steps: 2\n    resources:\n      <<: *gpu8\n      nodes: 2\n")
    spec = load_spec(write(tmp_path, text)).spec
    assert spec.stages["rl"].resources.gpus_per_node == 8 and spec.stages["rl"].resources.nodes == 2


@pytest.mark.parametrize("name", ["retool-qwen7b.yaml", "retool-tiny.yaml"])
def test_shipped_specs_load(name: str) -> None:
    path = Path(__file__).resolve().parents[2] / "specs" / name
    assert load_spec(path).spec.name == name.removesuffix(".yaml")


def test_state_dir_defaults_to_repo_root(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / "specs").mkdir()
    spec_file = tmp_path / "specs" / "spec.yaml"
    spec_file.write_text(BASE)
    loaded = load_spec(spec_file)
    assert find_repo_root(spec_file) == tmp_path.resolve()
    assert default_state_dir(loaded) == tmp_path.resolve() / ".retool"
    spec_file.write_text(BASE.replace("name: demo\n", "name: demo\nstate: {path: ../state}\n"))
    assert default_state_dir(load_spec(spec_file)).resolve() == (tmp_path / "state").resolve()

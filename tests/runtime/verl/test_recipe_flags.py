"""specs/retool-qwen7b.yaml against the official recipe's 7B scripts, flag by flag.

`retool render` prints the commands the 7B spec runs; verl 0.9.1's own hydra composes them
(`--cfg job --resolve`: the values verl will read, defaults included). Every effective value of
the recipe's scripts (recipe_reference/qwen2_7b.yaml) must be there, or be listed in
runtime.verl.recipe.differences with its reason; every flag retool renders must be the
recipe's or listed; and the README's table must be that list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from reconciler.loader import parse_spec_text
from reconciler.spec import RecipeOptions
from runtime.data.retool_sft import TOOLS
from runtime.verl.common import compose_config, entry_point
from runtime.verl.recipe.differences import DIFFERENCES, Difference, by_stage, markdown_table

ROOT = Path(__file__).resolve().parents[3]
SPEC = ROOT / "specs" / "retool-qwen7b.yaml"
REFERENCE = yaml.safe_load((Path(__file__).with_name("recipe_reference") / "qwen2_7b.yaml").read_text())
MISSING = object()
FLAG_KINDS = ("renamed", "changed", "dropped", "added")


def effective(stage: str) -> dict[str, Any]:
    return {**REFERENCE[stage]["defaults"], **REFERENCE[stage]["set"]}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    """stage name -> its training command, as `retool render --json` prints it (no Modal access:
    the unreachable state store counts as empty)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    done = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "render", str(SPEC), "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    items = json.loads(done.stdout)
    return {item["address"].split(".", 1)[1]: item["commands"][0] for item in items}


@pytest.fixture(scope="module")
def composed(rendered: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        "sft": compose_config(rendered["sft"]["argv"], rendered["sft"]["env"], resolve=True),
        "rl": compose_config(rendered["dapo"]["argv"], rendered["dapo"]["env"], resolve=True),
    }


def lookup(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def same(a: Any, b: Any) -> bool:
    """Equal as verl reads them (1 == 1.0; lists element-wise)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def rendered_keys(command: dict[str, Any]) -> dict[str, Any]:
    _, overrides = entry_point(command["argv"])
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group: o.value() for o in parsed}


def listed(stage: str) -> dict[str, Difference]:
    return {d.recipe_key: d for d in by_stage(stage) if d.recipe_key}  # type: ignore[misc]


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_every_recipe_value_is_rendered_or_listed(stage: str, composed: dict[str, dict[str, Any]]) -> None:
    config, differences = composed[stage], listed(stage)
    problems: list[str] = []
    for key, want in effective(stage).items():
        d = differences.get(key)
        if d is None:
            got = lookup(config, key)
            if not same(got, want):
                problems.append(f"{key}: recipe {want!r}, retool {got!r}, and not in DIFFERENCES")
        elif d.kind == "renamed":
            got = lookup(config, d.key or "")
            if not same(got, want):
                problems.append(f"{key} -> {d.key}: listed as renamed, but {got!r} != {want!r}")
        elif d.kind == "changed":
            if same(lookup(config, d.key or key), want):
                problems.append(f"{key}: listed as changed, but retool renders the recipe's {want!r} (stale entry)")
        elif d.kind == "dropped":
            if d.key is not None or same(lookup(config, key), want):
                problems.append(f"{key}: listed as dropped, but the recipe's value is there")
        else:
            problems.append(f"{key}: a {d.kind} entry cannot name a recipe key")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("stage,name", [("sft", "sft"), ("rl", "dapo")])
def test_every_rendered_flag_is_the_recipes_or_listed(
    stage: str, name: str, rendered: dict[str, dict[str, Any]]
) -> None:
    known = set(effective(stage)) | {d.key for d in by_stage(stage) if d.key}
    unexplained = sorted(k for k in rendered_keys(rendered[name]) if k not in known)
    assert not unexplained, f"rendered for stage {stage} but neither the recipe's nor in DIFFERENCES: {unexplained}"


def test_the_sft_launcher_is_the_recipes(rendered: dict[str, dict[str, Any]]) -> None:
    argv = rendered["sft"]["argv"]
    launcher = REFERENCE["sft"]["launcher"]
    assert argv[0] == "torchrun"
    assert f"--nnodes={launcher['nnodes']}" in argv and f"--nproc_per_node={launcher['nproc_per_node']}" in argv


def test_the_token_budgets_mean_what_the_recipe_means(composed: dict[str, dict[str, Any]]) -> None:
    """verl 0.9.1 sizes the actor's old-log-prob pass by rollout.log_prob_max_token_len_per_gpu:
    the recipe leaves it at the actor's 18432; its 4x budget is the reference model's."""
    arr = composed["rl"]["actor_rollout_ref"]
    assert arr["rollout"]["log_prob_max_token_len_per_gpu"] == arr["actor"]["ppo_max_token_len_per_gpu"] == 18432
    assert arr["ref"]["log_prob_max_token_len_per_gpu"] == 73728


def test_entries_name_real_flags_and_options(rendered: dict[str, dict[str, Any]]) -> None:
    names = {"sft": "sft", "rl": "dapo"}
    for d in DIFFERENCES:
        if d.kind in FLAG_KINDS and d.recipe_key:
            assert d.recipe_key in effective(d.stage), f"{d.recipe_key}: not a flag of the recipe's {d.stage} script"
        if d.kind == "added":
            assert d.key in rendered_keys(rendered[names[d.stage]]), f"{d.key}: listed as added but not rendered"
        if d.kind == "option":
            assert d.key and d.key.startswith("recipe.") and d.key.split(".", 1)[1] in RecipeOptions.model_fields


def test_the_readme_holds_the_differences_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README's 'Differences from the official recipe' table is stale: paste markdown_table()"


def test_tool_schema_and_limits_are_the_recipes() -> None:
    tool = REFERENCE["tool"]
    assert TOOLS == [tool["tool_schema"]]  # the SFT data's `tools` column and the RL tool's schema
    spec = parse_spec_text(SPEC.read_text())
    settings = spec.stages["dapo"].tool  # type: ignore[union-attr]
    cfg = tool["config"]
    assert (settings.num_workers, settings.rate_limit, settings.timeout_s, settings.memory_limit_mb) == (
        cfg["num_workers"], cfg["rate_limit"], cfg["default_timeout"], cfg["memory_limit_mb"]
    )
    assert spec.stages["dapo"].recipe == RecipeOptions()  # type: ignore[union-attr]

"""The recipe specs against the official recipe's scripts, flag by flag.

`retool render` prints the commands the 7B spec runs; verl 0.9.1's own hydra composes them
(`--cfg job --resolve`: the values verl will read, defaults included). Every effective value of
the recipe's scripts (recipe_reference/qwen2_7b.yaml) must be there, or be listed in
runtime.verl.recipe.differences with its reason; every flag retool renders must be the
recipe's or listed; and the table in docs/fidelity.md must be that list. The 32B spec's rendered flags
are checked the same way against the 32B scripts (recipe_reference/qwen2_32b.yaml), without
composing (its defaults are the 7B scripts' and are checked above).
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
from reconciler.spec import Dataset, RecipeOptions
from runtime.data.retool_sft import TOOLS
from runtime.verl.common import compose_config, entry_point
from runtime.verl.recipe.differences import DIFFERENCES, Difference, by_stage, markdown_table

ROOT = Path(__file__).resolve().parents[3]
SPEC = ROOT / "specs" / "retool-qwen7b.yaml"
SPEC_32B = ROOT / "specs" / "retool-qwen32b.yaml"
REFERENCE = yaml.safe_load((Path(__file__).with_name("recipe_reference") / "qwen2_7b.yaml").read_text())
REFERENCE_32B = yaml.safe_load((Path(__file__).with_name("recipe_reference") / "qwen2_32b.yaml").read_text())
MISSING = object()
FLAG_KINDS = ("renamed", "changed", "dropped", "added")


def effective(stage: str) -> dict[str, Any]:
    return {**REFERENCE[stage]["defaults"], **REFERENCE[stage]["set"]}


def render(spec: Path) -> dict[str, dict[str, Any]]:
    """stage name -> its training command, as `retool render --json` prints it (no Modal access:
    the unreachable state store counts as empty)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    done = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "render", str(spec), "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    items = json.loads(done.stdout)
    return {item["address"].split(".", 1)[1]: item["commands"][0] for item in items}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    return render(SPEC)


@pytest.fixture(scope="module")
def composed(rendered: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # two hydra compositions, a few seconds each, side by side
        sft = pool.submit(compose_config, rendered["sft"]["argv"], rendered["sft"]["env"], resolve=True)
        rl = pool.submit(compose_config, rendered["dapo"]["argv"], rendered["dapo"]["env"], resolve=True)
        return {"sft": sft.result(), "rl": rl.result()}


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


def listed(stage: str, scope: str = "7b", name: str | None = None) -> dict[str, Difference]:
    return {d.recipe_key: d for d in by_stage(stage, scope, name) if d.recipe_key}  # type: ignore[arg-type, misc]


def mismatches(recipe: dict[str, Any], value_of: Any, differences: dict[str, Difference]) -> list[str]:
    """Each recipe value against retool's (`value_of(key)`): equal, or as its entry says."""
    problems: list[str] = []
    for key, want in recipe.items():
        d = differences.get(key)
        if d is None:
            got = value_of(key)
            if not same(got, want):
                problems.append(f"{key}: recipe {want!r}, retool {'(unset)' if got is MISSING else repr(got)}, "
                                "and not in DIFFERENCES")
        elif d.kind == "renamed":
            got = value_of(d.key or "")
            if not same(got, want):
                problems.append(f"{key} -> {d.key}: listed as renamed, but {got!r} != {want!r}")
        elif d.kind == "changed":
            if same(value_of(d.key or key), want):
                problems.append(f"{key}: listed as changed, but retool renders the recipe's {want!r} (stale entry)")
        elif d.kind == "dropped":
            if d.key is not None or same(value_of(key), want):
                problems.append(f"{key}: listed as dropped, but the recipe's value is there")
        else:
            problems.append(f"{key}: a {d.kind} entry cannot name a recipe key")
    return problems


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_every_recipe_value_is_rendered_or_listed(stage: str, composed: dict[str, dict[str, Any]]) -> None:
    problems = mismatches(effective(stage), lambda key: lookup(composed[stage], key), listed(stage))
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def rendered_32b() -> dict[str, dict[str, Any]]:
    return render(SPEC_32B)


@pytest.mark.parametrize("name,stage", [("sft", "sft"), ("grpo", "rl"), ("ppo", "rl")])
def test_32b_flags_are_the_recipes_or_listed(name: str, stage: str, rendered_32b: dict[str, dict[str, Any]]) -> None:
    reference = REFERENCE_32B[name]
    recipe = {**reference.get("defaults", {}), **reference["set"]}
    ours = rendered_keys(rendered_32b[name])
    problems = mismatches(recipe, lambda key: ours.get(key, MISSING), listed(stage, "32b", name))
    known = set(recipe) | set(effective(stage)) | {d.key for d in by_stage(stage, "32b", name) if d.key}  # type: ignore[arg-type]
    problems += [f"{k}: rendered, but neither the recipe's nor in DIFFERENCES" for k in sorted(ours) if k not in known]
    assert not problems, "\n".join(problems)
    if name == "sft":
        launcher, argv = reference["launcher"], rendered_32b["sft"]["argv"]
        assert f"--nnodes={launcher['nnodes']}" in argv and f"--nproc_per_node={launcher['nproc_per_node']}" in argv


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


def test_entries_name_real_flags_and_options(
    rendered: dict[str, dict[str, Any]], rendered_32b: dict[str, dict[str, Any]]
) -> None:
    commands = {("sft", "7b"): [rendered["sft"]], ("rl", "7b"): [rendered["dapo"]],
                ("sft", "32b"): [rendered_32b["sft"]], ("rl", "32b"): [rendered_32b["grpo"], rendered_32b["ppo"]]}
    scripts = {("sft", "7b"): [effective("sft")], ("rl", "7b"): [effective("rl")],
               ("sft", "32b"): [REFERENCE_32B["sft"]["set"], REFERENCE_32B["sft"]["defaults"]],
               ("rl", "32b"): [REFERENCE_32B[n][part] for n in ("grpo", "ppo") for part in ("set", "defaults")]}
    for d in DIFFERENCES:
        scopes = ["7b", "32b"] if d.scope == "both" else [d.scope]
        if d.kind in FLAG_KINDS and d.recipe_key:
            assert any(d.recipe_key in values for s in scopes for values in scripts[(d.stage, s)]), (
                f"{d.recipe_key}: not a flag of the recipe's {d.stage} scripts ({d.scope})")
        if d.kind == "added":
            assert any(d.key in rendered_keys(c) for s in scopes for c in commands[(d.stage, s)]), (
                f"{d.key}: listed as added but not rendered")
        if d.kind == "option":  # an RL stage's `recipe.<field>` or a dataset's `datasets.<name>.<field>`
            assert d.key, d
            section, _, field = d.key.rpartition(".")
            assert (section == "recipe" and field in RecipeOptions.model_fields) or (
                section == "datasets.<name>" and field in Dataset.model_fields), f"{d.key}: not a spec option"


def test_the_docs_hold_the_differences_table() -> None:
    page = (ROOT / "docs" / "fidelity.md").read_text()
    assert markdown_table() in page, "docs/fidelity.md's 'Differences from the official recipe' table is stale: paste markdown_table()"


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

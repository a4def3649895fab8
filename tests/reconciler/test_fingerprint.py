"""Fingerprints see only what matters; diffs carry full paths and policies
(docs/change-policy.md, "Fingerprints" and "The decision table")."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from reconciler.diff import diff_configs
from reconciler.fingerprint import canonical_json, fingerprint, output_id, policy_of, split_by_policy
from reconciler.graph import build_graph
from tests.plan_helpers import QWEN, spec_from

TEXT = QWEN.read_text()


def prints(text: str) -> dict[str, tuple[str, str, str]]:
    graph = build_graph(spec_from(text))
    out = {}
    for address, node in graph.nodes.items():
        fp = fingerprint(node, {d: f"out:{d}" for d in node.identity_deps})
        out[address] = (fp.restart_id, fp.resume_hash, fp.update_hash)
    return out


def test_canonical_json_ignores_key_order_and_number_spelling() -> None:
    assert canonical_json({"b": 1e-5, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 0.00001})
    assert canonical_json({"x": 10.0}) == canonical_json({"x": 10}) == '{"x":10}'
    assert canonical_json({"t": (0.9, 0.95)}) == '{"t":[0.9,0.95]}'
    assert canonical_json({"lr": 2e-5}) != canonical_json({"lr": 1e-5})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)


def shuffled(value: object, rng: random.Random) -> object:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


@given(json_values, st.integers(0, 1000))
def test_key_order_never_changes_the_canonical_form(value: object, seed: int) -> None:
    assert canonical_json(value) == canonical_json(shuffled(value, random.Random(seed)))


def test_cosmetic_edits_change_no_fingerprint() -> None:
    base = prints(TEXT)
    cosmetic = {
        "reordered keys": TEXT.replace(
            "    kind: sft\n    model: model.qwen7b\n    train: dataset.retool_sft\n",
            "    train: dataset.retool_sft\n    model: model.qwen7b\n    kind: sft\n",
        ).replace("optim: {lr: 1.0e-5, betas: [0.9, 0.95],", "optim: {betas: [0.9, 0.95], lr: 1.0e-5,"),
        "comments": TEXT.replace("max_steps: 400      # one epoch", "max_steps: 400  # capped; one epoch") + "# end\n",
        "number spelling": TEXT.replace("lr: 1.0e-5,", "lr: 0.00001,").replace("clip_ratio_c: 10}", "clip_ratio_c: 10.0}"),
        "explicit defaults": TEXT.replace("    epochs: 6\n", "    epochs: 6\n    seed: 42\n")
        .replace("timeout_hours: 24}", "timeout_hours: 24, nodes: 1, retries: 2}"),
    }
    for name, text in cosmetic.items():
        assert text != TEXT, name
        assert prints(text) == base, name


def test_each_policy_moves_only_its_own_hash() -> None:
    base = prints(TEXT)
    restart = prints(TEXT.replace("optim: {lr: 1.0e-6}", "optim: {lr: 2.0e-6}"))["stage.dapo"]
    resume = prints(TEXT.replace("max_steps: 400", "max_steps: 600"))["stage.dapo"]
    update = prints(TEXT.replace("experiment: qwen7b-dapo", "experiment: dapo-2"))["stage.dapo"]
    old = base["stage.dapo"]
    assert restart[0] != old[0] and restart[1:] == old[1:]
    assert resume[1] != old[1] and (resume[0], resume[2]) == (old[0], old[2])
    assert update[2] != old[2] and update[:2] == old[:2]


def test_restart_identity_covers_inputs_but_not_image_or_sandbox() -> None:
    node = build_graph(spec_from(TEXT)).nodes["stage.dapo"]
    ids = {d: f"out:{d}" for d in node.identity_deps}
    base = fingerprint(node, ids)
    assert fingerprint(node, {**ids, "stage.sft": "out:new-sft"}).restart_id != base.restart_id
    assert fingerprint(node, {**ids, "image": "x", "sandbox": "y"}) == base
    # and the image's own config changes never reach a stage's fingerprint
    changed = prints(TEXT.replace("- flash-attn==2.8.3", "- flash-attn==2.8.3\n    - numpy"))
    assert changed["stage.dapo"] == prints(TEXT)["stage.dapo"]
    assert changed["image"][2] != prints(TEXT)["image"][2]


def test_output_identity_moves_with_the_final_step_or_digest() -> None:
    assert output_id("r", {"final_step": 372}) != output_id("r", {"final_step": 496})
    assert output_id("r", {"digest": "a", "rows": 5}) != output_id("r", {"digest": "b", "rows": 5})
    assert output_id("r", {"path": "/x"}) == output_id("r", {}) != output_id("s", {})


def test_policy_lookup() -> None:
    policies = {"optim.lr": "restart", "env": "update", "resources.gpu": "update", "resources.nodes": "restart",
                "tool_call_check": "update"}
    assert policy_of("optim.lr", policies) == "restart"
    assert policy_of("env.FOO", policies) == "update"  # inside a dict-valued leaf
    assert policy_of("resources", policies) == "restart"  # a whole container: its strictest leaf
    assert policy_of("tool_call_check.prompts", policies) == "update"
    groups = split_by_policy({"optim": {"lr": 1e-5}, "env": {"A": "1"}}, policies)
    assert groups["restart"] == {"optim.lr": 1e-5} and groups["update"] == {"env": {"A": "1"}}


def test_diff_renders_full_paths_with_policies() -> None:
    graph = build_graph(spec_from(TEXT))
    old = graph.nodes["stage.sft"]
    new = build_graph(
        spec_from(TEXT.replace("lr: 1.0e-5,", "lr: 2.0e-5,").replace("experiment: qwen7b-sft", "experiment: sft-2"))
    ).nodes["stage.sft"]
    changes = diff_configs(old.config, new.config, new.policies, new.spec_path)
    assert [c.render() for c in changes] == [
        "stages.sft.optim.lr: 1e-05 → 2e-05",
        "stages.sft.logging.experiment: qwen7b-sft → sft-2",
    ]
    assert [c.policy for c in changes] == ["restart", "update"]
    assert diff_configs(old.config, old.config, old.policies, old.spec_path) == []


def test_diff_of_lists_and_maps() -> None:
    policies = {"pip": "update", "env": "update", "options": "restart"}
    old = {"pip": ["a", "b"], "env": {"A": "1", "B": "x"}, "options": {"rows": 10}}
    new = {"pip": ["a", "b", "c"], "env": {"A": "1"}, "options": {"rows": 10.0, "seed": 1}}
    rendered = {c.render(): c.policy for c in diff_configs(old, new, policies, "image")}
    assert rendered == {
        "image.pip[2]: (absent) → c": "update",
        "image.env.B: x → (absent)": "update",
        "image.options.seed: (absent) → 1": "restart",
    }

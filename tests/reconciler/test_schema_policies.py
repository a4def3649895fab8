"""Every spec field declares its change policy, and the committed JSON Schema is current."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from reconciler.graph import build_graph, leaf_policies
from reconciler.loader import _unwrap, load_spec, schema_text
from reconciler.spec import POLICIES, SFTStage, Spec, field_policy

REPO = Path(__file__).resolve().parents[2]


def reachable_models(root: type[BaseModel]) -> set[type[BaseModel]]:
    """Every model class reachable from `root` through field annotations."""
    import typing

    seen: set[type[BaseModel]] = set()
    todo: list[object] = [root]
    while todo:
        tp = todo.pop()
        for alt in _unwrap(tp):
            if isinstance(alt, type) and issubclass(alt, BaseModel):
                if alt not in seen:
                    seen.add(alt)
                    todo += [f.annotation for f in alt.model_fields.values()]
            else:
                todo += list(typing.get_args(alt))
    return seen


def test_every_model_field_has_a_policy() -> None:
    models = reachable_models(Spec)
    assert {m.__name__ for m in models} >= {"Spec", "SFTStage", "RLStage", "Optim", "Resources", "Rollout", "Dataset"}
    missing = [f"{m.__name__}.{name}" for m in models for name in m.model_fields if field_policy(m, name) is None]
    assert missing == []


def test_every_schema_property_has_a_policy() -> None:
    schema = Spec.model_json_schema()
    objects = [("Spec", schema), *schema["$defs"].items()]
    missing = [
        f"{name}.{prop}"
        for name, obj in objects
        for prop, body in obj.get("properties", {}).items()
        if body.get("x-policy") not in POLICIES
    ]
    assert missing == []
    assert sum(len(obj.get("properties", {})) for _, obj in objects) > 150


def test_committed_schema_matches_the_model() -> None:
    committed = (REPO / "retool.schema.json").read_text(encoding="utf-8")
    assert committed == schema_text(), (
        "retool.schema.json is stale: regenerate it with "
        "python -c 'from reconciler.loader import schema_text; open(\"retool.schema.json\", \"w\").write(schema_text())'"
    )
    assert json.loads(committed)["title"] == "retool spec"


def test_specs_point_editors_at_the_schema() -> None:
    for name in ("retool-qwen7b.yaml", "retool-tiny.yaml"):
        first = (REPO / "specs" / name).read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=../retool.schema.json"


def test_leaf_policies_follow_nested_declarations() -> None:
    policies = leaf_policies(SFTStage(model="model.m", train="dataset.d"))
    assert policies["optim.lr"] == "restart"
    assert policies["resources.gpus_per_node"] == "restart"
    assert policies["resources.gpu"] == "update"  # a leaf's own policy beats its container's
    assert policies["logging.experiment"] == "update"
    assert policies["epochs"] == "resume" and policies["max_steps"] == "resume"
    assert policies["env"] == "update"  # dict-valued fields are leaves
    assert policies["tool_call_check"] == "update"  # an unset nested model is one leaf
    with_check = leaf_policies(SFTStage(model="model.m", train="dataset.d", tool_call_check={"prompts": 5}))
    assert with_check["tool_call_check.min_rate"] == "update"


def test_every_graph_leaf_has_a_policy() -> None:
    graph = build_graph(load_spec(REPO / "specs" / "retool-qwen7b.yaml").spec)
    for node in graph.nodes.values():
        assert set(node.policies.values()) <= set(POLICIES)
        assert node.policies, node.address

"""The resource graph: addresses, dependencies from references, deterministic order."""

from __future__ import annotations

import pytest

from reconciler.errors import SpecError
from reconciler.graph import Graph, Node, build_graph
from tests.plan_helpers import QWEN, spec_from

# Three chained stages on one dataset:
#
#   volume.data ─> dataset.d ─┬──────────┬──────────┐
#   volume.models > model.m ─> stage.a ─> stage.b ─> stage.c
#   image ··> sandbox ··> (rl stages)      (··> ordering only)
CHAIN = """\
name: chain
volumes: {data: {mount: /data}, models: {mount: /models}, checkpoints: {mount: /ckpt}}
sandbox: {}
datasets: {d: {source: "builtin:tiny_math", format: rl}}
models: {m: {source: "builtin:tiny-qwen2"}}
stages:
  c: {kind: rl, model: stage.b, train: dataset.d}
  a: {kind: sft, model: model.m, train: dataset.d}
  b: {kind: sft, model: stage.a, train: dataset.d}
"""


def test_addresses_of_the_real_spec() -> None:
    graph = build_graph(spec_from(QWEN.read_text()))
    assert set(graph.nodes) == {
        "volume.data", "volume.models", "volume.checkpoints", "image", "sandbox",
        "dataset.retool_sft", "dataset.dapo_math", "dataset.aime_2024", "dataset.aime_2025",
        "model.qwen7b", "stage.sft", "stage.dapo", "stage.eval_base", "stage.eval_sft", "stage.eval_dapo",
    }
    dapo = graph.nodes["stage.dapo"]
    assert set(dapo.deps) == {
        "stage.sft", "dataset.dapo_math", "dataset.aime_2024", "dataset.aime_2025",
        "volume.checkpoints", "image", "sandbox",
    }
    assert "image" not in dapo.identity_deps and "sandbox" not in dapo.identity_deps
    assert set(graph.nodes["stage.eval_dapo"].deps) == {
        "stage.dapo", "dataset.aime_2024", "dataset.aime_2025", "volume.checkpoints", "image", "sandbox",
    }
    assert "stage.sft" not in graph.nodes["stage.eval_base"].deps and "model.qwen7b" in graph.nodes["stage.eval_base"].deps
    assert graph.nodes["sandbox"].deps == ("image",)
    assert graph.nodes["dataset.dapo_math"].deps == ("volume.data",)
    assert graph.nodes["model.qwen7b"].deps == ("volume.models",)


def test_order_follows_references_not_file_order() -> None:
    graph = build_graph(spec_from(CHAIN))
    order = graph.order()
    assert order.index("stage.a") < order.index("stage.b") < order.index("stage.c")
    for address, node in graph.nodes.items():
        for dep in node.deps:
            assert order.index(dep) < order.index(address)
    assert order == build_graph(spec_from(CHAIN)).order()  # deterministic
    assert order[:3] == ["volume.checkpoints", "volume.data", "volume.models"]


def test_dependents_and_dependencies_are_transitive() -> None:
    graph = build_graph(spec_from(CHAIN))
    assert graph.dependents("stage.a") == {"stage.b", "stage.c"}
    assert graph.dependents("image") == {"sandbox", "stage.a", "stage.b", "stage.c"}
    assert graph.dependents("stage.c") == set()
    assert graph.dependencies("stage.b") == {"stage.a", "model.m", "dataset.d", "volume.data", "volume.models",
                                             "volume.checkpoints", "image"}


def test_node_config_is_the_effective_section() -> None:
    spec = spec_from(CHAIN)
    node = build_graph(spec).nodes["stage.c"]
    assert node.config == spec.stages["c"].model_dump(mode="json")
    assert node.config["optim"]["lr"] == 1e-6  # the RL default, applied
    assert node.spec_path == "stages.c" and node.kind == "stage" and node.name == "c"
    assert node.policies["rollout.n"] == "restart" and node.policies["rollout.tensor_parallel_size"] == "update"


def test_a_cycle_in_a_hand_built_graph_is_an_error() -> None:
    nodes = {
        "stage.x": Node(address="stage.x", kind="stage", name="x", deps=("stage.y",)),
        "stage.y": Node(address="stage.y", kind="stage", name="y", deps=("stage.x",)),
    }
    with pytest.raises(SpecError, match="dependency cycle: stage.x → stage.y → stage.x"):
        Graph(nodes)


def test_nodes_are_frozen() -> None:
    node = build_graph(spec_from(CHAIN)).nodes["image"]
    with pytest.raises(Exception):
        node.address = "other"  # type: ignore[misc]

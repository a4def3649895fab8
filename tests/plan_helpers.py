"""Builders for plan tests: a recorded state in which every node of a spec succeeded,
made the way apply records it (fingerprints from the unedited spec, upstream output ids)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reconciler.fingerprint import digest, fingerprint, output_id, upstream_output_ids
from reconciler.graph import build_graph
from reconciler.loader import parse_spec_text
from reconciler.plan import Observed, ObservedNode
from reconciler.spec import Spec
from reconciler.state.base import NodeRecord, State
from reconciler.steps import dataset_rows, total_steps

REPO = Path(__file__).resolve().parents[1]
QWEN = REPO / "specs" / "retool-qwen7b.yaml"


def spec_from(text: str) -> Spec:
    return parse_spec_text(text, "spec.yaml")


def qwen(**updates: Any) -> Spec:
    """specs/retool-qwen7b.yaml with fields replaced: `stages__dapo__resources__nodes=2`."""
    data = parse_spec_text(QWEN.read_text(encoding="utf-8"), str(QWEN)).model_dump(mode="json")
    for dotted, value in updates.items():
        node = data
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return Spec.model_validate(data)


def succeeded_state(spec: Spec, *, seconds_per_step: dict[str, float] | None = None) -> State:
    """State after a clean apply of `spec`: every node succeeded, stages ran to the end."""
    state = State(serial=7, lineage="lineage-test", spec_name=spec.name)
    graph = build_graph(spec)
    for addr in graph.order():
        node = graph.nodes[addr]
        fp = fingerprint(node, upstream_output_ids(node, state))
        outputs: dict[str, Any] = {}
        steps = 0
        if node.kind == "dataset":
            rows = dataset_rows(spec.datasets[node.name], None) or 100
            outputs = {"digest": digest(["rows", node.name, rows]), "rows": rows}
        elif node.kind == "model":
            outputs = {"digest": digest(["weights", node.name])}
        elif node.kind == "stage":
            stage = spec.stages[node.name]
            train = getattr(stage, "train", None)  # eval stages have none: their steps are sample rounds
            rows = state.nodes[train].outputs["rows"] if train else None
            steps = total_steps(stage, rows) or 0
            outputs = {"final_step": steps}
        state.nodes[addr] = NodeRecord(
            address=addr, kind=node.kind, status="succeeded", config=node.config,
            restart_id=fp.restart_id, resume_hash=fp.resume_hash, update_hash=fp.update_hash,
            inputs=upstream_output_ids(node, state), outputs=outputs,
            output_id=output_id(fp.restart_id, outputs), steps_done=steps, total_steps=steps or None,
            seconds_per_step=(seconds_per_step or {}).get(addr),
            created_at=1.0, updated_at=1.0,
        )
    return state


def observed_at_end(state: State) -> Observed:
    """A refresh that finds every stage's final checkpoint valid."""
    return Observed(
        nodes={
            a: ObservedNode(run_state="succeeded", step=r.steps_done, latest_valid_checkpoint=r.steps_done)
            for a, r in state.nodes.items() if r.kind == "stage"
        }
    )

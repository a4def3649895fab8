"""Fingerprints: canonical hashes of a node's effective configuration (docs/change-policy.md, "Fingerprints").

Three hashes per node, one per change policy, over the leaves of its effective config
(defaults applied, numbers canonical, key order irrelevant). The restart identity also
covers the output identity of every node it consumes (`Node.identity_deps`: never the
image or the sandbox), so a new SFT checkpoint makes RL rerun but a rebuilt image does not.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict

from reconciler.graph import Node
from reconciler.state.base import State

FINGERPRINT_VERSION = 1


class Fingerprints(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    restart_id: str
    resume_hash: str
    update_hash: str


def normalise(obj: Any) -> Any:
    """JSON-able data in canonical form: integral floats become ints (`10.0` == `10`),
    tuples become lists, keys become strings. `1e-5` and `0.00001` are already one float."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj) and obj.is_integer() and abs(obj) < 2**53:
            return int(obj)
        return obj
    if isinstance(obj, dict):
        return {str(k): normalise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [normalise(v) for v in obj]
    if isinstance(obj, BaseModel):
        return normalise(obj.model_dump(mode="json"))
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}")


def canonical_json(obj: Any) -> str:
    """One text per value: sorted keys, no whitespace, canonical numbers (floats by repr,
    the shortest text that round-trips)."""
    return json.dumps(normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def policy_of(path: str, policies: dict[str, str]) -> str:
    """Policy of a dotted path: its own, else its nearest declared ancestor's, else the
    strictest among its declared descendants (a whole container changed), else restart."""
    if path in policies:
        return policies[path]
    parts = path.split(".")
    for n in range(len(parts) - 1, 0, -1):
        anc = ".".join(parts[:n])
        if anc in policies:
            return policies[anc]
    below = [p for k, p in policies.items() if k.startswith(path + ".")]
    for strict in ("restart", "resume", "update"):
        if strict in below:
            return strict
    return "restart"


def split_by_policy(config: dict[str, Any], policies: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Leaves of `config` grouped by policy: {"restart": {"optim.lr": 1e-05, ...}, ...}."""
    groups: dict[str, dict[str, Any]] = {"restart": {}, "resume": {}, "update": {}}

    def walk(value: Any, path: str) -> None:
        if path and (path in policies or not isinstance(value, dict)):
            groups[policy_of(path, policies)][path] = value
            return
        for k, v in value.items():
            walk(v, f"{path}.{k}" if path else str(k))

    walk(config, "")
    return groups


def fingerprint(node: Node, upstream_output_ids: dict[str, str]) -> Fingerprints:
    """The node's three hashes; `upstream_output_ids` maps each identity dependency's
    address to its output identity (missing ones count as null, i.e. "not produced yet")."""
    groups = split_by_policy(node.config, node.policies)
    inputs = {d: upstream_output_ids.get(d) for d in node.identity_deps}
    return Fingerprints(
        restart_id=digest({"v": FINGERPRINT_VERSION, "kind": node.kind, "config": groups["restart"], "inputs": inputs}),
        resume_hash=digest({"v": FINGERPRINT_VERSION, "config": groups["resume"]}),
        update_hash=digest({"v": FINGERPRINT_VERSION, "config": groups["update"]}),
    )


def output_id(node_restart_id: str, outputs: dict[str, Any]) -> str:
    """What a consumer sees of a node's result: its restart identity plus, for a stage,
    the final step (`outputs["final_step"]`), for a dataset or model, the content digest
    (`outputs["digest"]`). Volumes have neither: identity alone."""
    marks = {k: outputs[k] for k in ("final_step", "digest") if outputs.get(k) is not None}
    return digest({"restart_id": node_restart_id, **marks})


def recorded_output_id(state: State | None, address: str) -> str | None:
    """A node's output identity as recorded (computed from its record if not stored)."""
    rec = state.nodes.get(address) if state else None
    if rec is None or rec.status != "succeeded" or not rec.restart_id:
        return None
    return rec.output_id or output_id(rec.restart_id, rec.outputs)


def upstream_output_ids(node: Node, state: State | None) -> dict[str, str]:
    """Recorded output identities of the node's identity dependencies (apply uses this to
    fingerprint a node right before recording it)."""
    out: dict[str, str] = {}
    for d in node.identity_deps:
        oid = recorded_output_id(state, d)
        if oid is not None:
            out[d] = oid
    return out

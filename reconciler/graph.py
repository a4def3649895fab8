"""The resource graph: one node per addressable thing in the spec.

Addresses (docs/spec.md): `volume.<name>`, `image`, `sandbox`, `dataset.<name>`,
`model.<name>`, `stage.<name>`. Dependencies come from references, never file order::

    volume.data ──> dataset.x ──┐
    volume.models ─> model.m ───┼──> stage.sft ──> stage.dapo
    image ··> sandbox ··········┘        (··> ordering only, never identity)

A node's `config` is its spec section as JSON (defaults applied); `policies` maps each
dotted leaf path of that config to its change policy, read from the field declarations:
a nested model's leaves carry their own policies, dict- and list-valued fields are leaves.
"""

from __future__ import annotations

import heapq
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from reconciler.errors import SpecError
from reconciler.references import find_cycle
from reconciler.spec import PREPARATION_REVISIONS, EvalStage, RLStage, Spec, field_policy

NodeKind = Literal["volume", "image", "sandbox", "dataset", "model", "stage"]

# Kinds whose changes never propagate into a consumer's identity: a rebuilt image or a
# reconfigured sandbox does not by itself rerun a finished stage (docs/change-policy.md, "Nodes that only order").
ORDERING_ONLY_KINDS: frozenset[str] = frozenset({"image", "sandbox"})
# A dataset's effective config carries the preparation revision of its format (a restart field).
PREPARATION_KEY = "preparation_revision"

# Tie-break for the topological order, so plans list nodes the same way every time.
KIND_RANK: dict[str, int] = {"volume": 0, "image": 1, "sandbox": 2, "dataset": 3, "model": 4, "stage": 5}


class Node(BaseModel):
    """One resource: what it is, what it needs, and its effective configuration."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    address: str
    kind: NodeKind
    name: str
    deps: tuple[str, ...] = ()
    config: dict[str, Any] = {}
    policies: dict[str, str] = {}
    spec_path: str = ""  # where its section sits in the spec ("stages.sft"); diff paths start here

    @property
    def identity_deps(self) -> tuple[str, ...]:
        """Dependencies whose output identity enters this node's restart identity."""
        return tuple(d for d in self.deps if address_kind(d) not in ORDERING_ONLY_KINDS)


def address_kind(address: str) -> str:
    """`stage.sft` -> `stage`; `image` -> `image`."""
    return address.split(".", 1)[0]


def sort_key(address: str) -> tuple[int, str]:
    return KIND_RANK.get(address_kind(address), 9), address


def leaf_policies(model: BaseModel, prefix: str = "") -> dict[str, str]:
    """Dotted leaf path -> policy, walking nested models. A leaf without a declared
    policy inherits its container's (the schema test makes that never happen)."""
    out: dict[str, str] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(leaf_policies(value, path + "."))
        else:
            out[path] = field_policy(type(model), name) or "restart"
    return out


class Graph:
    """Nodes by address, with a deterministic topological order."""

    def __init__(self, nodes: dict[str, Node]) -> None:
        self.nodes = nodes
        self._order = _topological(nodes)

    def order(self) -> list[str]:
        return list(self._order)

    def dependents(self, address: str) -> set[str]:
        """Every node that depends on `address`, transitively."""
        direct: dict[str, set[str]] = {a: set() for a in self.nodes}
        for node in self.nodes.values():
            for d in node.deps:
                direct.setdefault(d, set()).add(node.address)
        seen: set[str] = set()
        todo = [address]
        while todo:
            for nxt in direct.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def dependencies(self, address: str) -> set[str]:
        """Every node `address` needs, transitively."""
        seen: set[str] = set()
        todo = [address]
        while todo:
            node = self.nodes.get(todo.pop())
            for d in node.deps if node else ():
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen


def _topological(nodes: dict[str, Node]) -> list[str]:
    indegree = {a: sum(1 for d in n.deps if d in nodes) for a, n in nodes.items()}
    users: dict[str, list[str]] = {a: [] for a in nodes}
    for n in nodes.values():
        for d in n.deps:
            if d in nodes:
                users[d].append(n.address)
    ready = [sort_key(a) for a, k in indegree.items() if k == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, a = heapq.heappop(ready)
        order.append(a)
        for u in users[a]:
            indegree[u] -= 1
            if indegree[u] == 0:
                heapq.heappush(ready, sort_key(u))
    if len(order) != len(nodes):
        cycle = find_cycle({a: [d for d in n.deps if d in nodes] for a, n in nodes.items()}) or []
        raise SpecError("<spec>", ["dependency cycle: " + " → ".join(cycle)])
    return order


def _node(kind: NodeKind, name: str, section: BaseModel, spec_path: str, deps: list[str]) -> Node:
    address = kind if kind in ("image", "sandbox") else f"{kind}.{name}"
    return Node(
        address=address, kind=kind, name=name, deps=tuple(dict.fromkeys(deps)),
        config=section.model_dump(mode="json"), policies=leaf_policies(section), spec_path=spec_path,
    )


def build_graph(spec: Spec) -> Graph:
    """Nodes and dependency edges of a validated spec (the loader checked references)."""
    nodes: list[Node] = []
    for name, vol in spec.volumes.items():
        nodes.append(_node("volume", name, vol, f"volumes.{name}", []))
    nodes.append(_node("image", "image", spec.image, "image", []))
    if spec.sandbox is not None:
        nodes.append(_node("sandbox", "sandbox", spec.sandbox, "sandbox", ["image"]))
    for name, ds in spec.datasets.items():
        node = _node("dataset", name, ds, f"datasets.{name}", [f"volume.{ds.volume}"])
        if not ds.lenient_fences:  # absent when off, so datasets recorded before the option keep their identity
            node = node.model_copy(update={"config": {k: v for k, v in node.config.items() if k != "lenient_fences"}})
        revision = PREPARATION_REVISIONS.get(ds.format, 1)
        if revision > 1:  # absent at 1, so datasets prepared before revisions existed keep their identity
            node = node.model_copy(update={"config": {**node.config, PREPARATION_KEY: revision}})
        nodes.append(node)
    for name, m in spec.models.items():
        nodes.append(_node("model", name, m, f"models.{name}", [f"volume.{m.volume}"]))
    for name, st in spec.stages.items():
        if isinstance(st, EvalStage):
            deps = [st.model, *st.datasets, f"volume.{st.volume}", "image"]
        else:
            val = st.val if isinstance(st.val, list) else ([st.val] if st.val else [])
            deps = [st.model, st.train, *val, f"volume.{st.volume}", "image"]
        if isinstance(st, (RLStage, EvalStage)) and spec.sandbox is not None:
            deps.append("sandbox")
        nodes.append(_node("stage", name, st, f"stages.{name}", deps))
    by_address = {n.address: n for n in nodes}
    missing = sorted({d for n in nodes for d in n.deps if d not in by_address})
    if missing:
        raise SpecError("<spec>", [f"unknown reference {d!r}" for d in missing])
    return Graph(by_address)

"""The resource graph: one node per addressable thing in the spec.

Addresses (DESIGN.md): `volume.<name>`, `image`, `sandbox`, `dataset.<name>`,
`model.<name>`, `stage.<name>`. Dependencies come from references, never file order::

    volume.data ──> dataset.x ──┐
    volume.models ─> model.m ───┼──> stage.sft ──> stage.dapo
    image ··> sandbox ··········┘        (··> ordering only, never identity)

A node's `config` is its spec section as JSON (defaults applied); `policies` maps each
dotted leaf path of that config to its change policy, read from the field declarations.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

NodeKind = Literal["volume", "image", "sandbox", "dataset", "model", "stage"]

# Kinds whose changes never propagate into a consumer's identity: a rebuilt image or a
# reconfigured sandbox does not by itself rerun a finished stage (DESIGN.md).
ORDERING_ONLY_KINDS: frozenset[str] = frozenset({"image", "sandbox"})


class Node(BaseModel):
    """One resource: what it is, what it needs, and its effective configuration."""

    model_config = ConfigDict(frozen=True)

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

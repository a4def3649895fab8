"""Which stage kind runs a stage: the registry of runtime.stage_kind's objects."""

from __future__ import annotations

from reconciler.spec import Stage
from runtime.eval.kind import EVAL
from runtime.stage_kind import StageKind
from runtime.verl.kind import RL, SFT

KINDS: dict[str, StageKind] = {kind.name: kind for kind in (SFT, RL, EVAL)}


def kind_of(stage: Stage) -> StageKind:
    """The kind object of a stage spec (its `kind:` field)."""
    return KINDS[stage.kind]

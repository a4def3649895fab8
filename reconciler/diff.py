"""Field-level differences between the config a node last ran with and the spec's.

Each change carries the policy of the field it touches (docs/change-policy.md, "The decision table") and renders with its
full dotted path from the spec root: `stages.sft.optim.lr: 1e-05 → 2e-05`.
deepdiff is imported only when two configs actually differ, and without its optional
numpy/pandas support (see `_deepdiff`), to keep `retool plan` starting fast.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from reconciler.fingerprint import normalise, policy_of

ChangeKind = Literal["changed", "added", "removed"]
ABSENT = "(absent)"
_STRICTNESS = {"restart": 0, "resume": 1, "update": 2}


class FieldChange(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    path: str  # full dotted path from the spec root, list items as [i]
    old: Any = None
    new: Any = None
    kind: ChangeKind = "changed"
    policy: str

    def render(self) -> str:
        old = ABSENT if self.kind == "added" else format_value(self.old)
        new = ABSENT if self.kind == "removed" else format_value(self.new)
        return f"{self.path}: {old} → {new}"


def format_value(value: Any) -> str:
    """Short, YAML-like text: strings bare unless that would be ambiguous."""
    if isinstance(value, str):
        plain = value and value.strip() == value and value not in ("null", "true", "false") and not _numeric(value)
        return value if plain else json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def join_path(prefix: str, parts: list[Any]) -> str:
    out = prefix
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _deepdiff() -> Any:
    """deepdiff's DeepDiff, imported on first use. Our configs are plain JSON, so its
    optional numpy/pandas/polars support is hidden while it imports (unless already
    loaded): that import alone costs longer than the whole rest of `retool plan`."""
    if "deepdiff" not in sys.modules:
        hidden = [m for m in ("numpy", "pandas", "polars") if m not in sys.modules]
        for m in hidden:
            sys.modules[m] = None  # type: ignore[assignment]  # makes `import m` raise ImportError
        try:
            import deepdiff  # noqa: F401
        finally:
            for m in hidden:
                if sys.modules.get(m, 0) is None:
                    del sys.modules[m]
    from deepdiff import DeepDiff

    return DeepDiff


def diff_configs(
    old: dict[str, Any], new: dict[str, Any], policies: dict[str, str], prefix: str = ""
) -> list[FieldChange]:
    """Every leaf that differs, restart-policy fields first, then by path."""
    old_n, new_n = normalise(old), normalise(new)
    if old_n == new_n:
        return []
    DeepDiff = _deepdiff()
    tree = DeepDiff(old_n, new_n, view="tree", verbose_level=2)
    changes: list[FieldChange] = []
    for report, levels in tree.items():
        kind: ChangeKind = "changed"
        if report in ("dictionary_item_added", "iterable_item_added"):
            kind = "added"
        elif report in ("dictionary_item_removed", "iterable_item_removed"):
            kind = "removed"
        for level in levels:
            parts = level.path(output_format="list")
            policy_path = ".".join(str(p) for p in parts if not isinstance(p, int))
            changes.append(
                FieldChange(
                    path=join_path(prefix, parts),
                    old=None if kind == "added" else level.t1,
                    new=None if kind == "removed" else level.t2,
                    kind=kind,
                    policy=policy_of(policy_path, policies),
                )
            )
    changes.sort(key=lambda c: (_STRICTNESS.get(c.policy, 0), c.path))
    return changes

"""Saved plans (`retool plan --out FILE`, `retool apply FILE`).

A saved plan is the JSON plan (`Plan.to_json`) plus the spec's absolute path
and the SHA-256 of its text, so applying it applies exactly that plan against exactly that
spec; the state serial it carries makes apply refuse it once state moved on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from reconciler.errors import StalePlanError, TerminalError
from reconciler.loader import LoadedSpec, load_spec
from reconciler.plan import Plan


def spec_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_plan(plan: Plan, loaded: LoadedSpec, path: Path) -> None:
    """A saved plan is the JSON plan plus the spec's absolute path and content digest,
    so `retool apply FILE` applies exactly it, against exactly that spec."""
    data = json.loads(plan.model_copy(update={"spec": str(Path(loaded.path).resolve())}).to_json())
    data["spec_sha256"] = spec_digest(loaded.text)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def saved_plan_data(path: Path) -> dict[str, Any] | None:
    """The JSON of a saved plan in `path`, or None if `path` is not one (a spec)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or "changes" not in data or "serial" not in data:
        return None
    return data


def read_saved_plan(path: Path, data: dict[str, Any]) -> tuple[Plan, LoadedSpec]:
    """The saved plan and its spec; refused if the spec changed since the plan was made."""
    try:
        plan = Plan.from_json(json.dumps(data))
    except ValidationError as error:
        raise TerminalError(
            f"{path} is not a valid saved plan",
            f"{error.error_count()} problem(s), first: {error.errors()[0]['loc']}: {error.errors()[0]['msg']}",
            "make it again with `retool plan SPEC --out FILE`",
        ) from None
    spec_path = Path(plan.spec)
    if not spec_path.is_absolute():
        spec_path = path.parent / spec_path
    loaded = load_spec(spec_path)
    if data.get("spec_sha256") not in (None, spec_digest(loaded.text)):
        raise StalePlanError(
            "Saved plan is stale", f"the spec {spec_path} changed since the plan was made; run `retool plan` again."
        )
    return plan, loaded

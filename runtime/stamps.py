"""Stamps both backends write beside prepared data and models: which configuration made
them, so a later apply can tell "already built" from "build again"."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from reconciler.spec import Dataset, Model, field_policy


def short_hash(obj: Any) -> str:
    """16 hex characters of the SHA-256 of `obj` as sorted JSON (stable across runs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def restart_config(model: Dataset | Model) -> dict[str, Any]:
    """The fields of a dataset/model whose change means "rebuild" (policy `restart`)."""
    data = model.model_dump(mode="json")
    return {k: v for k, v in data.items() if field_policy(type(model), k) == "restart"}

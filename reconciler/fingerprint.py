"""Fingerprints: canonical hashes of a node's effective configuration (STYLE.md #4)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Fingerprints(BaseModel):
    model_config = ConfigDict(frozen=True)

    restart_id: str
    resume_hash: str
    update_hash: str

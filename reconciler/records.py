"""The base of the immutable data the layers hand each other (plans, backend results)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Immutable, and strict about its fields: a misspelt or unknown key is an error, not a
    silently dropped value (files that carry more, such as a saved plan, say what to skip)."""

    # Validators are built on first use (here and in the other layers' models): `retool plan`
    # never touches most of them.
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

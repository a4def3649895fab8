"""Shared pytest fixtures. Each helper's fixtures carry its own prefix; add, don't rewrite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# --------------------------------------------------------------------------- data + models


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builtin tiny Qwen2 (untrained), built once per session. Treat it as read-only."""
    from runtime.models.tiny import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def session_sandbox_url() -> Iterator[str]:
    """A real sandbox server on loopback for the whole session (stopped at the end)."""
    from runtime.sandbox_process import ephemeral_sandbox

    with ephemeral_sandbox(workers=2) as url:
        yield url

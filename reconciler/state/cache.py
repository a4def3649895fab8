"""A local copy of a shared store's state, so `retool plan` and `retool status` still work
from recorded state when the shared store cannot be reached (no credentials, no network).

Every successful read or apply against a shared store (the Modal one) leaves a copy in
`<state dir>/cache/`; when the store is unreachable, plan and status use that copy and say
so. Apply never does: it must hold the store's lock and re-reads the live state, so a plan
made from a stale copy is refused by the serial check like any other stale plan.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from reconciler.errors import RetoolError, TerminalError
from reconciler.state.base import State, StateStore, format_age, parse_state
from reconciler.state.local import LocalStore

CACHE_DIR = "cache"


def cache_path(state_dir: str | os.PathLike[str], store: StateStore) -> Path:
    key = hashlib.sha256(store.describe().encode("utf-8")).hexdigest()[:16]
    return Path(state_dir) / CACHE_DIR / f"{key}.state.json"


def remember(state_dir: str | os.PathLike[str], store: StateStore, state: State | None) -> None:
    """Keep a copy of a shared store's state (a local store is its own copy)."""
    if state is None or isinstance(store, LocalStore):
        return
    path = cache_path(state_dir, store)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cache.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(state.model_dump_json(indent=2))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs the offline fallback


def read_state(
    store: StateStore, state_dir: str | os.PathLike[str], *, assume_empty_if_unreachable: bool = False
) -> tuple[State | None, list[str]]:
    """The store's state, or, when a shared store is unreachable, its last local copy and
    a note saying so. Without a copy the store's error stands, unless the caller only
    previews (`retool plan`): then it plans against no state and says so loudly; a plan
    saved that way is refused by apply's lineage check."""
    try:
        state = store.read()
    except RetoolError as err:
        if isinstance(store, LocalStore):
            raise
        path = cache_path(state_dir, store)
        try:
            cached = parse_state(path.read_text(encoding="utf-8"), str(path))
        except (OSError, RetoolError):
            if assume_empty_if_unreachable:
                return None, [
                    f"state store unreachable ({err.summary}) and no local copy: this plan assumes nothing "
                    "exists yet; apply re-reads the real state first"
                ]
            detail = f"{err.detail}\n" if err.detail else ""
            raise TerminalError(
                err.summary, f"{detail}{store.describe()} is unreachable and there is no local copy of its state",
                err.hint,
            ) from err
        age = format_age(time.time() - path.stat().st_mtime)
        return cached, [
            f"state store unreachable ({err.summary}); using the local copy of serial {cached.serial} from {age} ago"
        ]
    remember(state_dir, store, state)
    return state, []

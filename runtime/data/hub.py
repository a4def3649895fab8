"""Fail fast, and clearly, when a Hugging Face source cannot be downloaded.

`datasets` and `huggingface_hub` retry for a long time when the Hub is unreachable and
then raise errors that do not name what was being fetched. Before downloading we probe
the Hub once with a short timeout; in offline mode (`HF_HUB_OFFLINE=1`) the probe is
skipped and only the local cache is used.
"""

from __future__ import annotations

import os
from typing import Literal

from reconciler.errors import TerminalError

PROBE_TIMEOUT_S = 5.0
_TRUE = {"1", "true", "yes", "on"}


def offline_mode() -> bool:
    """Whether the user asked for cache-only Hugging Face access."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def require_hub(kind: Literal["dataset", "model"], repo_id: str) -> None:
    """Raise TerminalError naming `repo_id` if the Hub does not answer within seconds.

    Any HTTP answer (even 401/404) counts as reachable: the download then reports it.
    Does nothing in offline mode.
    """
    if offline_mode():
        return
    import httpx

    url = f"{endpoint()}/api/{kind}s/{repo_id}"
    try:
        httpx.get(url, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise TerminalError(
            f"cannot download {kind} {repo_id!r}: the Hugging Face Hub is unreachable",
            f"GET {url} failed: {type(exc).__name__}: {exc}",
            "connect to the internet, set HF_HUB_OFFLINE=1 to use a cached copy, "
            "or point the spec at a local copy with `source: path:...`",
        ) from None


def download_failed(kind: str, repo_id: str, exc: Exception) -> TerminalError:
    """The TerminalError for a failed download, naming what was being fetched."""
    hint = (
        "the Hub is in offline mode (HF_HUB_OFFLINE): download it once online, or use `source: path:...`"
        if offline_mode()
        else "check the id, revision and split, and that you are logged in for gated repos (HF_TOKEN)"
    )
    return TerminalError(f"cannot download {kind} {repo_id!r}", f"{type(exc).__name__}: {exc}", hint)

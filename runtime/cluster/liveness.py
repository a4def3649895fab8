"""Per-rank liveness of a running multi-node stage, for `retool status`.

Rank 0 records what it sees of every rank in the run's `progress.json` (`ranks`: state
`alive` / `lost` / `missing` and when it last heard from it: members send a beat every few
seconds over the control channel). A rank is `lost` when its connection closed or when it
sent nothing for the stage's `lost_after_s` (60 s by default; runtime.cluster.rendezvous),
and then the whole cluster restarts. Only rank 0 writes the file (Modal volumes keep the
last commit, so one writer per file)."""

from __future__ import annotations

from typing import Any

STALE_S = 120.0  # a member silent this long (or progress this old) is shown as silent


def liveness_text(ranks: Any, now: float, *, updated_at: float | None = None) -> str:
    """`nodes: 0 alive, 1 alive` / `nodes: 0 alive, 1 lost` ("" when not a multi-node run)."""
    if not isinstance(ranks, dict) or len(ranks) < 2:
        return ""
    parts: list[str] = []
    for rank in sorted(ranks, key=lambda r: int(r) if str(r).isdigit() else 0):
        info = ranks[rank] if isinstance(ranks[rank], dict) else {}
        state = str(info.get("state") or "unknown")
        seen = info.get("seen_at")
        if state == "alive" and isinstance(seen, (int, float)) and now - float(seen) > STALE_S:
            state = f"silent {now - float(seen):.0f} s"
        parts.append(f"{rank} {state}")
    text = "nodes: " + ", ".join(parts)
    if updated_at is not None and now - updated_at > STALE_S:
        text += f" (as of {now - updated_at:.0f} s ago)"
    return text


def alive_count(ranks: Any) -> int:
    if not isinstance(ranks, dict):
        return 0
    return sum(1 for info in ranks.values() if isinstance(info, dict) and info.get("state") == "alive")

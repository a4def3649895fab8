"""The names `status` and reports give to trainer metrics.

verl prints its own keys (`train/loss`, `critic/score/mean`, `val-core/<dataset>/acc/mean@30`);
backends pass them through unchanged in `RunStatus.metrics`, and this mapping turns them
into the short names people read. It lives in the core because status needs it and the
core never imports a backend.
"""

from __future__ import annotations

import re

VAL_ACC = re.compile(r"^val-core/(.+)/acc/mean@\d+$")

# Short names `status` shows, each from the first key present (SFT, then RL).
DISPLAY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("train/loss",)),
    ("val_loss", ("val/loss",)),
    ("reward", ("critic/score/mean", "critic/rewards/mean")),
    ("response_length", ("response_length/mean",)),
    ("tool_calls", ("num_turns/mean",)),  # per response: verl counts 2 turns + 2 per tool call
    ("pg_loss", ("actor/pg_loss",)),
    ("grad_norm", ("train/grad_norm", "actor/grad_norm")),
    ("lr", ("train/lr", "actor/lr")),
)


def display(values: dict[str, float]) -> dict[str, float]:
    """verl's metric keys -> the short names `status` shows (loss, lr, grad_norm; reward,
    response_length, tool_calls per response, val_acc[/<dataset>]), in display order."""
    out: dict[str, float] = {}
    for name, keys in DISPLAY:
        key = next((k for k in keys if k in values), None)
        if key is None:
            continue
        out[name] = max(0.0, (values[key] - 2) / 2) if key == "num_turns/mean" else values[key]
    accs = sorted((m.group(1), v) for k, v in values.items() if (m := VAL_ACC.match(k)))
    for dataset, value in accs:
        out["val_acc" if len(accs) == 1 else f"val_acc/{dataset}"] = value
    return out

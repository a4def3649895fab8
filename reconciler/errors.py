"""One error surface for the whole tool (docs/architecture.md, "One error type, two kinds").

`RetoolError` carries a one-line summary, optional detail and a hint. `TerminalError`
is never retried (bad spec, missing credentials); `TransientError` may be retried with
backoff (network, 5xx, preemption). The CLI prints `summary`, then `detail` and `hint`.
"""

from __future__ import annotations


class RetoolError(Exception):
    """Base error: the CLI prints summary (+ detail + hint) and exits non-zero."""

    exit_code: int = 1

    def __init__(self, summary: str, detail: str = "", hint: str = "") -> None:
        super().__init__(summary)
        self.summary = summary
        self.detail = detail
        self.hint = hint

    def __str__(self) -> str:
        parts = [self.summary]
        if self.detail:
            parts.append(self.detail)
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)


class TerminalError(RetoolError):
    """Retrying cannot help: the input or the environment must change."""


class TransientError(RetoolError):
    """A fault that may go away: network, 5xx, preemption. Safe to retry."""


class SpecError(TerminalError):
    """The spec is invalid. `problems` holds every `file:line:col field: message` line."""

    def __init__(self, path: str, problems: list[str]) -> None:
        count = len(problems)
        super().__init__(
            f"{path}: {count} error{'s' if count != 1 else ''} in spec",
            "\n".join(problems),
            "fix the fields above; nothing was changed",
        )
        self.path = path
        self.problems = problems


class StateLockedError(TerminalError):
    """Another process holds the state lock."""


class StalePlanError(TerminalError):
    """A saved plan was made against an older state serial."""
